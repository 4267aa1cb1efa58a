"""The embedded store: SQLite in WAL mode through aiosqlite.

Every verb is a plain function run on aiosqlite's connection thread in one hop (`_transact`):
BEGIN IMMEDIATE, the reads and writes, COMMIT. One aiosqlite call costs about 120 us on our
machine kind, so a verb made of several awaits would cap the hot path near 1.1k/s; one hop per
transaction keeps it near the speed of SQLite itself. The connection thread runs one function at
a time, so transactions never interleave (see docs/decisions/0002-one-hop-transactions.md).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import msgspec

from gateway.errors import (
    AlreadyFinal,
    GatewayError,
    MalformedRequest,
    NotFound,
    NotLatestAttempt,
    StateConflict,
    StoreError,
)
from gateway.models import ContinueCall, Job, JobEvent, JobSpec, Page, Principal
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
    entry_deadlines,
    initial_state,
)
from gateway.store.base import (
    ContinueOutcome,
    ContinueResult,
    Sweep,
    Transition,
    decode_cursor,
    encode_cursor,
)
from gateway.tokens import ContinueCredential

T = TypeVar("T")

_JOB_COLUMNS = (
    "id, pipeline_id, name, kind, is_async, state, failure_reason, exit_code, message, outputs,"
    " result, attempt, retry_of, spec, created_at, started_at, parked_at, finished_at,"
    " execution_deadline_at, callback_deadline_at, heartbeat_deadline_at, queue_deadline_at,"
    " token_nonce, callback_digest, callback_key, event_sequence,"
    " EXISTS (SELECT 1 FROM jobs AS later WHERE later.retry_of = jobs.id) AS retried"
)
_SELECT_JOB = f"SELECT {_JOB_COLUMNS} FROM jobs"
_SPEC = msgspec.json.Decoder(JobSpec)
_ENCODE = msgspec.json.Encoder()

_TRANSITION_SET = """
UPDATE jobs SET state = ?, failure_reason = COALESCE(?, failure_reason),
    started_at = COALESCE(started_at, ?), parked_at = COALESCE(?, parked_at),
    finished_at = COALESCE(?, finished_at),
    execution_deadline_at = ?, callback_deadline_at = ?, heartbeat_deadline_at = ?,
    queue_deadline_at = ?, deadline_at = ?, event_sequence = ?"""
_TRANSITION_WHERE = " WHERE id = ? AND state = ? AND event_sequence = ?"
_UPDATE_TRANSITION = _TRANSITION_SET + _TRANSITION_WHERE
# A terminal call writes the caller's result with the transition, in the same statement.
_UPDATE_CALLBACK = (
    _TRANSITION_SET + ", exit_code = ?, message = ?, outputs = ?, result = ?, callback_digest = ?,"
    " callback_key = ?" + _TRANSITION_WHERE
)
_INSERT_EVENT = """
INSERT INTO job_events (job_id, sequence, state, previous_state, failure_reason, cause, at)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""


@dataclass(frozen=True)
class _Loaded:
    """A job row with the bookkeeping columns the wire never shows."""

    job: Job
    event_sequence: int
    callback_digest: bytes | None
    callback_key: str | None


def _load(row: Sequence[Any]) -> _Loaded:
    job = Job(
        id=row[0],
        pipeline_id=row[1],
        name=row[2],
        kind=Kind(row[3]),
        is_async=bool(row[4]),
        state=State(row[5]),
        failure_reason=None if row[6] is None else FailureReason(row[6]),
        exit_code=row[7],
        message=row[8],
        outputs=None if row[9] is None else json.loads(row[9]),
        result_json=row[10],
        attempt=row[11],
        retry_of=row[12],
        spec=_SPEC.decode(row[13]),
        created_at=row[14],
        started_at=row[15],
        parked_at=row[16],
        finished_at=row[17],
        deadlines=Deadlines(execution=row[18], callback=row[19], heartbeat=row[20], queue=row[21]),
        token_nonce=row[22],
        retried=bool(row[26]),
    )
    return _Loaded(job=job, event_sequence=row[25], callback_digest=row[23], callback_key=row[24])


