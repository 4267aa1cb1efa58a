"""The store contract over the shared verbs: every public method runs one verb, a write through
`_transact` (one transaction, retried or group-committed as the backend sees fit), a read
through `_run`. A backend supplies those two, `open`, `close` and its `Dialect`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

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
    Signal,
    Sweep,
    TraceAppend,
    Transition,
    decode_cursor,
)
from gateway.store.verbs import (
    artifacts,
    jobs,
    pipelines,
    retention,
    runners,
    stream,
    tokens,
    webhooks,
)
from gateway.store.verbs.connection import Connection, Dialect
from gateway.store.verbs.outbox import EndpointCache
from gateway.store.verbs.tx import Tx

T = TypeVar("T")
_MAX_CURSOR_DIGITS = 18  # always fits a 64-bit integer column


class VerbStore(ABC):
    """The store contract (`gateway.store.base.Store`) on the shared verbs."""

    dialect: Dialect

    def __init__(self, policy: Policy | None = None, links: ArtifactLinks | None = None) -> None:
        """`links` sign the artifact URLs of terminal events (without, those carry none)."""
        self._policy = policy or Policy()
        self._links = links
        self._ids = IdGenerator()
        self._endpoints = EndpointCache()

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def subscribe(self, on_signals: Callable[[frozenset[Signal]], None]) -> None: ...

    @abstractmethod
    def announce(self, signals: frozenset[Signal]) -> None: ...

    @abstractmethod
    async def clock_offset(self) -> float: ...

    @abstractmethod
    async def _run(self, fn: Callable[[Connection], T]) -> T:
        """Run the read `fn` on a connection and return what it returns."""

    @abstractmethod
    async def _transact(self, verb: Callable[[Tx], T], now: float) -> T:
        """Run `verb` in one transaction and return once it is committed; a verb that raises
        changes nothing."""

    def _tx(self, conn: Connection, now: float) -> Tx:
        """The `Tx` of one run of a verb at `now`."""
        ids = self._ids
        return Tx(
            conn,
            self._policy,
            now,
            lambda: ids.new(now),
            self._links,
            self._endpoints,
            self.dialect,
        )

    def _reader(self, conn: Connection) -> Tx:
        """A `Tx` for reads that use its helpers (it may not make ids)."""
        return Tx(conn, self._policy, 0.0, _no_ids, dialect=self.dialect)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- server ----------------------------------------------------------------------------

    async def claim_secret_fingerprints(self, fingerprints: Mapping[str, str]) -> None:
        def claim(tx: Tx) -> None:
            for variable, fingerprint in fingerprints.items():
                key = variable.removeprefix("GATEWAY_").lower() + "_fingerprint"
                tx.conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                    (key, fingerprint),
                )
                stored = tx.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
                if stored[0] != fingerprint:
                    raise StoreError(
                        f"{variable} differs from the one this database was used with (every"
                        " replica must use the same, and what was signed with the first would"
                        " no longer verify); start with the original"
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
        def find(conn: Connection) -> Principal | None:
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
        def page(conn: Connection) -> Page[Job]:
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

        return await self._run(lambda conn: get(self._reader(conn)))

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
        in_flight: Mapping[str, int],
        per_destination: int,
        now: float,
    ) -> list[DeliveryClaim]:
        return await self._transact(
            lambda tx: webhooks.claim_deliveries(
                tx,
                limit=limit,
                lease_s=lease_s,
                server_secret=server_secret,
                in_flight=in_flight,
                per_destination=per_destination,
            ),
            now,
        )

    async def record_attempts(
        self,
        results: Sequence[tuple[DeliveryClaim, AttemptOutcome]],
        disable_after_s: float,
        now: float,
    ) -> None:
        await self._transact(lambda tx: webhooks.record_attempts(tx, results, disable_after_s), now)

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
                self._reader(conn),
                after,
                pipeline_id=pipeline_id,
                job_id=job_id,
                limit=limit,
            )
        )


def _no_ids() -> str:
    raise StoreError("a read-only verb made an id")
