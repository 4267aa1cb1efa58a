"""The store contract: persistence in domain verbs. Route handlers never see SQL.

Every mutating verb is one transaction that loads the job, asks the pure state machine
(`gateway.states.advance`) for the change, writes it compare-and-set on the job's state and event
sequence, and records the transition in the job's event history in the same transaction. A backend
runs each verb in one round trip to its database where it can.

Errors raised: NotFound, AlreadyFinal, NotReady, IllegalTransition, NotLatestAttempt,
StateConflict (see `gateway.errors`). Nothing is changed when a verb raises.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from gateway.artifacts import ArtifactUpload
from gateway.config import (
    DEFAULT_CONFIRM_TIMEOUT_S,
    DEFAULT_RUNNER_HEARTBEAT_TIMEOUT_S,
    DEFAULT_WEBHOOK_INLINE_BYTES,
)
from gateway.errors import GatewayError, MalformedRequest
from gateway.models import (
    ApiToken,
    Artifact,
    ContinueCall,
    Delivery,
    DeliveryClaim,
    Endpoint,
    EndpointPatch,
    EndpointSpec,
    HandOut,
    Job,
    JobEvent,
    JobSpec,
    Page,
    Pipeline,
    PipelineEvent,
    PipelineSpec,
    PipelineView,
    Principal,
    Runner,
    RunnerSpec,
    StreamEvent,
)
from gateway.pipelines import PipelineState
from gateway.states import FailureReason, State, Trigger
from gateway.tokens import ContinueCredential


class Signal(StrEnum):
    """What a commit may have changed for processes waiting on the database."""

    PENDING = "pending"  # a job became pending: long polls look again
    DELIVERIES = "deliveries"  # webhook deliveries were queued: the dispatcher looks again
    EVENTS = "events"  # events were logged: event streams read on


class ContinueOutcome(StrEnum):
    APPLIED = "applied"  # this call finished the job
    REPLAYED = "replayed"  # an exact repeat of the call that finished it
    DEFERRED = "deferred"  # an early call, kept until the async script exits 0


@dataclass(frozen=True)
class Policy:
    """Server-wide timings the store applies to every job."""

    confirm_timeout_s: int = DEFAULT_CONFIRM_TIMEOUT_S
    runner_timeout_s: int = DEFAULT_RUNNER_HEARTBEAT_TIMEOUT_S
    inline_bytes: int = DEFAULT_WEBHOOK_INLINE_BYTES  # artifacts inlined in a terminal event


class Minter(Protocol):
    def mint(self, job_id: str) -> ContinueCredential:
        """A new continue credential for `job_id`'s attempt."""


@dataclass(frozen=True)
class Changes:
    """Everything one verb recorded: job events (cascades into other jobs of a pipeline
    included), pipeline events, and the continue credentials it minted (by job id)."""

    events: list[JobEvent] = field(default_factory=list)
    pipeline_events: list[PipelineEvent] = field(default_factory=list)
    credentials: dict[str, ContinueCredential] = field(default_factory=dict)
    requeued: int = 0
    deliveries: int = 0
    logged: int = 0

    @property
    def makes_jobs_pending(self) -> bool:
        """Whether runners waiting for work should look again."""
        return self.requeued > 0 or any(e.state is State.PENDING for e in self.events)

    @property
    def signals(self) -> frozenset[Signal]:
        """Who should look at the database again now that this is committed."""
        signals = set()
        if self.makes_jobs_pending:
            signals.add(Signal.PENDING)
        if self.deliveries:
            signals.add(Signal.DELIVERIES)
        if self.logged:
            signals.add(Signal.EVENTS)
        return frozenset(signals)


@dataclass(frozen=True)
class Transition:
    """A job after a verb, and what the verb recorded (no events when only deadlines moved)."""

    job: Job
    changes: Changes

    @property
    def events(self) -> list[JobEvent]:
        return self.changes.events


@dataclass(frozen=True)
class ContinueResult:
    outcome: ContinueOutcome
    job: Job
    changes: Changes

    @property
    def events(self) -> list[JobEvent]:
        return self.changes.events


@dataclass(frozen=True)
class PipelineResult:
    view: PipelineView
    changes: Changes


@dataclass(frozen=True)
class TraceAppend:
    job: Job
    size: int
    changes: Changes


@dataclass(frozen=True)
class ArtifactStored:
    """An upload kept: the job after it (its artifacts listed), and what was stored."""

    job: Job
    artifact: Artifact
    changes: Changes


@dataclass(frozen=True)
class ArtifactBlob:
    artifact: Artifact
    data: bytes


@dataclass(frozen=True)
class Pruned:
    """What one retention batch deleted; `more` when it stopped at its limit."""

    jobs: int
    pipelines: int
    more: bool


@dataclass(frozen=True)
class AttemptOutcome:
    """What the dispatcher learned from one attempt and decided about the next."""

    status_code: int | None
    duration_ms: float
    error: str | None
    response_snippet: str | None
    succeeded: bool
    next_attempt_at: float | None  # None: no more attempts
    disable_reason: str | None  # the endpoint must stop receiving (410)


