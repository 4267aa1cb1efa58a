"""The embedded store: SQLite in WAL mode through aiosqlite.

Every verb is a plain function run on aiosqlite's connection thread in one hop: `_transact`
wraps it in BEGIN IMMEDIATE ... COMMIT with a `Tx` for its bookkeeping. One aiosqlite call costs
about 120 us on our machine kind, so a verb made of several awaits would cap the hot path near
1.1k/s; one hop per transaction keeps it near the speed of SQLite itself. The connection thread
runs one function at a time, so transactions never interleave
(docs/decisions/0002-one-hop-transactions.md).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from gateway.artifacts import ArtifactLinks, ArtifactUpload
from gateway.errors import GatewayError, MalformedRequest, StoreError
from gateway.models import (
    ApiToken,
    ContinueCall,
    Delivery,
    DeliveryClaim,
    Endpoint,
    EndpointPatch,
    EndpointSpec,
    HandOut,
    IdGenerator,
    Job,
    JobEvent,
    JobSpec,
    Page,
    Pipeline,
    PipelineSpec,
    PipelineView,
    Principal,
    Runner,
    RunnerSpec,
    StreamEvent,
)
from gateway.pipelines import PipelineState
from gateway.states import FailureReason, State, Trigger
from gateway.store.base import (
    ArtifactBlob,
    ArtifactStored,
    AttemptOutcome,
    ContinueResult,
    Minter,
    PipelineResult,
    Policy,
    Pruned,
    Sweep,
    TraceAppend,
    Transition,
    decode_cursor,
)
from gateway.store.sqlite import (
    artifacts,
    jobs,
    pipelines,
    retention,
    runners,
    stream,
    tokens,
    webhooks,
)
from gateway.store.sqlite.outbox import EndpointCache
from gateway.store.sqlite.schema import configure, migrate
from gateway.store.sqlite.tx import Tx

T = TypeVar("T")
GROUP_COMMIT_MAX = 64  # verbs in one transaction at most
_MAX_CURSOR_DIGITS = 18  # always fits SQLite's INTEGER


class SQLiteStore:
    """The store contract on one SQLite file."""

    def __init__(
        self, path: Path, policy: Policy | None = None, links: ArtifactLinks | None = None
    ) -> None:
        """`links` sign the artifact URLs of terminal events (without, those carry none)."""
        self._path = path
        self._policy = policy or Policy()
        self._links = links
        self._ids = IdGenerator()
        self._endpoints = EndpointCache()
        self._pending: deque[tuple[Callable[[Tx], Any], float, asyncio.Future[Any]]] = deque()
        self._flush_scheduled = False
        self._flushes: set[asyncio.Future[None]] = set()
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

    async def _transact(self, verb: Callable[[Tx], T], now: float) -> T:
        """Run `verb` atomically on the connection thread and return once it is committed; a
        verb that raises changes nothing.

        Group commit: verbs that queue up while the thread is busy run in one transaction, each
        inside its own SAVEPOINT (rolled back alone when it raises), and are all answered after
        the one COMMIT. Under load one commit then serves many callbacks instead of one."""
        if self._db is None:
            raise StoreError("the store is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((verb, now, future))
        self._schedule_flush()
        result: T = await future
        return result

    def _schedule_flush(self) -> None:
        """On the loop: make sure a flush is queued on the connection thread."""
        if self._flush_scheduled or self._db is None:
            return
        self._flush_scheduled = True
        db = self._db
        flush = asyncio.ensure_future(db._execute(self._flush, db._conn))  # type: ignore[no-untyped-call]
        self._flushes.add(flush)
        flush.add_done_callback(self._flushes.discard)

    def _flush(self, conn: sqlite3.Connection) -> None:
        """On the connection thread: run the queued verbs (at most GROUP_COMMIT_MAX) in one
        transaction, then settle their futures on the loop."""
        self._flush_scheduled = False  # before draining: a verb queued from now on reschedules
        batch: list[tuple[Callable[[Tx], Any], float, asyncio.Future[Any]]] = []
        while self._pending and len(batch) < GROUP_COMMIT_MAX:
            batch.append(self._pending.popleft())
        if not batch:
            return
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for verb, now, future in batch:
                conn.execute("SAVEPOINT verb")
                try:
                    tx = Tx(
                        conn, self._policy, now, self._id_maker(now), self._links, self._endpoints
                    )
                    result = verb(tx)
                    tx.finish()
                    outcomes.append((future, result, None))
                    conn.execute("RELEASE verb")
                except Exception as exc:
                    conn.execute("ROLLBACK TO verb")
                    conn.execute("RELEASE verb")
                    outcomes.append((future, None, exc))
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(future, None, exc) for _, _, future in batch]
        for future, result, error in outcomes:
            future.get_loop().call_soon_threadsafe(_settle, future, result, error)
        if self._pending:
            batch[0][2].get_loop().call_soon_threadsafe(self._schedule_flush)

    def _id_maker(self, now: float) -> Callable[[], str]:
        ids = self._ids
        return lambda: ids.new(now)

    @staticmethod
    def _no_ids() -> str:
        raise StoreError("a read-only verb made an id")

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- server ----------------------------------------------------------------------------

    async def claim_secret_fingerprint(self, fingerprint: str) -> None:
        def claim(tx: Tx) -> None:
            tx.conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('secret_key_fingerprint', ?)",
                (fingerprint,),
            )
            stored = tx.conn.execute(
                "SELECT value FROM meta WHERE key = 'secret_key_fingerprint'"
            ).fetchone()[0]
            if stored != fingerprint:
                raise StoreError(
                    "GATEWAY_SECRET_KEY differs from the key this database was used with;"
                    " every continue URL would break. Use the original key."
                )

        await self._transact(claim, 0.0)

    async def ensure_api_token(self, name: str, token_hash: bytes, scope: str, now: float) -> None:
        def ensure(tx: Tx) -> None:
            tx.conn.execute(
                "INSERT INTO api_tokens (id, name, token_hash, scope, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                " token_hash = excluded.token_hash, scope = excluded.scope, revoked_at = NULL",
                (name, name, token_hash, scope, now),
            )

        await self._transact(ensure, now)

    async def find_api_token(self, token_hash: bytes) -> Principal | None:
        def find(conn: sqlite3.Connection) -> Principal | None:
            row = conn.execute(
                "SELECT id, name, scope FROM api_tokens"
                " WHERE token_hash = ? AND revoked_at IS NULL",
                (token_hash,),
            ).fetchone()
            return None if row is None else Principal(token_id=row[0], name=row[1], scope=row[2])

        return await self._run(find)

    async def create_api_token(
        self, token_id: str, name: str, token_hash: bytes, scope: str, now: float
    ) -> ApiToken:
        return await self._transact(
            lambda tx: tokens.create_api_token(tx, token_id, name, token_hash, scope), now
        )

    async def list_api_tokens(self, *, limit: int, cursor: str | None) -> Page[ApiToken]:
        return await self._run(
            lambda conn: tokens.list_api_tokens(conn, limit=limit, cursor=cursor)
        )

    async def find_api_token_by_id(self, token_id: str) -> ApiToken | None:
        return await self._run(lambda conn: tokens.find_api_token_by_id(conn, token_id))

    async def revoke_api_token(self, token_id: str, now: float) -> None:
        await self._transact(lambda tx: tokens.revoke_api_token(tx, token_id), now)

    # -- jobs ------------------------------------------------------------------------------

    async def create_job(
        self, job_id: str, spec: JobSpec, minter: Minter, now: float
    ) -> Transition:
        return await self._transact(lambda tx: jobs.create_job(tx, job_id, spec, minter), now)

    async def get_job(self, job_id: str) -> Job | None:
        return await self._run(lambda conn: jobs.get_job(conn, job_id))

    async def list_jobs(
        self,
        *,
        state: State | None,
        pipeline_id: str | None,
        limit: int,
        cursor: str | None,
        standalone: bool = False,
    ) -> Page[Job]:
        def page(conn: sqlite3.Connection) -> Page[Job]:
            return jobs.list_jobs(
                conn,
                state=state,
                pipeline_id=pipeline_id,
                limit=limit,
                cursor=cursor,
                standalone=standalone,
            )

        return await self._run(page)

    async def list_parked(self, limit: int) -> list[Job]:
        return await self._run(lambda conn: jobs.list_parked(conn, limit))

    async def list_events(self, job_id: str, *, limit: int, cursor: str | None) -> Page[JobEvent]:
        after = 0
        if cursor is not None:
            key = decode_cursor(cursor, "e:")
            if not key.isdigit() or len(key) > _MAX_CURSOR_DIGITS:
                raise MalformedRequest("`cursor` is not one this server handed out")
            after = int(key)
        return await self._run(
            lambda conn: jobs.list_events(conn, job_id, after=after, limit=limit)
        )

    async def read_trace(self, job_id: str, offset: int) -> bytes:
        return await self._run(lambda conn: jobs.read_trace(conn, job_id, offset))

    async def cancel_job(self, job_id: str, now: float) -> Transition:
        def cancel(tx: Tx) -> Transition:
            transition = jobs.cancel_job(tx, job_id)
            tx.settle()
            return Transition(job=transition.job, changes=tx.changes())

        return await self._transact(cancel, now)

    async def retry_job(
        self, job_id: str, new_id: Callable[[], str], minter: Minter, now: float
    ) -> Transition:
        return await self._transact(lambda tx: jobs.retry_job(tx, job_id, new_id, minter), now)

    async def find_by_continue_token(self, token_hash: bytes) -> Job | None:
        return await self._run(lambda conn: jobs.find_by_continue_token(conn, token_hash))

    async def consume_continue(
        self, token_hash: bytes, call: ContinueCall | GatewayError, now: float
    ) -> ContinueResult:
        return await self._transact(lambda tx: jobs.consume_continue(tx, token_hash, call), now)

    async def touch_continue(
        self, token_hash: bytes, trigger: Trigger, log: bytes | None, now: float
    ) -> Transition:
        return await self._transact(
            lambda tx: jobs.touch_continue(tx, token_hash, trigger, log), now
        )

    async def expire_overdue(self, now: float, limit: int) -> Sweep:
        return await self._transact(lambda tx: jobs.expire_overdue(tx, limit), now)

    # -- artifacts and retention -----------------------------------------------------------

    async def put_artifact(
        self, token_hash: bytes, upload: ArtifactUpload, now: float
    ) -> ArtifactStored:
        return await self._transact(
            lambda tx: artifacts.put_by_continue(tx, token_hash, upload), now
        )

    async def put_runner_artifact(
        self, job_id: str, job_token_hash: bytes, upload: ArtifactUpload, now: float
    ) -> ArtifactStored:
        return await self._transact(
            lambda tx: artifacts.put_by_runner(tx, job_id, job_token_hash, upload), now
        )

    async def get_artifact(self, job_id: str, name: str) -> ArtifactBlob | None:
        return await self._run(lambda conn: artifacts.get_artifact(conn, job_id, name))

    async def prune(self, before: float, limit: int, now: float) -> Pruned:
        return await self._transact(lambda tx: retention.prune(tx, before, limit), now)

    # -- pipelines -------------------------------------------------------------------------

    async def create_pipeline(
        self,
        pipeline_id: str,
        spec: PipelineSpec,
        job_ids: dict[str, str],
        minter: Minter,
        now: float,
    ) -> PipelineResult:
        return await self._transact(
            lambda tx: pipelines.create_pipeline(tx, pipeline_id, spec, job_ids, minter), now
        )

    async def get_pipeline(self, pipeline_id: str) -> PipelineView | None:
        def get(tx: Tx) -> PipelineView | None:
            row = tx.conn.execute("SELECT 1 FROM pipelines WHERE id = ?", (pipeline_id,)).fetchone()
            return None if row is None else pipelines.view(tx, pipeline_id)

        return await self._run(lambda conn: get(Tx(conn, self._policy, 0.0, self._no_ids)))

    async def list_pipelines(
        self, *, state: PipelineState | None, limit: int, cursor: str | None
    ) -> Page[Pipeline]:
        return await self._run(
            lambda conn: pipelines.list_pipelines(conn, state=state, limit=limit, cursor=cursor)
        )

    async def cancel_pipeline(self, pipeline_id: str, now: float) -> PipelineResult:
        return await self._transact(lambda tx: pipelines.cancel_pipeline(tx, pipeline_id), now)

    # -- runners ---------------------------------------------------------------------------

    async def create_runner(
        self, runner_id: str, spec: RunnerSpec, token_hash: bytes, now: float
    ) -> Runner:
        return await self._transact(
            lambda tx: runners.create_runner(tx, runner_id, spec, token_hash), now
        )

    async def list_runners(self, *, limit: int, cursor: str | None) -> Page[Runner]:
        return await self._run(lambda conn: runners.list_runners(conn, limit=limit, cursor=cursor))

    async def revoke_runner(self, runner_id: str, now: float) -> None:
        await self._transact(lambda tx: runners.revoke_runner(tx, runner_id), now)

    async def find_runner(self, token_hash: bytes) -> Runner | None:
        return await self._run(lambda conn: runners.find_runner(conn, token_hash))

    async def claim_job(
        self, runner: Runner, job_token_hash: bytes, minter: Minter, now: float
    ) -> HandOut | None:
        return await self._transact(
            lambda tx: runners.claim_job(tx, runner, job_token_hash, minter), now
        )

    async def confirm_job(self, job_id: str, job_token_hash: bytes, now: float) -> Transition:
        return await self._transact(lambda tx: runners.confirm_job(tx, job_id, job_token_hash), now)

    async def append_trace(
        self, job_id: str, job_token_hash: bytes, start: int, data: bytes, now: float
    ) -> TraceAppend:
        return await self._transact(
            lambda tx: runners.append_trace(tx, job_id, job_token_hash, start, data), now
        )

    async def finish_script(
        self,
        job_id: str,
        job_token_hash: bytes,
        *,
        succeeded: bool,
        exit_code: int | None,
        reason: FailureReason | None,
        now: float,
    ) -> Transition:
        return await self._transact(
            lambda tx: runners.finish_script(
                tx,
                job_id,
                job_token_hash,
                succeeded=succeeded,
                exit_code=exit_code,
                reason=reason,
            ),
            now,
        )

    # -- webhooks --------------------------------------------------------------------------

    async def create_endpoint(
        self, endpoint_id: str, spec: EndpointSpec, secret: str, now: float
    ) -> Endpoint:
        return await self._transact(
            lambda tx: webhooks.create_endpoint(tx, endpoint_id, spec, secret), now
        )

    async def get_endpoint(self, endpoint_id: str) -> Endpoint:
        return await self._run(lambda conn: webhooks.get_endpoint(conn, endpoint_id))

    async def list_endpoints(self, *, limit: int, cursor: str | None) -> Page[Endpoint]:
        return await self._run(
            lambda conn: webhooks.list_endpoints(conn, limit=limit, cursor=cursor)
        )

    async def update_endpoint(self, endpoint_id: str, patch: EndpointPatch, now: float) -> Endpoint:
        return await self._transact(
            lambda tx: webhooks.update_endpoint(tx, endpoint_id, patch), now
        )

    async def delete_endpoint(self, endpoint_id: str, now: float) -> None:
        await self._transact(lambda tx: webhooks.delete_endpoint(tx, endpoint_id), now)

    async def rotate_secret(
        self, endpoint_id: str, secret: str, old_signs_until: float, now: float
    ) -> Endpoint:
        return await self._transact(
            lambda tx: webhooks.rotate_secret(tx, endpoint_id, secret, old_signs_until), now
        )

    async def list_deliveries(
        self,
        *,
        endpoint_id: str | None = None,
        job_id: str | None = None,
        limit: int,
        cursor: str | None,
    ) -> Page[Delivery]:
        return await self._run(
            lambda conn: webhooks.list_deliveries(
                conn, endpoint_id=endpoint_id, job_id=job_id, limit=limit, cursor=cursor
            )
        )

    async def redeliver(self, delivery_id: str, now: float) -> Delivery:
        return await self._transact(lambda tx: webhooks.redeliver(tx, delivery_id), now)

    async def claim_deliveries(
        self,
        *,
        limit: int,
        lease_s: float,
        server_secret: str,
        busy_endpoints: list[str],
        now: float,
    ) -> list[DeliveryClaim]:
        return await self._transact(
            lambda tx: webhooks.claim_deliveries(
                tx,
                limit=limit,
                lease_s=lease_s,
                server_secret=server_secret,
                busy_endpoints=busy_endpoints,
            ),
            now,
        )

    async def record_attempt(
        self, claim: DeliveryClaim, outcome: AttemptOutcome, disable_after_s: float, now: float
    ) -> None:
        await self._transact(
            lambda tx: webhooks.record_attempt(tx, claim, outcome, disable_after_s), now
        )

    async def next_delivery_due(self) -> float | None:
        return await self._run(webhooks.next_due)

    # -- event stream ----------------------------------------------------------------------

    async def stream_head(self) -> int:
        return await self._run(stream.stream_head)

    async def read_stream(
        self, after: int, *, pipeline_id: str | None, job_id: str | None, limit: int
    ) -> list[StreamEvent]:
        return await self._run(
            lambda conn: stream.read_stream(
                Tx(conn, self._policy, 0.0, self._no_ids),
                after,
                pipeline_id=pipeline_id,
                job_id=job_id,
                limit=limit,
            )
        )


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _configure_and_migrate(conn: sqlite3.Connection) -> int:
    configure(conn)
    return migrate(conn)
