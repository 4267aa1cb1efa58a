"""Log lines carry the event's fields (`extra`) after its name, before any traceback."""

from __future__ import annotations

import logging
import sys

from gateway.logs import LINE_FORMAT, EventFormatter


def record(**fields: object) -> logging.LogRecord:
    exc_info = fields.pop("exc_info", None)
    made = logging.makeLogRecord(
        {"name": "gateway.sweeper", "msg": "deadlines_expired", "levelno": 20, **fields}
    )
    made.exc_info = exc_info  # type: ignore[assignment]
    return made


def test_fields_follow_the_event_name() -> None:
    line = EventFormatter("%(name)s %(message)s").format(record(count=3, lag_s=0.25))
    assert line == "gateway.sweeper deadlines_expired count=3 lag_s=0.25"


def test_fields_come_before_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    line = EventFormatter(LINE_FORMAT).format(record(job_id="01J", exc_info=exc_info))
    first, *rest = line.splitlines()
    assert first.endswith("gateway.sweeper deadlines_expired job_id=01J")
    assert rest[0].startswith("Traceback") and rest[-1] == "ValueError: boom"
