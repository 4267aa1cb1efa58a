"""Job verbs: create, read, cancel, retry, the continue URL, and the deadline sweep."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.errors import (
    AlreadyFinal,
    ConcurrentChange,
    GatewayError,
    NotFound,
    NotLatestAttempt,
    NotParked,
    StateConflict,
)
from gateway.models import ContinueCall, Job, JobEvent, JobSpec, Page
from gateway.pipelines import downstream
from gateway.states import (
    Change,
    Deadlines,
    FailureReason,
    Flavor,
    Kind,
    Lifecycle,
    State,
    Trigger,
    advance,
)
from gateway.store.base import (
    ContinueOutcome,
    ContinueResult,
    Minter,
    Sweep,
    Transition,
    decode_cursor,
    encode_cursor,
)
from gateway.store.verbs.connection import Connection
from gateway.store.verbs.tx import (
    INSERT_EVENT,
    SELECT_JOB,
    Loaded,
    Tx,
    job_event,
    load_job,
)

UNKNOWN_TOKEN = "unknown continue token"


def create_job(tx: Tx, job_id: str, spec: JobSpec, minter: Minter) -> Transition:
    return Transition(job=tx.insert_job(job_id, spec, minter).job, changes=tx.changes())


def get_job(conn: Connection, job_id: str) -> Job | None:
    row = conn.execute(f"{SELECT_JOB} WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else load_job(row).job


def list_jobs(
    conn: Connection,
    *,
    state: State | None,
    pipeline_id: str | None,
    limit: int,
    cursor: str | None,
    standalone: bool = False,
) -> Page[Job]:
    clauses, params = [], []
    if state is not None:
        clauses.append("state = ?")
        params.append(state.value)
    if pipeline_id is not None:
        clauses.append("pipeline_id = ?")
        params.append(pipeline_id)
    if standalone:
        clauses.append("pipeline_id IS NULL")
    if cursor is not None:
        clauses.append("id < ?")
        params.append(decode_cursor(cursor, "j:"))
    where = " AND ".join(clauses) or "1 = 1"
    rows = conn.execute(
        f"{SELECT_JOB} WHERE {where} ORDER BY id DESC LIMIT ?", (*params, limit + 1)
    ).fetchall()
    jobs = [load_job(row).job for row in rows[:limit]]
    more = len(rows) > limit
    return Page(items=jobs, next_cursor=encode_cursor("j:" + jobs[-1].id) if more else None)


def list_parked(conn: Connection, limit: int) -> list[Job]:
    """Up to `limit` parked jobs (their callback awaited: an external job pending or running,
    an async job waiting), oldest first."""
    rows = conn.execute(
        f"{SELECT_JOB} WHERE state = 'waiting'"
        " OR (kind = 'external' AND state IN ('pending', 'running')) ORDER BY id LIMIT ?",
        (limit,),
    ).fetchall()
    return [load_job(row).job for row in rows]


def list_events(conn: Connection, job_id: str, *, after: int, limit: int) -> Page[JobEvent]:
    if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
        raise NotFound(f"no job {job_id}")
    rows = conn.execute(
        "SELECT id, job_id, sequence, state, previous_state, failure_reason, cause, at"
        " FROM job_events WHERE job_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
        (job_id, after, limit + 1),
    ).fetchall()
    events = [job_event(row[0], row[1:]) for row in rows[:limit]]
    more = len(rows) > limit
    return Page(
        items=events, next_cursor=encode_cursor(f"e:{events[-1].sequence}") if more else None
    )


def read_trace(conn: Connection, job_id: str, offset: int) -> bytes:
    if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
        raise NotFound(f"no job {job_id}")
    rows = conn.execute(
        'SELECT "offset", data FROM job_trace WHERE job_id = ? AND "offset" + length(data) > ?'
        ' ORDER BY "offset"',
        (job_id, offset),
    ).fetchall()
    if not rows:
        return b""
    joined = b"".join(row[1] for row in rows)
    return joined[max(0, offset - rows[0][0]) :]


def append_to_trace(tx: Tx, loaded: Loaded, data: bytes) -> int:
    """Append `data` at the end of the job's trace; the new size. ConcurrentChange when another
    append moved the end since the job was read."""
    grown = tx.conn.execute(
        "UPDATE jobs SET trace_size = trace_size + ? WHERE id = ? AND trace_size = ?",
        (len(data), loaded.job.id, loaded.trace_size),
    ).rowcount
    if grown != 1:
        raise ConcurrentChange("the trace grew concurrently; try again")
    tx.conn.execute(
        'INSERT INTO job_trace (job_id, "offset", data) VALUES (?, ?, ?)',
        (loaded.job.id, loaded.trace_size, data),
    )
    return loaded.trace_size + len(data)


def cancel_job(tx: Tx, job_id: str) -> Transition:
    loaded = tx.apply(tx.job(job_id), Trigger.CANCEL, "cancel")
    return Transition(job=loaded.job, changes=tx.changes())


def retry_job(tx: Tx, job_id: str, new_id: Callable[[], str], minter: Minter) -> Transition:
    """A new attempt of the job; in a pipeline also of every downstream job it had skipped."""
    old = tx.job(job_id).job
    if not old.state.terminal:
        raise StateConflict(f"only a finished job can be retried; this one is {old.state}")
    if old.retried:
        raise NotLatestAttempt("this attempt was retried already; retry the latest one")
    retried = [old]
    if old.pipeline_id is not None:
        pipeline, _ = tx.pipeline(old.pipeline_id)
        latest = {lj.job.name: lj.job for lj in tx.latest_jobs(pipeline)}
        needs = {name: list(job.needs) for name, job in latest.items()}
        retried += [
            latest[name]
            for name in sorted(downstream(needs, old.name), key=list(pipeline.spec.jobs).index)
            if latest[name].state is State.SKIPPED
        ]
        if pipeline.canceled:
            tx.conn.execute("UPDATE pipelines SET canceled = 0 WHERE id = ?", (pipeline.id,))
    first: Job | None = None
    for job in retried:
        attempt = tx.insert_job(
            new_id(),
            job.spec,
            minter,
            attempt=job.attempt + 1,
            retry_of=job.id,
            pipeline_id=job.pipeline_id,
            needs=job.needs,
        )
        first = first or attempt.job
    assert first is not None
    tx.settle()
    return Transition(job=tx.job(first.id).job, changes=tx.changes())


def find_by_continue_token(conn: Connection, token_hash: bytes) -> Job | None:
    row = conn.execute(f"{SELECT_JOB} WHERE token_hash = ?", (token_hash,)).fetchone()
    return None if row is None else load_job(row).job


def _is_repeat(loaded: Loaded, call: ContinueCall) -> bool:
    """An exact repeat of the call recorded on the job (JSON-equal, or same Idempotency-Key)."""
    if loaded.callback_digest is None:
        return False
    if call.digest == loaded.callback_digest:
        return True
    return call.idempotency_key is not None and call.idempotency_key == loaded.callback_key


def _call_columns(call: ContinueCall) -> dict[str, Any]:
    """The columns a terminal call sets; an exit code or message it does not give leaves the
    script's in place."""
    columns: dict[str, Any] = {
        "outputs": None if call.outputs is None else json.dumps(call.outputs),
        "result": call.result_json,
        "callback_digest": call.digest,
        "callback_key": call.idempotency_key,
    }
    if call.exit_code is not None:
        columns["exit_code"] = call.exit_code
    if call.message is not None:
        columns["message"] = call.message
    return columns


