"""Runner verbs: registration, hand-out, confirmation, trace, exit."""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from typing import Any

import msgspec

from gateway.errors import (
    AlreadyFinal,
    Forbidden,
    IllegalTransition,
    NotFound,
    RangeNotSatisfiable,
)
from gateway.models import HandOut, Page, Runner, RunnerSpec
from gateway.states import FailureReason, State, Trigger
from gateway.store.base import Minter, TraceAppend, Transition, decode_cursor, encode_cursor
from gateway.store.verbs.connection import Connection, Dialect
from gateway.store.verbs.jobs import append_to_trace, apply_call, early_call
from gateway.store.verbs.tx import SELECT_JOB, Loaded, Tx, load_job

HAND_OUT_SCAN = 50  # pending jobs looked at per query when matching tags


class _Tags(msgspec.Struct):
    """What a hand-out reads of a queued job's spec to match it with a runner."""

    tags: list[str] = msgspec.field(default_factory=list)


_TAGS = msgspec.json.Decoder(_Tags)
_RUNNER_COLUMNS = (
    "id, description, tags, run_untagged, created_at, last_seen_at,"
    " (SELECT group_concat(j.id, ',') FROM jobs AS j WHERE j.runner_id = runners.id"
    " AND j.state = 'running') AS running"
)


def _load_runner(row: Sequence[Any]) -> Runner:
    return Runner(
        id=row[0],
        description=row[1],
        tags=tuple(json.loads(row[2])),
        run_untagged=bool(row[3]),
        created_at=row[4],
        last_seen_at=row[5],
        running_job_ids=tuple(row[6].split(",")) if row[6] else (),
    )


def create_runner(tx: Tx, runner_id: str, spec: RunnerSpec, token_hash: bytes) -> Runner:
    tx.conn.execute(
        "INSERT INTO runners (id, description, tags, run_untagged, token_hash, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            runner_id,
            spec.description,
            json.dumps(sorted(set(spec.tags))),
            int(spec.run_untagged),
            token_hash,
            tx.now,
        ),
    )
    row = tx.conn.execute(
        f"SELECT {_RUNNER_COLUMNS} FROM runners WHERE id = ?", (runner_id,)
    ).fetchone()
    return _load_runner(row)


def list_runners(conn: Connection, *, limit: int, cursor: str | None) -> Page[Runner]:
    after = "" if cursor is None else decode_cursor(cursor, "r:")
    rows = conn.execute(
        f"SELECT {_RUNNER_COLUMNS} FROM runners WHERE revoked_at IS NULL AND id > ?"
        " ORDER BY id LIMIT ?",
        (after, limit + 1),
    ).fetchall()
    runners = [_load_runner(row) for row in rows[:limit]]
    more = len(rows) > limit
    return Page(items=runners, next_cursor=encode_cursor("r:" + runners[-1].id) if more else None)


def revoke_runner(tx: Tx, runner_id: str) -> None:
    cursor = tx.conn.execute(
        "UPDATE runners SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        (tx.now, runner_id),
    )
    if cursor.rowcount != 1:
        raise NotFound(f"no runner {runner_id}")


def find_runner(conn: Connection, token_hash: bytes) -> Runner | None:
    row = conn.execute(
        f"SELECT {_RUNNER_COLUMNS} FROM runners WHERE token_hash = ? AND revoked_at IS NULL",
        (token_hash,),
    ).fetchone()
    return None if row is None else _load_runner(row)


def queue_scan(dialect: Dialect) -> str:
    """The pending script jobs awaiting a runner, oldest first, a page at a time: read through
    the `jobs_queue` partial index, so its cost does not grow with the parked external jobs
    (also `pending`) beside the queue."""
    return (
        f"SELECT id, spec FROM jobs{dialect.indexed_by('jobs_queue')} WHERE state = 'pending'"
        " AND runner_id IS NULL AND kind = 'script' ORDER BY queued_at, id LIMIT ? OFFSET ?"
    )


def claim_job(tx: Tx, runner: Runner, job_token_hash: bytes, minter: Minter) -> HandOut | None:
    """Hand the oldest pending script job whose tags this runner has to it, exactly once.

    Candidates are scanned unlocked; the one that fits is then locked alone (SKIP LOCKED on
    PostgreSQL, so runners on other replicas take the next one instead of waiting)."""
    tx.conn.execute("UPDATE runners SET last_seen_at = ? WHERE id = ?", (tx.now, runner.id))
    offset = 0
    while True:
        rows = tx.conn.execute(queue_scan(tx.dialect), (HAND_OUT_SCAN, offset)).fetchall()
        for job_id, spec in rows:
            if not runner.can_run(_TAGS.decode(spec).tags):
                continue
            locked = tx.conn.execute(
                f"{SELECT_JOB} WHERE id = ? AND state = 'pending' AND runner_id IS NULL"
                + tx.dialect.skip_locked(),
                (job_id,),
            ).fetchone()
            if locked is not None:
                return _hand_out(tx, load_job(locked), runner, job_token_hash, minter)
        if len(rows) < HAND_OUT_SCAN:
            return None
        offset += HAND_OUT_SCAN