@dataclass(frozen=True)
class Sweep:
    """What one sweep batch did, and how late the oldest deadline it fired was."""

    changes: Changes
    fired: int
    oldest_deadline_at: float | None

    @property
    def events(self) -> list[JobEvent]:
        return self.changes.events


class Store(Protocol):
    async def open(self) -> None:
        """Connect and migrate; raises StoreError for a schema newer than this code."""

    async def close(self) -> None: ...

    def subscribe(self, on_signals: Callable[[frozenset[Signal]], None]) -> None:
        """Before `open`: have `on_signals` called with what other processes sharing the
        database announce (never called when none can share it)."""

    def announce(self, signals: frozenset[Signal]) -> None:
        """Tell the other processes sharing the database what a commit changed (best effort,
        never blocks; a no-op when none can share it)."""

    async def ping(self) -> None:
        """Raise when the database cannot answer."""

    async def clock_offset(self) -> float:
        """Seconds by which the database's clock is ahead of this host's (0.0 for an embedded
        database, whose clock is the host's)."""

    async def claim_secret_fingerprints(self, fingerprints: Mapping[str, str]) -> None:
        """Remember the fingerprint of each secret (by the variable that sets it); StoreError
        when one differs from what this database was used with before."""

    async def ensure_api_token(self, name: str, token_hash: bytes, scope: str, now: float) -> None:
        """Store a bearer token's hash under `name` (replacing an older one of that name)."""

    async def find_api_token(self, token_hash: bytes) -> Principal | None: ...

    async def create_api_token(
        self, token_id: str, name: str, token_hash: bytes, scope: str, now: float
    ) -> ApiToken:
        """A new live token (`admin` or `viewer`); StateConflict when a live one has `name`
        (a revoked token's name is taken over)."""

    async def list_api_tokens(self, *, limit: int, cursor: str | None) -> Page[ApiToken]:
        """Every token, revoked ones included (with `revoked_at`)."""

    async def find_api_token_by_id(self, token_id: str) -> ApiToken | None:
        """The live token with this id (a dashboard session names its token by id)."""

    async def revoke_api_token(self, token_id: str, now: float) -> None:
        """NotFound for an unknown or revoked token; StateConflict for the bootstrap admin."""

    async def list_parked(self, limit: int) -> list[Job]:
        """Up to `limit` jobs whose callback is awaited (an external job pending or running,
        an async job waiting), oldest first."""

    async def create_job(
        self, job_id: str, spec: JobSpec, minter: Minter, now: float
    ) -> Transition:
        """Insert a new standalone job, pending, with its first event (and for an external job
        its continue credential, in `changes.credentials`)."""

    async def get_job(self, job_id: str) -> Job | None: ...

    async def list_jobs(
        self,
        *,
        state: State | None,
        pipeline_id: str | None,
        limit: int,
        cursor: str | None,
        standalone: bool = False,
    ) -> Page[Job]:
        """Newest first; `standalone`: only jobs outside pipelines."""

    async def list_events(self, job_id: str, *, limit: int, cursor: str | None) -> Page[JobEvent]:
        """Oldest first (by sequence); NotFound for an unknown job."""

    async def read_trace(self, job_id: str, offset: int) -> bytes:
        """The trace from byte `offset`; NotFound for an unknown job."""

    async def cancel_job(self, job_id: str, now: float) -> Transition: ...

    async def retry_job(
        self, job_id: str, new_id: Callable[[], str], minter: Minter, now: float
    ) -> Transition:
        """A new attempt of a terminal job that has not been retried yet; in a pipeline, the
        downstream jobs it had skipped get new attempts too (their events in `changes`)."""

    async def find_by_continue_token(self, token_hash: bytes) -> Job | None: ...

    async def consume_continue(
        self, token_hash: bytes, call: ContinueCall | GatewayError, now: float
    ) -> ContinueResult:
        """The terminal call. `call` is the parsed body, or the error parsing it raised, which
        is raised only once the token is known to be valid (token errors come first)."""

    async def touch_continue(
        self, token_hash: bytes, trigger: Trigger, log: bytes | None, now: float
    ) -> Transition:
        """A non-terminal call (START or HEARTBEAT, with `log` appended to the trace)."""

    async def expire_overdue(self, now: float, limit: int) -> Sweep:
        """Fire up to `limit` due deadlines, earliest first: fail the job, or put a hand-out
        nobody confirmed back in the queue."""

    async def put_artifact(
        self, token_hash: bytes, upload: ArtifactUpload, now: float
    ) -> ArtifactStored:
        """An upload through the continue URL: a heartbeat (the job's state decides, as for
        `/log`: AlreadyFinal once terminal, NotReady before its needs are met) that also keeps
        the artifact, replacing one of the same name; while an async script still runs it is
        kept and nothing else moves. NotFound for an unknown token."""

    async def put_runner_artifact(
        self, job_id: str, job_token_hash: bytes, upload: ArtifactUpload, now: float
    ) -> ArtifactStored:
        """An upload by the job's runner while it runs (a runner ping). Forbidden for a token
        that is not this job's; AlreadyFinal once terminal, IllegalTransition otherwise."""

    async def get_artifact(self, job_id: str, name: str) -> ArtifactBlob | None:
        """The artifact with its bytes; None when the job or the artifact does not exist."""

    async def prune(self, before: float, limit: int, now: float) -> Pruned:
        """Delete, in one short transaction, up to `limit` terminal standalone jobs finished
        before `before` (each with its earlier attempts) and finished pipelines (with all their
        jobs, up to about `limit` jobs), with everything they own: events, traces, artifacts,
        webhook messages, deliveries, attempts and implicit endpoints. A job with a delivery
        leased right now waits for the next batch."""

    async def create_pipeline(
        self,
        pipeline_id: str,
        spec: PipelineSpec,
        job_ids: dict[str, str],
        minter: Minter,
        now: float,
    ) -> PipelineResult:
        """Insert a pipeline and its jobs (pending when they need nothing, else created)."""

    async def get_pipeline(self, pipeline_id: str) -> PipelineView | None: ...

    async def list_pipelines(
        self, *, state: PipelineState | None, limit: int, cursor: str | None
    ) -> Page[Pipeline]:
        """Newest first."""

    async def cancel_pipeline(self, pipeline_id: str, now: float) -> PipelineResult: ...

    async def create_runner(
        self, runner_id: str, spec: RunnerSpec, token_hash: bytes, now: float
    ) -> Runner: ...

    async def list_runners(self, *, limit: int, cursor: str | None) -> Page[Runner]: ...

    async def revoke_runner(self, runner_id: str, now: float) -> None:
        """NotFound for an unknown or already revoked runner."""

    async def find_runner(self, token_hash: bytes) -> Runner | None: ...

    async def claim_job(
        self, runner: Runner, job_token_hash: bytes, minter: Minter, now: float
    ) -> HandOut | None:
        """Hand the oldest pending job this runner can run to it (exactly once), or None."""

    async def confirm_job(self, job_id: str, job_token_hash: bytes, now: float) -> Transition:
        """`PUT {"state": "running"}`: confirms a hand-out, or is a keepalive while running.
        Forbidden for a token that is not this job's."""

    async def append_trace(
        self, job_id: str, job_token_hash: bytes, start: int, data: bytes, now: float
    ) -> TraceAppend:
        """Append at byte `start`; RangeNotSatisfiable (with the current size) otherwise."""

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
        """The script's exit; an async job that exited 0 parks (and takes an early call)."""

    async def create_endpoint(
        self, endpoint_id: str, spec: EndpointSpec, secret: str, now: float
    ) -> Endpoint: ...

    async def get_endpoint(self, endpoint_id: str) -> Endpoint:
        """NotFound for an unknown or deleted (or implicit) endpoint."""

    async def list_endpoints(self, *, limit: int, cursor: str | None) -> Page[Endpoint]: ...

    async def update_endpoint(
        self, endpoint_id: str, patch: EndpointPatch, now: float
    ) -> Endpoint: ...

    async def delete_endpoint(self, endpoint_id: str, now: float) -> None:
        """Its pending deliveries become skipped."""

    async def rotate_secret(
        self, endpoint_id: str, secret: str, old_signs_until: float, now: float
    ) -> Endpoint: ...

    async def list_deliveries(
        self,
        *,
        endpoint_id: str | None = None,
        job_id: str | None = None,
        limit: int,
        cursor: str | None,
    ) -> Page[Delivery]:
        """Newest first, with attempts; of one endpoint or of one job."""

    async def redeliver(self, delivery_id: str, now: float) -> Delivery:
        """A new delivery of the same message (StateConflict on a disabled endpoint)."""

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
        """Lease up to `limit` due deliveries, earliest first, at most `per_destination` minus
        `in_flight[receiver]` to each receiver (a delivery's `destination`)."""

    async def record_attempts(
        self,
        results: Sequence[tuple[DeliveryClaim, AttemptOutcome]],
        disable_after_s: float,
        now: float,
    ) -> None:
        """Log attempts (in the order they ended) and move their deliveries on, in one
        transaction."""

    async def stream_head(self) -> int:
        """The sequence of the newest event in the log (0 when empty)."""

    async def read_stream(
        self, after: int, *, pipeline_id: str | None, job_id: str | None, limit: int
    ) -> list[StreamEvent]:
        """Events after `after`, oldest first; `job_id` follows the job's later attempts."""


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, prefix: str) -> str:
    """The key inside an opaque cursor; MalformedRequest for anything this store did not make."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        key = base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        raise MalformedRequest("`cursor` is not one this server handed out") from None
    if not key.startswith(prefix) or len(key) > 64:
        raise MalformedRequest("`cursor` is not one this server handed out")
    return key.removeprefix(prefix)