def apply_call(tx: Tx, loaded: Loaded, call: ContinueCall) -> Loaded:
    """Finish the job with a terminal call's result (the caller checked it may)."""
    trigger = Trigger.CALLBACK_SUCCEEDED if call.succeeded else Trigger.CALLBACK_FAILED
    return tx.apply(loaded, trigger, "callback", **_call_columns(call))


def consume_continue(
    tx: Tx, token_hash: bytes, call: ContinueCall | GatewayError
) -> ContinueResult:
    loaded = tx.find_job("token_hash = ?", token_hash)
    if loaded is None:
        raise NotFound(UNKNOWN_TOKEN)
    if isinstance(call, GatewayError):
        raise call
    job = loaded.job
    if job.state.terminal:
        # An early call that a script failure, cancel or deadline overrode finished nothing:
        # its repeat learns why (409), it does not replay.
        finished_by_call = (
            job.state is State.SUCCESS or job.failure_reason is FailureReason.CALLBACK_FAILURE
        )
        if finished_by_call and _is_repeat(loaded, call):
            return ContinueResult(ContinueOutcome.REPLAYED, job, tx.changes())
        raise AlreadyFinal(job.state, job.failure_reason)
    if tx.lifecycle(job).takes_early_callback:
        if loaded.early_callback is not None:
            if _is_repeat(loaded, call):
                return ContinueResult(ContinueOutcome.DEFERRED, job, tx.changes())
            raise StateConflict("another terminal call was already accepted for this job")
        kept = tx.conn.execute(
            "UPDATE jobs SET early_callback = ?, callback_digest = ?, callback_key = ?"
            " WHERE id = ? AND early_callback IS NULL",
            (_keep(call), call.digest, call.idempotency_key, job.id),
        ).rowcount
        if kept != 1:
            raise ConcurrentChange("another terminal call came at the same time; try again")
        return ContinueResult(ContinueOutcome.DEFERRED, job, tx.changes())
    finished = apply_call(tx, loaded, call)
    tx.settle()
    return ContinueResult(ContinueOutcome.APPLIED, finished.job, tx.changes())