def _changed_job(loaded: _Loaded, change: Change, now: float, **extra: Any) -> Job:
    job = loaded.job
    return dataclasses.replace(
        job,
        state=change.state,
        failure_reason=change.failure_reason or job.failure_reason,
        started_at=job.started_at or (now if change.sets_started_at else None),
        parked_at=now if change.sets_parked_at else job.parked_at,
        finished_at=now if change.sets_finished_at else job.finished_at,
        deadlines=change.deadlines,
        **extra,
    )


def _transition_params(loaded: _Loaded, change: Change, now: float) -> tuple[Any, ...]:
    job, d = loaded.job, change.deadlines
    earliest = d.earliest()
    sequence = loaded.event_sequence + (1 if change.transitioned else 0)
    return (
        change.state.value,
        None if change.failure_reason is None else change.failure_reason.value,
        now if change.sets_started_at else None,
        now if change.sets_parked_at else None,
        now if change.sets_finished_at else None,
        d.execution,
        d.callback,
        d.heartbeat,
        d.queue,
        None if earliest is None else earliest[0],
        sequence,
        job.id,
        job.state.value,
        loaded.event_sequence,
    )


def _event_params(loaded: _Loaded, change: Change, cause: str, now: float) -> tuple[Any, ...]:
    return (
        loaded.job.id,
        loaded.event_sequence + 1,
        change.state.value,
        change.previous_state.value,
        None if change.failure_reason is None else change.failure_reason.value,
        cause,
        now,
    )


def _event_from_params(event_id: int, params: tuple[Any, ...]) -> JobEvent:
    job_id, sequence, state, previous, reason, cause, at = params
    return JobEvent(
        id=event_id,
        job_id=job_id,
        sequence=sequence,
        state=State(state),
        previous_state=None if previous is None else State(previous),
        failure_reason=None if reason is None else FailureReason(reason),
        cause=cause,
        at=at,
    )


def _write_change(
    conn: sqlite3.Connection,
    loaded: _Loaded,
    change: Change,
    cause: str,
    now: float,
    callback: ContinueCall | None = None,
) -> list[JobEvent]:
    """Compare-and-set the change (and a terminal call's result) onto the row and record its
    event; StateConflict if the row moved underneath (cannot happen under BEGIN IMMEDIATE; kept
    as the contract's guard)."""
    params = _transition_params(loaded, change, now)
    if callback is None:
        cursor = conn.execute(_UPDATE_TRANSITION, params)
    else:
        result = (
            callback.exit_code,
            callback.message,
            None if callback.outputs is None else json.dumps(callback.outputs),
            callback.result_json,
            callback.digest,
            callback.idempotency_key,
        )
        cursor = conn.execute(_UPDATE_CALLBACK, params[:-3] + result + params[-3:])
    if cursor.rowcount != 1:
        raise StateConflict("the job changed concurrently; try again")
    if not change.transitioned:
        return []
    event = _event_params(loaded, change, cause, now)
    event_id = conn.execute(_INSERT_EVENT, event).lastrowid
    assert event_id is not None
    return [_event_from_params(event_id, event)]


def _fetch_job(conn: sqlite3.Connection, where: str, *params: Any) -> _Loaded | None:
    row = conn.execute(f"{_SELECT_JOB} WHERE {where}", params).fetchone()
    return None if row is None else _load(row)


def _require_job(conn: sqlite3.Connection, job_id: str) -> _Loaded:
    loaded = _fetch_job(conn, "id = ?", job_id)
    if loaded is None:
        raise NotFound(f"no job {job_id}")
    return loaded


def _insert_job(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    spec: JobSpec,
    credential: ContinueCredential | None,
    now: float,
    attempt: int,
    retry_of: str | None,
    pipeline_id: str | None,
) -> Transition:
    state = initial_state(needs_met=True)
    lifecycle = dataclasses.replace(_blank_lifecycle(spec), state=state)
    deadlines = entry_deadlines(lifecycle, now)
    earliest = deadlines.earliest()
    conn.execute(
        """
        INSERT INTO jobs (id, pipeline_id, name, kind, is_async, state, attempt, retry_of, spec,
            created_at, execution_deadline_at, callback_deadline_at, heartbeat_deadline_at,
            queue_deadline_at, deadline_at, token_nonce, token_hash, event_sequence)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)
        """,
        (
            job_id,
            pipeline_id,
            spec.name,
            spec.kind.value,
            int(spec.is_async),
            state.value,
            attempt,
            retry_of,
            _ENCODE.encode(spec),
            now,
            deadlines.execution,
            deadlines.callback,
            deadlines.heartbeat,
            deadlines.queue,
            None if earliest is None else earliest[0],
            None if credential is None else credential.nonce,
            None if credential is None else credential.token_hash,
        ),
    )
    params = (job_id, 1, state.value, None, None, "retry" if retry_of else "created", now)
    event_id = conn.execute(_INSERT_EVENT, params).lastrowid
    assert event_id is not None
    return Transition(
        job=_require_job(conn, job_id).job, events=[_event_from_params(event_id, params)]
    )


