"""The global event log read as a stream: every job and pipeline event after a sequence."""

from __future__ import annotations

import sqlite3

from gateway.models import StreamEvent

_READ = (
    "SELECT e.seq, m.event_type, m.body FROM event_log AS e"
    " JOIN webhook_messages AS m ON m.id = e.message_id WHERE e.seq > ?"
)
# A job and every later attempt of it (a stream that follows a job follows its retries).
_ATTEMPTS = (
    "WITH RECURSIVE attempts (id) AS (SELECT ? UNION"
    " SELECT jobs.id FROM jobs JOIN attempts ON jobs.retry_of = attempts.id)"
    " SELECT id FROM attempts"
)


def stream_head(conn: sqlite3.Connection) -> int:
    """The sequence of the newest event (0 when there is none)."""
    return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM event_log").fetchone()[0])


def read_stream(
    conn: sqlite3.Connection,
    after: int,
    *,
    pipeline_id: str | None,
    job_id: str | None,
    limit: int,
) -> list[StreamEvent]:
    sql = _READ
    params: list[object] = [after]
    if pipeline_id is not None:
        sql += " AND e.pipeline_id = ?"
        params.append(pipeline_id)
    if job_id is not None:
        sql += f" AND e.job_id IN ({_ATTEMPTS})"
        params.append(job_id)
    rows = conn.execute(sql + " ORDER BY e.seq LIMIT ?", (*params, limit)).fetchall()
    return [StreamEvent(seq=row[0], event_type=row[1], body=row[2]) for row in rows]
