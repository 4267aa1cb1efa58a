"""Log lines: `time logger event key=value ...`, the fields given as `extra` after the event's
stable name (`job_parked job_id=...`). Secrets are never passed as fields."""

from __future__ import annotations

import logging

LINE_FORMAT = "%(asctime)s %(name)s %(message)s"


class EventFormatter(logging.Formatter):
    """The record's message followed by its `extra` fields, before any traceback."""

    _standard = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = {k: v for k, v in vars(record).items() if k not in self._standard}
        return " ".join([line, *(f"{k}={v}" for k, v in fields.items())])


def configure(level: str) -> None:
    """Log to stderr at `level` in the event format; httpx's request lines are left out (they
    carry webhook URLs, and the delivery log has every attempt)."""
    handler = logging.StreamHandler()
    handler.setFormatter(EventFormatter(LINE_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.getLogger("httpx").setLevel(logging.WARNING)
