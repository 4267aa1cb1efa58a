"""The global event log read as a stream: every job and pipeline event after a sequence.

An event an endpoint wanted has its frozen webhook message; the others are rendered when read,
from the job (or pipeline) and the event's own row: state, previous state, sequence and time
are the event's, the rest is the job as it is now.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import NotFound
from gateway.models import PipelineEvent, StreamEvent
from gateway.pipelines import PipelineState
from gateway.states import State
from gateway.store.verbs.connection import Connection
from gateway.store.verbs.outbox import job_event_data, pipeline_event_data
from gateway.store.verbs.tx import Tx
from gateway.webhooks import events as wire

_READ = (
    "SELECT e.seq, e.kind, e.owner_id, e.sequence, e.event_type, m.body FROM event_log AS e"
    " LEFT JOIN webhook_messages AS m ON m.id = e.message_id WHERE e.seq > ?"
)
# A job and every later attempt of it (a stream that follows a job follows its retries).
_ATTEMPTS = (
    "WITH RECURSIVE attempts (id) AS (SELECT CAST(? AS TEXT) UNION"
    " SELECT jobs.id FROM jobs JOIN attempts ON jobs.retry_of = attempts.id)"
    " SELECT id FROM attempts"
)


def stream_head(conn: Connection) -> int:
    """The sequence of the newest event (0 when there is none)."""
    return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM event_log").fetchone()[0])


def read_stream(
    tx: Tx, after: int, *, pipeline_id: str | None, job_id: str | None, limit: int
) -> list[StreamEvent]:
    sql = _READ
    params: list[object] = [after]
    if pipeline_id is not None:
        sql += " AND e.pipeline_id = ?"
        params.append(pipeline_id)
    if job_id is not None:
        sql += f" AND e.job_id IN ({_ATTEMPTS})"
        params.append(job_id)
    rows = tx.conn.execute(sql + " ORDER BY e.seq LIMIT ?", (*params, limit)).fetchall()
    found = []
    for seq, kind, owner_id, sequence, event_type, body in rows:
        if body is None:
            body = _render(tx, kind, owner_id, sequence, event_type)
        if body is not None:  # None: pruned meanwhile
            found.append(StreamEvent(seq=seq, event_type=event_type, body=body))
    return found


def _render(tx: Tx, kind: str, owner_id: str, sequence: int, event_type: str) -> bytes | None:
    if kind == "job":
        event = tx.conn.execute(
            "SELECT state, previous_state, at FROM job_events WHERE job_id = ? AND sequence = ?",
            (owner_id, sequence),
        ).fetchone()
        loaded = tx.find_job("id = ?", owner_id)
        if event is None or loaded is None:
            return None
        previous = None if event[1] is None else State(event[1])
        data: dict[str, Any] = job_event_data(loaded.job, previous, sequence)
        data["state"] = event[0]
        return wire.body(event_type, event[2], data)
    event = tx.conn.execute(
        "SELECT state, previous_state, at FROM pipeline_events"
        " WHERE pipeline_id = ? AND sequence = ?",
        (owner_id, sequence),
    ).fetchone()
    try:
        pipeline, _ = tx.pipeline(owner_id)
    except NotFound:
        return None
    if event is None:
        return None
    pipeline_event = PipelineEvent(
        id=0,
        pipeline_id=owner_id,
        sequence=sequence,
        state=PipelineState(event[0]),
        previous_state=None if event[1] is None else PipelineState(event[1]),
        at=event[2],
    )
    jobs = [lj.job for lj in tx.latest_jobs(pipeline)]
    return wire.body(event_type, event[2], pipeline_event_data(pipeline, jobs, pipeline_event))