def _keep(call: ContinueCall) -> str:
    """An early terminal call as kept on the job until the script exits."""
    return json.dumps(
        {
            "succeeded": call.succeeded,
            "exit_code": call.exit_code,
            "message": call.message,
            "outputs": call.outputs,
            "result_json": call.result_json,
            "digest": call.digest.hex(),
            "idempotency_key": call.idempotency_key,
        }
    )


def early_call(loaded: Loaded) -> ContinueCall | None:
    """The terminal call kept while the async script ran, if any."""
    if loaded.early_callback is None:
        return None
    kept = json.loads(loaded.early_callback)
    return ContinueCall(
        succeeded=kept["succeeded"],
        exit_code=kept["exit_code"],
        message=kept["message"],
        outputs=kept["outputs"],
        result_json=kept["result_json"],
        digest=bytes.fromhex(kept["digest"]),
        idempotency_key=kept["idempotency_key"],
    )


def touch_continue(tx: Tx, token_hash: bytes, trigger: Trigger, log: bytes | None) -> Transition:
    loaded = tx.find_job("token_hash = ?", token_hash)
    if loaded is None:
        raise NotFound(UNKNOWN_TOKEN)
    if tx.lifecycle(loaded.job).takes_early_callback:
        # The async script still runs and its runner owns the trace: progress calls wait for
        # the job to park (only a terminal call is kept early).
        raise NotParked(loaded.job.state)
    effective = trigger
    if trigger is Trigger.START and loaded.job.lifecycle.flavor is not Flavor.EXTERNAL:
        effective = Trigger.HEARTBEAT
    touched = tx.apply(loaded, effective, f"continue:{trigger.value}")
    if log:
        append_to_trace(tx, touched, log)
    tx.settle()
    return Transition(job=touched.job, changes=tx.changes())


# What the sweep reads of a due job: what the DEADLINE trigger and the outbox need. The clocks
# come in the order of Deadlines' fields, which is also their tie-break order.
_CLOCKS = tuple(field.name for field in dataclasses.fields(Deadlines))
_DUE = (
    "SELECT id, pipeline_id, kind, is_async, state, event_sequence, deadline_at, spec, "
    + ", ".join(f"{clock}_deadline_at" for clock in _CLOCKS)
    + " FROM jobs WHERE deadline_at <= ? ORDER BY deadline_at LIMIT ?"
)
# UPDATE_TRANSITION for a plain failure (terminal, every clock cleared, no timestamp but
# finished_at), compare-and-set the same way.
_FAIL = (
    "UPDATE jobs SET state = ?, failure_reason = ?, finished_at = ?,"
    + "".join(f" {clock}_deadline_at = NULL," for clock in _CLOCKS)
    + " deadline_at = NULL, event_sequence = ? WHERE id = ? AND state = ? AND event_sequence = ?"
)


class _SweptSpec(msgspec.Struct):
    """The one field of a job's spec the sweep needs (whether the job has its own webhook)."""

    state_webhook_url: str | None = None


_SWEPT_SPEC = msgspec.json.Decoder(_SweptSpec)


def own_webhook(spec: str) -> bool:
    """Whether a job's spec (as stored) names a state_webhook_url."""
    return bool(_SWEPT_SPEC.decode(spec).state_webhook_url)


@dataclass(frozen=True)
class _Failure:
    """A plain failure by deadline: the change, and its state and reason as stored."""

    change: Change
    state: str
    reason: str


class _PlainFailures:
    """What the DEADLINE trigger does to jobs of one shape (kind, async, state, and which of
    their clocks fired first), asked of the state machine once per shape and batch.

    A failure is the same for every job of a shape: the fired clock names the reason and a
    terminal state keeps no clock. So each shape's change is computed by `advance` on a job
    of that shape whose only clock is the fired one, and reused only when it is such a plain
    failure; a requeue (an unconfirmed hand-out) keeps the job's other clocks, so those jobs
    take the full path."""

    def __init__(self, tx: Tx) -> None:
        self._tx = tx
        self._failures: dict[tuple[str, int, str, int], _Failure | None] = {}

    def get(self, shape: tuple[str, int, str, int]) -> _Failure | None:
        """The failure of jobs of `shape` (kind, is_async, state, index of the fired clock in
        Deadlines' fields); None when it is not a plain one."""
        try:
            return self._failures[shape]
        except KeyError:
            failure = self._failures[shape] = self._ask(*shape)
            return failure

    def _ask(self, kind: str, is_async: int, state: str, clock: int) -> _Failure | None:
        tx = self._tx
        lifecycle = Lifecycle(
            kind=Kind(kind),
            is_async=bool(is_async),
            state=State(state),
            deadlines=Deadlines(**{_CLOCKS[clock]: tx.now}),
            confirm_timeout_s=tx.policy.confirm_timeout_s,
            runner_timeout_s=tx.policy.runner_timeout_s,
        )
        change = advance(lifecycle, Trigger.DEADLINE, tx.now)
        if (
            not change.state.terminal
            or change.failure_reason is None
            or change.deadlines != Deadlines()
            or not change.sets_finished_at
            or change.sets_started_at
            or change.sets_parked_at
            or change.requeued
        ):
            return None
        return _Failure(change, change.state.value, change.failure_reason.value)


