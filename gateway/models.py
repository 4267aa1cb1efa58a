"""Records and wire payloads: request bodies as strict msgspec Structs, jobs as frozen dataclasses.

Request bodies are decoded straight into Structs (unknown fields and wrong types are refused with
the JSON path of the culprit); `job_to_wire` is the one place a job becomes JSON.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec
from ulid import ULID

from gateway.clock import rfc3339
from gateway.errors import InvalidField, MalformedRequest
from gateway.pipelines import PipelineState
from gateway.states import Deadlines, FailureReason, Kind, Lifecycle, State

T = TypeVar("T")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,127}$"
VARIABLE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
MAX_TIMEOUT_S = 366 * 86_400
# Every transition of a pipeline's job re-reads the pipeline's jobs: bound the cost.
MAX_PIPELINE_JOBS = 500

JobName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, description="1-128 characters")]
VariableName = Annotated[str, msgspec.Meta(pattern=VARIABLE_PATTERN)]
Seconds = Annotated[int, msgspec.Meta(ge=1, le=MAX_TIMEOUT_S)]
Tag = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
ExitCode = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]


class Variable(msgspec.Struct, forbid_unknown_fields=True):
    """A variable value that is masked in traces."""

    value: str
    masked: bool = False


class JobFields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """What describes a job, in `POST /api/v1/jobs` and in each job of a pipeline."""

    kind: Kind = Kind.EXTERNAL
    script: list[str] | None = None
    is_async: bool = msgspec.field(default=False, name="async")
    timeout_s: Seconds | None = None
    callback_timeout_s: Seconds | None = None
    heartbeat_timeout_s: Seconds | None = None
    queue_timeout_s: Seconds | None = None
    variables: dict[VariableName, str | Variable] = msgspec.field(default_factory=dict)
    metadata: Any = None
    state_webhook_url: str | None = None
    state_webhook_secret: str | None = None
    tags: list[Tag] = msgspec.field(default_factory=list)
    continue_on_get: bool = False

    def check(self) -> None:
        """Cross-field rules that types cannot say; raises InvalidField."""
        if self.kind is Kind.SCRIPT and not self.script:
            raise InvalidField("a script job needs a non-empty `script` (a list of lines)")
        if self.kind is Kind.EXTERNAL:
            if self.script is not None:
                raise InvalidField("`script` is only for script jobs")
            if self.is_async:
                raise InvalidField("`async` is only for script jobs; an external job always waits")
            if self.queue_timeout_s is not None:
                raise InvalidField("`queue_timeout_s` is only for script jobs")
        if self.state_webhook_url is not None and not self.state_webhook_url.startswith(
            ("http://", "https://")
        ):
            raise InvalidField("`state_webhook_url` must be an http(s) URL")


class JobSpec(JobFields, kw_only=True):
    """Body of `POST /api/v1/jobs`; kept on every job (pipeline jobs too) as it was given."""

    name: JobName


class PipelineJobSpec(JobFields, kw_only=True):
    """One job of `POST /api/v1/pipelines`: named by its key; `kind` defaults to `script`."""

    kind: Kind = Kind.SCRIPT
    needs: list[JobName] = msgspec.field(default_factory=list)

    def job_spec(self, name: str) -> JobSpec:
        fields = msgspec.structs.asdict(self)
        del fields["needs"]
        return JobSpec(name=name, **fields)


class PipelineSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Body of `POST /api/v1/pipelines`."""

    name: JobName
    jobs: Annotated[dict[JobName, PipelineJobSpec], msgspec.Meta(max_length=MAX_PIPELINE_JOBS)]
    variables: dict[VariableName, str | Variable] = msgspec.field(default_factory=dict)
    state_webhook_url: str | None = None
    state_webhook_secret: str | None = None


class RunnerSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `POST /api/v1/runners`."""

    description: Annotated[str, msgspec.Meta(max_length=255)] = ""
    tags: list[Tag] = msgspec.field(default_factory=list)
    run_untagged: bool = True


class ContinueBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of the terminal call on a continue URL (all fields optional)."""

    status: Literal["success", "failed"] | None = None
    exit_code: ExitCode | None = None
    message: str | None = None
    outputs: dict[VariableName, str] | None = None
    result: Any = None