def _blank_lifecycle(spec: JobSpec) -> Lifecycle:
    return Lifecycle(
        kind=spec.kind,
        is_async=spec.is_async,
        state=State.CREATED,
        timeout_s=spec.timeout_s,
        callback_timeout_s=spec.callback_timeout_s,
        heartbeat_timeout_s=spec.heartbeat_timeout_s,
        queue_timeout_s=spec.queue_timeout_s,
    )


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("gateway.store") / "migrations" / "sqlite"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text()))
    return sorted(found)


def migrate(conn: sqlite3.Connection, upto: int | None = None) -> int:
    """Apply the numbered migrations not yet applied (up to `upto`); return the version reached.

    Raises StoreError when the database is newer than every migration this code knows."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
        " applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
    )
    current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
    known = _migrations()
    newest = known[-1][0] if known else 0
    if current > newest:
        raise StoreError(
            f"the database schema is version {current}, newer than this gateway knows"
            f" ({newest}); upgrade the gateway"
        )
    for version, sql in known:
        if version <= current or (upto is not None and version > upto):
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in sql.split(";\n"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        current = version
    return int(current)


def configure(conn: sqlite3.Connection) -> None:
    """The pragmas every connection of ours uses."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")


class SQLiteStore:
    """The store contract on one SQLite file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self._path, isolation_level=None)
        try:
            await self._run(_configure_and_migrate)
        except BaseException:
            # A refused open must not leave aiosqlite's (non-daemon) thread behind.
            await self.close()
            raise

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the connection thread: one hop, whatever it does."""
        if self._db is None:
            raise StoreError("the store is not open")
        db = self._db
        result: T = await db._execute(fn, db._conn)  # type: ignore[no-untyped-call]
        return result

    async def _transact(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` inside BEGIN IMMEDIATE ... COMMIT on the connection thread (one hop);
        any exception rolls back, so a raising verb changes nothing."""

        def run(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self._run(run)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def claim_secret_fingerprint(self, fingerprint: str) -> None:
        def claim(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('secret_key_fingerprint', ?)",
                (fingerprint,),
            )
            stored = conn.execute(
                "SELECT value FROM meta WHERE key = 'secret_key_fingerprint'"
            ).fetchone()[0]
            if stored != fingerprint:
                raise StoreError(
                    "GATEWAY_SECRET_KEY differs from the key this database was used with;"
                    " every continue URL would break. Use the original key."
                )

        await self._transact(claim)

    async def ensure_api_token(self, name: str, token_hash: bytes, scope: str, now: float) -> None:
        def ensure(conn: sqlite3.Connection) -> None:
            conn.execute(
                """
                INSERT INTO api_tokens (id, name, token_hash, scope, created_at)
                VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (name) DO UPDATE SET token_hash = excluded.token_hash,
                    scope = excluded.scope, revoked_at = NULL
                """,
                (name, name, token_hash, scope, now),
            )

        await self._transact(ensure)

    async def find_api_token(self, token_hash: bytes) -> Principal | None:
        def find(conn: sqlite3.Connection) -> Principal | None:
            row = conn.execute(
                "SELECT id, name, scope FROM api_tokens"
                " WHERE token_hash = ? AND revoked_at IS NULL",
                (token_hash,),
            ).fetchone()
            return None if row is None else Principal(token_id=row[0], name=row[1], scope=row[2])

        return await self._run(find)

    async def create_job(
        self, job_id: str, spec: JobSpec, credential: ContinueCredential | None, now: float
    ) -> Transition:
        def create(conn: sqlite3.Connection) -> Transition:
            return _insert_job(
                conn,
                job_id=job_id,
                spec=spec,
                credential=credential,
                now=now,
                attempt=1,
                retry_of=None,
                pipeline_id=None,
            )

        return await self._transact(create)

    async def get_job(self, job_id: str) -> Job | None:
        def get(conn: sqlite3.Connection) -> Job | None:
            loaded = _fetch_job(conn, "id = ?", job_id)
            return None if loaded is None else loaded.job

        return await self._run(get)

    async def list_jobs(
        self, *, state: State | None, pipeline_id: str | None, limit: int, cursor: str | None
    ) -> Page[Job]:
        clauses, params = [], []
        if state is not None:
            clauses.append("state = ?")
            params.append(state.value)
        if pipeline_id is not None:
            clauses.append("pipeline_id = ?")
            params.append(pipeline_id)
        if cursor is not None:
            clauses.append("id < ?")
            params.append(decode_cursor(cursor, "j:"))
        where = " AND ".join(clauses) or "1"

        def page(conn: sqlite3.Connection) -> Page[Job]:
            rows = conn.execute(
                f"{_SELECT_JOB} WHERE {where} ORDER BY id DESC LIMIT ?", (*params, limit + 1)
            ).fetchall()
            jobs = [_load(row).job for row in rows[:limit]]
            more = len(rows) > limit
            return Page(items=jobs, next_cursor=encode_cursor("j:" + jobs[-1].id) if more else None)

        return await self._run(page)

    async def list_events(self, job_id: str, *, limit: int, cursor: str | None) -> Page[JobEvent]:
        after = 0
        if cursor is not None:
            key = decode_cursor(cursor, "e:")
            if not key.isdigit() or len(key) > 18:  # 18 digits always fit SQLite's INTEGER
                raise MalformedRequest("`cursor` is not one this server handed out")
            after = int(key)

        def page(conn: sqlite3.Connection) -> Page[JobEvent]:
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise NotFound(f"no job {job_id}")
            rows = conn.execute(
                "SELECT id, job_id, sequence, state, previous_state, failure_reason, cause, at"
                " FROM job_events WHERE job_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
                (job_id, after, limit + 1),
            ).fetchall()
            events = [_event_from_params(row[0], tuple(row[1:])) for row in rows[:limit]]
            more = len(rows) > limit
            cursor_out = encode_cursor(f"e:{events[-1].sequence}") if more else None
            return Page(items=events, next_cursor=cursor_out)

        return await self._run(page)

    async def read_trace(self, job_id: str, offset: int) -> bytes:
        def read(conn: sqlite3.Connection) -> bytes:
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise NotFound(f"no job {job_id}")
            rows = conn.execute(
                "SELECT offset, data FROM job_trace WHERE job_id = ? AND offset + length(data) > ?"
                " ORDER BY offset",
                (job_id, offset),
            ).fetchall()
            if not rows:
                return b""
            joined = b"".join(row[1] for row in rows)
            return joined[max(0, offset - rows[0][0]) :]

        return await self._run(read)

    async def cancel_job(self, job_id: str, now: float) -> Transition:
        def cancel(conn: sqlite3.Connection) -> Transition:
            loaded = _require_job(conn, job_id)
            change = advance(loaded.job.lifecycle, Trigger.CANCEL, now)
            events = _write_change(conn, loaded, change, "cancel", now)
            return Transition(job=_changed_job(loaded, change, now), events=events)

        return await self._transact(cancel)

    async def retry_job(
        self, job_id: str, new_id: str, credential: ContinueCredential | None, now: float
    ) -> Transition:
        def retry(conn: sqlite3.Connection) -> Transition:
            old = _require_job(conn, job_id).job
            if not old.state.terminal:
                raise StateConflict(f"only a finished job can be retried; this one is {old.state}")
            if old.retried:
                raise NotLatestAttempt("this attempt was retried already; retry the latest one")
            return _insert_job(
                conn,
                job_id=new_id,
                spec=old.spec,
                credential=credential,
                now=now,
                attempt=old.attempt + 1,
                retry_of=old.id,
                pipeline_id=old.pipeline_id,
            )

        return await self._transact(retry)

    async def find_by_continue_token(self, token_hash: bytes) -> Job | None:
        def find(conn: sqlite3.Connection) -> Job | None:
            loaded = _fetch_job(conn, "token_hash = ?", token_hash)
            return None if loaded is None else loaded.job

        return await self._run(find)

    async def consume_continue(
        self, token_hash: bytes, call: ContinueCall | GatewayError, now: float
    ) -> ContinueResult:
        def consume(conn: sqlite3.Connection) -> ContinueResult:
            loaded = _fetch_job(conn, "token_hash = ?", token_hash)
            if loaded is None:
                raise NotFound("unknown continue token")
            if isinstance(call, GatewayError):
                raise call
            job = loaded.job
            if job.state.terminal:
                if loaded.callback_digest is not None and (
                    call.digest == loaded.callback_digest
                    or (
                        call.idempotency_key is not None
                        and call.idempotency_key == loaded.callback_key
                    )
                ):
                    return ContinueResult(ContinueOutcome.REPLAYED, job, [])
                raise AlreadyFinal(job.state, job.failure_reason)
            trigger = Trigger.CALLBACK_SUCCEEDED if call.succeeded else Trigger.CALLBACK_FAILED
            change = advance(job.lifecycle, trigger, now)
            events = _write_change(conn, loaded, change, "callback", now, callback=call)
            changed = _changed_job(
                loaded,
                change,
                now,
                exit_code=call.exit_code,
                message=call.message,
                outputs=call.outputs,
                result_json=call.result_json,
            )
            return ContinueResult(ContinueOutcome.APPLIED, changed, events)

        return await self._transact(consume)

    async def touch_continue(
        self, token_hash: bytes, trigger: Trigger, log: bytes | None, now: float
    ) -> Transition:
        def touch(conn: sqlite3.Connection) -> Transition:
            loaded = _fetch_job(conn, "token_hash = ?", token_hash)
            if loaded is None:
                raise NotFound("unknown continue token")
            job = loaded.job
            effective = trigger
            if trigger is Trigger.START and job.lifecycle.flavor is not Flavor.EXTERNAL:
                effective = Trigger.HEARTBEAT
            change = advance(job.lifecycle, effective, now)
            events = _write_change(conn, loaded, change, f"continue:{trigger.value}", now)
            if log:
                size = conn.execute(
                    "SELECT trace_size FROM jobs WHERE id = ?", (job.id,)
                ).fetchone()
                conn.execute(
                    "INSERT INTO job_trace (job_id, offset, data) VALUES (?, ?, ?)",
                    (job.id, size[0], log),
                )
                conn.execute(
                    "UPDATE jobs SET trace_size = trace_size + ? WHERE id = ?", (len(log), job.id)
                )
            return Transition(job=_changed_job(loaded, change, now), events=events)

        return await self._transact(touch)

    async def expire_overdue(self, now: float, limit: int) -> Sweep:
        def expire(conn: sqlite3.Connection) -> Sweep:
            rows = conn.execute(
                f"{_SELECT_JOB} WHERE deadline_at <= ? ORDER BY deadline_at LIMIT ?", (now, limit)
            ).fetchall()
            if not rows:
                return Sweep(events=[], oldest_deadline_at=None)
            updates, inserts = [], []
            oldest = None
            for row in rows:
                loaded = _load(row)
                oldest = loaded.job.deadline_at if oldest is None else oldest
                change = advance(loaded.job.lifecycle, Trigger.DEADLINE, now)
                updates.append(_transition_params(loaded, change, now))
                inserts.append(_event_params(loaded, change, "deadline", now))
            cursor = conn.executemany(_UPDATE_TRANSITION, updates)
            if cursor.rowcount != len(updates):
                raise StateConflict("a due job changed concurrently; the sweep retries")
            conn.executemany(_INSERT_EVENT, inserts)
            last = conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'job_events'"
            ).fetchone()[0]
            first = last - len(inserts) + 1
            events = [_event_from_params(first + i, p) for i, p in enumerate(inserts)]
            return Sweep(events=events, oldest_deadline_at=oldest)

        return await self._transact(expire)


def _configure_and_migrate(conn: sqlite3.Connection) -> int:
    configure(conn)
    return migrate(conn)