def expire_overdue(tx: Tx, limit: int) -> Sweep:
    """Fire due deadlines in one batch, earliest first. Jobs that just fail are read by the
    columns the state machine and the outbox need, updated with one executemany and their
    events inserted a few hundred per statement; their webhook message (only for a subscribed
    job) is rendered from the row read back. Anything else (a requeue, a row whose clocks
    disagree with its `deadline_at`) goes through `Tx.write` on the full row."""
    rows = tx.conn.execute(_DUE + tx.dialect.skip_locked(), (tx.now, limit)).fetchall()
    if not rows:
        return Sweep(changes=tx.changes(), fired=0, oldest_deadline_at=None)
    plain = _PlainFailures(tx)
    now = tx.now
    updates, inserts, swept = [], [], []
    for row in rows:
        job_id, pipeline_id, kind, is_async, state, sequence, due_at, spec = row[:8]
        clocks = row[8:]
        failure = (
            plain.get((kind, is_async, state, clocks.index(due_at))) if due_at in clocks else None
        )
        if failure is None:
            loaded = tx.job(job_id)
            tx.write(loaded, advance(tx.lifecycle(loaded.job), Trigger.DEADLINE, now), "deadline")
            continue
        next_sequence = sequence + 1
        updates.append((failure.state, failure.reason, now, next_sequence, job_id, state, sequence))
        inserts.append(
            (job_id, next_sequence, failure.state, state, failure.reason, "deadline", now)
        )
        swept.append((failure.change, pipeline_id, own_webhook(spec)))
        if pipeline_id is not None:
            tx.touch_pipeline(pipeline_id)
    if updates:
        cursor = tx.conn.executemany(_FAIL, updates)
        if cursor.rowcount != len(updates):
            raise ConcurrentChange("a due job changed concurrently; the sweep retries")
        _record_swept(tx, inserts, _insert_events(tx, inserts), swept)
    tx.settle()
    return Sweep(changes=tx.changes(), fired=len(rows), oldest_deadline_at=rows[0][6])


def _record_swept(
    tx: Tx,
    inserts: list[tuple[Any, ...]],
    event_ids: list[int],
    swept: list[tuple[Change, str | None, bool]],
) -> None:
    """The events of the jobs failed in bulk: reported, logged, and queued for the endpoints
    that want them (each message rendered from its job read back, now that it is written)."""
    logged = [
        (
            JobEvent(
                id=event_id,
                job_id=params[0],
                sequence=params[1],
                state=change.state,
                previous_state=change.previous_state,
                failure_reason=change.failure_reason,
                cause=params[5],
                at=params[6],
            ),
            pipeline_id,
            own_url,
        )
        for event_id, params, (change, pipeline_id, own_url) in zip(
            event_ids, inserts, swept, strict=True
        )
    ]
    tx.events.extend(event for event, _, _ in logged)
    tx.outbox.job_events_of(logged, functools.partial(_read_back, tx), tx.pipeline_has_url)


def _read_back(tx: Tx, job_id: str) -> Job:
    return tx.job(job_id).job


_EVENTS_PER_INSERT = 500  # rows per multi-row INSERT (7 parameters each)


def _insert_events(tx: Tx, inserts: list[tuple[Any, ...]]) -> list[int]:
    """Insert the events (one per job) a few hundred rows per statement; their ids, in the
    order of `inserts` (RETURNING rows come in no guaranteed order: matched by job id)."""
    event_ids: list[int] = []
    columns = INSERT_EVENT.split(" VALUES ", 1)[0]
    for start in range(0, len(inserts), _EVENTS_PER_INSERT):
        chunk = inserts[start : start + _EVENTS_PER_INSERT]
        values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
        rows = tx.conn.execute(
            f"{columns} VALUES {values} RETURNING id, job_id",
            [value for params in chunk for value in params],
        ).fetchall()
        ids = {job_id: event_id for event_id, job_id in rows}
        event_ids += [ids[params[0]] for params in chunk]
    return event_ids