@dataclass(frozen=True)
class ContinueCall:
    """A validated terminal call: what to apply, and what identifies an exact repeat."""

    succeeded: bool
    exit_code: int | None
    message: str | None
    outputs: dict[str, str] | None
    result_json: str | None
    digest: bytes
    idempotency_key: str | None

    @classmethod
    def parse(cls, raw: bytes, idempotency_key: str | None) -> ContinueCall:
        """Decode and check a callback body; raises MalformedRequest or InvalidField."""
        body = decode_body(raw or b"{}", ContinueBody)
        failed = body.status == "failed" or (body.status is None and bool(body.exit_code))
        if body.status == "success" and body.exit_code:
            raise InvalidField("`status: success` cannot carry a non-zero `exit_code`")
        canonical = json.dumps(msgspec.to_builtins(body), sort_keys=True, separators=(",", ":"))
        return cls(
            succeeded=not failed,
            exit_code=body.exit_code,
            message=body.message,
            outputs=body.outputs,
            result_json=None if body.result is None else json.dumps(body.result),
            digest=hashlib.sha256(canonical.encode()).digest(),
            idempotency_key=idempotency_key,
        )


MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]")


def _too_deep(raw: bytes) -> bool:
    """Whether arrays and objects nest deeper than MAX_JSON_DEPTH (strings skipped). Deeper
    values would overflow the interpreter's stack when decoded or rendered back."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return False
    brackets = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", raw))
    depths = itertools.accumulate(1 if char in b"[{" else -1 for char in brackets)
    return max(depths, default=0) > MAX_JSON_DEPTH


def decode_body(raw: bytes, into: type[T]) -> T:
    """Decode JSON into `into`: MalformedRequest (400) for bad syntax or nesting deeper than
    MAX_JSON_DEPTH, InvalidField (422) for wrong shapes, naming the JSON path of the culprit."""
    if _too_deep(raw):
        raise MalformedRequest(f"the body nests arrays or objects deeper than {MAX_JSON_DEPTH}")
    try:
        return msgspec.json.decode(raw, type=into)
    except msgspec.ValidationError as exc:
        raise InvalidField(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise MalformedRequest(f"the body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise MalformedRequest("the body is not valid UTF-8") from None


@dataclass(frozen=True)
class Artifact:
    """What is known of an uploaded artifact without reading its bytes."""

    name: str
    content_type: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Job:
    """One job attempt as stored."""

    id: str
    pipeline_id: str | None
    name: str
    kind: Kind
    is_async: bool
    state: State
    failure_reason: FailureReason | None
    exit_code: int | None
    message: str | None
    outputs: dict[str, str] | None
    result_json: str | None
    attempt: int
    retry_of: str | None
    created_at: float
    started_at: float | None
    parked_at: float | None
    finished_at: float | None
    deadlines: Deadlines
    spec: JobSpec
    token_nonce: bytes | None = None
    retried: bool = False
    needs: tuple[str, ...] = ()
    runner_id: str | None = None
    artifacts: tuple[Artifact, ...] = ()

    @property
    def lifecycle(self) -> Lifecycle:
        return self.lifecycle_under()

    def lifecycle_under(self, **server_timings: int) -> Lifecycle:
        """What the state machine needs of the job, with the server's confirmation and runner
        timeouts (`confirm_timeout_s`, `runner_timeout_s`) when given."""
        return Lifecycle(
            kind=self.kind,
            is_async=self.is_async,
            state=self.state,
            deadlines=self.deadlines,
            failure_reason=self.failure_reason,
            timeout_s=self.spec.timeout_s,
            callback_timeout_s=self.spec.callback_timeout_s,
            heartbeat_timeout_s=self.spec.heartbeat_timeout_s,
            queue_timeout_s=self.spec.queue_timeout_s,
            **server_timings,
        )

    @property
    def deadline_at(self) -> float | None:
        earliest = self.deadlines.earliest()
        return None if earliest is None else earliest[0]


@dataclass(frozen=True)
class JobEvent:
    """One row of a job's transition history."""

    id: int
    job_id: str
    sequence: int
    state: State
    previous_state: State | None
    failure_reason: FailureReason | None
    cause: str
    at: float


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True)
class Principal:
    """Who an API token belongs to."""

    token_id: str
    name: str
    scope: str