def _hand_out(
    tx: Tx, loaded: Loaded, runner: Runner, job_token_hash: bytes, minter: Minter
) -> HandOut:
    job = loaded.job
    columns: dict[str, Any] = {"runner_id": runner.id, "job_token_hash": job_token_hash}
    continue_token = None
    if job.is_async:
        credential = minter.mint(job.id)
        tx.credentials[job.id] = credential
        continue_token = credential.token
        columns |= {"token_nonce": credential.nonce, "token_hash": credential.token_hash}
    handed = tx.apply(loaded, Trigger.HAND_OUT, "hand_out", **columns)
    pipeline_variables: dict[str, Any] = {}
    needs_outputs: list[dict[str, str]] = []
    if job.pipeline_id is not None:
        pipeline, _ = tx.pipeline(job.pipeline_id)
        pipeline_variables = dict(pipeline.spec.variables)
        needs_outputs = [_released_outputs(tx, job.pipeline_id, name) for name in job.needs]
    return HandOut(
        job=handed.job,
        continue_token=continue_token,
        pipeline_variables=pipeline_variables,
        needs_outputs=needs_outputs,
    )


def _released_outputs(tx: Tx, pipeline_id: str, name: str) -> dict[str, str]:
    """The outputs of the latest attempt of the need `name` that succeeded: the one that made
    this job pending (the need may have been retried since, its new attempt not yet done)."""
    row = tx.conn.execute(
        "SELECT outputs FROM jobs WHERE pipeline_id = ? AND name = ? AND state = 'success'"
        " ORDER BY attempt DESC LIMIT 1",
        (pipeline_id, name),
    ).fetchone()
    outputs: dict[str, str] = {} if row is None or row[0] is None else json.loads(row[0])
    return outputs


def _job_for_runner(tx: Tx, job_id: str, job_token_hash: bytes) -> Loaded:
    """The job, if `job_token_hash` is its job token; Forbidden otherwise (no oracle)."""
    loaded = tx.find_job("id = ?", job_id)
    stored = None if loaded is None else loaded.job_token_hash
    if loaded is None or stored is None or not hmac.compare_digest(stored, job_token_hash):
        raise Forbidden("the job token is not valid for this job")
    return loaded


def confirm_job(tx: Tx, job_id: str, job_token_hash: bytes) -> Transition:
    loaded = _job_for_runner(tx, job_id, job_token_hash)
    trigger = Trigger.RUNNER_PING if loaded.job.state is State.RUNNING else Trigger.CONFIRM
    confirmed = tx.apply(loaded, trigger, "runner")
    tx.settle()
    return Transition(job=confirmed.job, changes=tx.changes())


def append_trace(
    tx: Tx, job_id: str, job_token_hash: bytes, start: int, data: bytes
) -> TraceAppend:
    loaded = _job_for_runner(tx, job_id, job_token_hash)
    if loaded.job.state.terminal:
        raise AlreadyFinal(loaded.job.state, loaded.job.failure_reason)
    if loaded.job.state is not State.RUNNING:
        raise IllegalTransition(loaded.job.state, "a trace append")
    if start != loaded.trace_size:
        raise RangeNotSatisfiable(loaded.trace_size)
    pinged = tx.apply(loaded, Trigger.RUNNER_PING, "runner")
    size = append_to_trace(tx, pinged, data) if data else loaded.trace_size
    return TraceAppend(job=pinged.job, size=size, changes=tx.changes())


def finish_script(
    tx: Tx,
    job_id: str,
    job_token_hash: bytes,
    *,
    succeeded: bool,
    exit_code: int | None,
    reason: FailureReason | None,
) -> Transition:
    """The script's exit. An async job that exited 0 parks; a terminal call that came early is
    applied at once (a script failure wins over it)."""
    loaded = _job_for_runner(tx, job_id, job_token_hash)
    if loaded.job.state.terminal:
        raise AlreadyFinal(loaded.job.state, loaded.job.failure_reason)
    if loaded.job.state is not State.RUNNING:
        raise IllegalTransition(loaded.job.state, "a script exit")
    trigger = Trigger.SCRIPT_SUCCEEDED if succeeded else Trigger.SCRIPT_FAILED
    finished = tx.apply(loaded, trigger, "runner", reason=reason, exit_code=exit_code)
    early = early_call(finished)
    if finished.job.state is State.WAITING and early is not None:
        finished = apply_call(tx, finished, early)
    tx.settle()
    return Transition(job=finished.job, changes=tx.changes())
