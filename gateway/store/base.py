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
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from gateway.errors import GatewayError, MalformedRequest
from gateway.models import ContinueCall, Job, JobEvent, JobSpec, Page, Principal
from gateway.states import State, Trigger
from gateway.tokens import ContinueCredential


class ContinueOutcome(StrEnum):
    APPLIED = "applied"  # this call finished the job
    REPLAYED = "replayed"  # an exact repeat of the call that finished it


@dataclass(frozen=True)
class Transition:
    """A job after a verb, and the events the verb recorded (empty when only deadlines moved)."""

    job: Job
    events: list[JobEvent]


@dataclass(frozen=True)
class ContinueResult:
    outcome: ContinueOutcome
    job: Job
    events: list[JobEvent]


@dataclass(frozen=True)
class Sweep:
    """What one sweep batch did: the events of the jobs it failed and how late the oldest was."""

    events: list[JobEvent]
    oldest_deadline_at: float | None


class Store(Protocol):
    async def open(self) -> None:
        """Connect and migrate; raises StoreError for a schema newer than this code."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise when the database cannot answer."""

    async def claim_secret_fingerprint(self, fingerprint: str) -> None:
        """Remember the secret key's fingerprint; StoreError if another key was used before."""

    async def ensure_api_token(self, name: str, token_hash: bytes, scope: str, now: float) -> None:
        """Store a bearer token's hash under `name` (replacing an older one of that name)."""

    async def find_api_token(self, token_hash: bytes) -> Principal | None: ...

    async def create_job(
        self,
        job_id: str,
        spec: JobSpec,
        credential: ContinueCredential | None,
        now: float,
    ) -> Transition:
        """Insert a new standalone job, pending, with its first event."""

    async def get_job(self, job_id: str) -> Job | None: ...

    async def list_jobs(
        self, *, state: State | None, pipeline_id: str | None, limit: int, cursor: str | None
    ) -> Page[Job]:
        """Newest first."""

    async def list_events(self, job_id: str, *, limit: int, cursor: str | None) -> Page[JobEvent]:
        """Oldest first (by sequence); NotFound for an unknown job."""

    async def read_trace(self, job_id: str, offset: int) -> bytes:
        """The trace from byte `offset`; NotFound for an unknown job."""

    async def cancel_job(self, job_id: str, now: float) -> Transition: ...

    async def retry_job(
        self, job_id: str, new_id: str, credential: ContinueCredential | None, now: float
    ) -> Transition:
        """A new attempt of a terminal job that has not been retried yet."""

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
        """Fail up to `limit` jobs whose earliest deadline is due, earliest first."""


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