@dataclass(frozen=True)
class ApiToken:
    """An API token as stored: its SHA-256, never the token. `scope` is `admin` or `viewer`."""

    id: str
    name: str
    scope: str
    token_hash: bytes
    created_at: float
    revoked_at: float | None

    @property
    def principal(self) -> Principal:
        return Principal(token_id=self.id, name=self.name, scope=self.scope)


def api_token_to_wire(token: ApiToken) -> dict[str, Any]:
    """The token as `GET /api/v1/tokens` lists it (never the token or its hash)."""
    return {
        "id": token.id,
        "name": token.name,
        "scope": token.scope,
        "created_at": rfc3339(token.created_at),
        "revoked_at": rfc3339(token.revoked_at),
    }


@dataclass(frozen=True)
class Runner:
    """A registered runner (its token is stored as a hash only)."""

    id: str
    description: str
    tags: tuple[str, ...]
    run_untagged: bool
    created_at: float
    last_seen_at: float | None
    running_job_ids: tuple[str, ...] = ()

    def can_run(self, job_tags: list[str]) -> bool:
        """A job's tags must all be the runner's; untagged jobs need `run_untagged`."""
        if not job_tags:
            return self.run_untagged
        return set(job_tags) <= set(self.tags)


@dataclass(frozen=True)
class Pipeline:
    """One pipeline; its state is derived from its jobs' latest attempts and stored."""

    id: str
    name: str
    state: PipelineState
    spec: PipelineSpec
    canceled: bool
    created_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True)
class PipelineView:
    """A pipeline with the latest attempt of each of its jobs, in definition order."""

    pipeline: Pipeline
    jobs: list[Job]


@dataclass(frozen=True)
class PipelineEvent:
    id: int
    pipeline_id: str
    sequence: int
    state: PipelineState
    previous_state: PipelineState | None
    at: float


@dataclass(frozen=True)
class HandOut:
    """A script job handed to a runner, with what its variables are built from."""

    job: Job
    continue_token: str | None
    pipeline_variables: dict[str, str | Variable]
    needs_outputs: list[dict[str, str]]


@dataclass
class IdGenerator:
    """ULIDs that strictly increase even within one millisecond, timed by the injected clock."""

    _last: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def new(self, now: float) -> str:
        candidate = int(ULID.from_timestamp(now))
        with self._lock:
            if candidate <= self._last:
                candidate = self._last + 1
            self._last = candidate
        return str(ULID.from_int(candidate))


def job_to_wire(job: Job) -> dict[str, Any]:
    """The job as `GET /api/v1/jobs/{id}` shows it. Never a token."""
    return {
        "id": job.id,
        "pipeline_id": job.pipeline_id,
        "name": job.name,
        "kind": job.kind.value,
        "async": job.is_async,
        "state": job.state.value,
        "failure_reason": None if job.failure_reason is None else job.failure_reason.value,
        "exit_code": job.exit_code,
        "message": job.message,
        "outputs": job.outputs or {},
        "result": None if job.result_json is None else json.loads(job.result_json),
        "attempt": job.attempt,
        "retry_of": job.retry_of,
        "created_at": rfc3339(job.created_at),
        "started_at": rfc3339(job.started_at),
        "parked_at": rfc3339(job.parked_at),
        "finished_at": rfc3339(job.finished_at),
        "deadline_at": rfc3339(job.deadline_at),
        "metadata": job.spec.metadata,
        "tags": job.spec.tags,
        "needs": list(job.needs),
        "runner_id": job.runner_id,
        "artifacts": [artifact_to_wire(artifact) for artifact in job.artifacts],
    }


def artifact_to_wire(artifact: Artifact) -> dict[str, Any]:
    return {
        "name": artifact.name,
        "content_type": artifact.content_type,
        "size": artifact.size,
        "sha256": artifact.sha256,
    }


def event_to_wire(event: JobEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "sequence": event.sequence,
        "state": event.state.value,
        "previous_state": None if event.previous_state is None else event.previous_state.value,
        "failure_reason": None if event.failure_reason is None else event.failure_reason.value,
        "cause": event.cause,
        "at": rfc3339(event.at),
    }


def runner_to_wire(runner: Runner) -> dict[str, Any]:
    return {
        "id": runner.id,
        "description": runner.description,
        "tags": list(runner.tags),
        "run_untagged": runner.run_untagged,
        "created_at": rfc3339(runner.created_at),
        "last_seen_at": rfc3339(runner.last_seen_at),
        "running_job_ids": list(runner.running_job_ids),
    }


def pipeline_to_wire(pipeline: Pipeline, jobs: list[Job] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": pipeline.id,
        "name": pipeline.name,
        "state": pipeline.state.value,
        "created_at": rfc3339(pipeline.created_at),
        "started_at": rfc3339(pipeline.started_at),
        "finished_at": rfc3339(pipeline.finished_at),
        "variables": {
            k: v if isinstance(v, str) else ("[MASKED]" if v.masked else v.value)
            for k, v in pipeline.spec.variables.items()
        },
    }
    if jobs is not None:
        body["jobs"] = [job_to_wire(job) for job in jobs]
    return body


class EndpointSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `POST /api/v1/webhooks`."""

    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    events: list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]] = msgspec.field(
        default_factory=list
    )
    pipeline_id: str | None = None


class EndpointPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `PATCH /api/v1/webhooks/{id}`: what is given changes."""

    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)] | None = None
    events: list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]] | None = None
    enabled: bool | None = None


@dataclass(frozen=True)
class Endpoint:
    """A webhook subscription (explicit, or the implicit one of a job or pipeline)."""

    id: str
    url: str
    events: tuple[str, ...]
    pipeline_id: str | None
    owner_job_id: str | None
    owner_pipeline_id: str | None
    enabled: bool
    disabled_reason: str | None
    failing_since: float | None
    created_at: float
    failed_deliveries: int = 0


@dataclass(frozen=True)
class Attempt:
    number: int
    at: float
    status_code: int | None
    duration_ms: float
    error: str | None
    response_snippet: str | None


@dataclass(frozen=True)
class Delivery:
    id: str
    endpoint_id: str
    message_id: str
    event_type: str
    job_id: str | None
    state: str
    created_at: float
    next_attempt_at: float | None
    attempts: tuple[Attempt, ...] = ()


@dataclass(frozen=True)
class DeliveryClaim:
    """A delivery leased to one dispatcher for one attempt: what to send, where, signed how."""

    delivery_id: str
    endpoint_id: str
    message_id: str
    url: str
    body: bytes
    secrets: tuple[str, ...]
    attempt: int
    destination: str  # the receiver (URL without query) the per-receiver cap counts


def endpoint_to_wire(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "events": list(endpoint.events),
        "pipeline_id": endpoint.pipeline_id,
        "enabled": endpoint.enabled,
        "disabled_reason": endpoint.disabled_reason,
        "failing_since": rfc3339(endpoint.failing_since),
        "failed_deliveries": endpoint.failed_deliveries,
        "created_at": rfc3339(endpoint.created_at),
    }


def delivery_to_wire(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "endpoint_id": delivery.endpoint_id,
        "message_id": delivery.message_id,
        "event_type": delivery.event_type,
        "job_id": delivery.job_id,
        "state": delivery.state,
        "created_at": rfc3339(delivery.created_at),
        "next_attempt_at": rfc3339(delivery.next_attempt_at),
        "attempts": [
            {
                "number": a.number,
                "status_code": a.status_code,
                "duration_ms": round(a.duration_ms, 1),
                "error": a.error,
                "response_snippet": a.response_snippet,
                "at": rfc3339(a.at),
            }
            for a in delivery.attempts
        ],
    }


@dataclass(frozen=True)
class StreamEvent:
    """One entry of the global event log: its sequence (the stream's `id:`) and webhook body."""

    seq: int
    event_type: str
    body: bytes
