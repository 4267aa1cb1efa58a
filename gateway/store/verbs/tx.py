"""One transaction's unit of work: load jobs, apply state-machine changes
compare-and-set, record events, insert jobs, and settle the pipelines a change touched.

Every store verb is a function of a `Tx`, run inside one transaction of its backend (SQLite's
BEGIN IMMEDIATE, PostgreSQL's READ COMMITTED); `Tx.changes()` is what the verb reports back
(events, pipeline events, minted credentials). A compare-and-set that misses raises
ConcurrentChange, and the store runs the verb again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.artifacts import ArtifactLinks
from gateway.errors import ConcurrentChange, NotFound
from gateway.models import (
    Artifact,
    Job,
    JobEvent,
    JobSpec,
    Pipeline,
    PipelineEvent,
    PipelineSpec,
)
from gateway.pipelines import JobStatus, PipelineState, Readiness, derive_state, readiness
from gateway.states import (
    Change,
    Deadlines,
    FailureReason,
    Kind,
    Lifecycle,
    State,
    Trigger,
    advance,
    entry_deadlines,
)
from gateway.store.base import Changes, Minter, Policy
from gateway.store.verbs.connection import SQLITE, Connection, Dialect
from gateway.store.verbs.outbox import EndpointCache, Outbox
from gateway.tokens import ContinueCredential
from gateway.webhooks.guard import destination

JOB_COLUMNS = (
    "id, pipeline_id, name, kind, is_async, state, failure_reason, exit_code, message, outputs,"
    " result, attempt, retry_of, spec, created_at, started_at, parked_at, finished_at,"
    " execution_deadline_at, callback_deadline_at, heartbeat_deadline_at, runner_deadline_at,"
    " queue_deadline_at, confirm_deadline_at, token_nonce, callback_digest, callback_key,"
    " event_sequence, needs, runner_id, early_callback, job_token_hash, trace_size,"
    " EXISTS (SELECT 1 FROM jobs AS later WHERE later.retry_of = jobs.id) AS retried,"
    " artifacts"
)
SELECT_JOB = f"SELECT {JOB_COLUMNS} FROM jobs"
PIPELINE_COLUMNS = (
    "id, name, state, spec, canceled, created_at, started_at, finished_at, event_sequence"
)
SELECT_PIPELINE = f"SELECT {PIPELINE_COLUMNS} FROM pipelines"
LATEST_ATTEMPT = "NOT EXISTS (SELECT 1 FROM jobs AS later WHERE later.retry_of = jobs.id)"

_JOB_SPEC = msgspec.json.Decoder(JobSpec)
_PIPELINE_SPEC = msgspec.json.Decoder(PipelineSpec)
ENCODE = msgspec.json.Encoder()

_TRANSITION_SET = (
    "UPDATE jobs SET state = ?, failure_reason = COALESCE(?, failure_reason),"
    " started_at = COALESCE(started_at, ?), parked_at = COALESCE(?, parked_at),"
    " finished_at = COALESCE(?, finished_at), execution_deadline_at = ?,"
    " callback_deadline_at = ?, heartbeat_deadline_at = ?, runner_deadline_at = ?,"
    " queue_deadline_at = ?, confirm_deadline_at = ?, deadline_at = ?, event_sequence = ?"
)
_TRANSITION_WHERE = " WHERE id = ? AND state = ? AND event_sequence = ?"
UPDATE_TRANSITION = _TRANSITION_SET + _TRANSITION_WHERE
INSERT_EVENT = (
    "INSERT INTO job_events (job_id, sequence, state, previous_state, failure_reason, cause, at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id"
)
# A hand-out nobody confirmed goes back to the queue with its credentials revoked.
REQUEUE_COLUMNS = {
    "runner_id": None,
    "job_token_hash": None,
    "token_nonce": None,
    "token_hash": None,
    # a terminal call kept early came through the revoked URL: it goes with it
    "early_callback": None,
    "callback_digest": None,
    "callback_key": None,
}


@dataclass(frozen=True)
class Loaded:
    """A job row with the bookkeeping columns the wire never shows."""

    job: Job
    event_sequence: int
    callback_digest: bytes | None
    callback_key: str | None
    early_callback: str | None
    job_token_hash: bytes | None
    trace_size: int


def load_job(row: Sequence[Any]) -> Loaded:
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
        spec=_JOB_SPEC.decode(row[13]),
        created_at=row[14],
        started_at=row[15],
        parked_at=row[16],
        finished_at=row[17],
        deadlines=Deadlines(
            execution=row[18],
            callback=row[19],
            heartbeat=row[20],
            runner=row[21],
            queue=row[22],
            confirm=row[23],
        ),
        token_nonce=row[24],
        needs=tuple(json.loads(row[28])) if row[28] else (),
        runner_id=row[29],
        retried=bool(row[33]),
        artifacts=_artifacts(row[34]),
    )
    return Loaded(
        job=job,
        event_sequence=row[27],
        callback_digest=row[25],
        callback_key=row[26],
        early_callback=row[30],
        job_token_hash=row[31],
        trace_size=row[32],
    )


def _artifacts(column: str | None) -> tuple[Artifact, ...]:
    """The job row's copy of its artifacts' metadata (see `store.verbs.artifacts`)."""
    return () if column is None else tuple(Artifact(**fields) for fields in json.loads(column))


def load_pipeline(row: Sequence[Any]) -> tuple[Pipeline, int]:
    """A pipeline row and its event sequence."""
    pipeline = Pipeline(
        id=row[0],
        name=row[1],
        state=PipelineState(row[2]),
        spec=_PIPELINE_SPEC.decode(row[3]),
        canceled=bool(row[4]),
        created_at=row[5],
        started_at=row[6],
        finished_at=row[7],
    )
    return pipeline, row[8]


def job_event(event_id: int, params: Sequence[Any]) -> JobEvent:
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


def changed_job(job: Job, change: Change, now: float, **fields: Any) -> Job:
    """`job` as it is once `change` is written, with other `fields` replaced too."""
    return dataclasses.replace(
        job,
        state=change.state,
        failure_reason=change.failure_reason or job.failure_reason,
        started_at=job.started_at
        if job.started_at is not None or not change.sets_started_at
        else now,
        parked_at=now if change.sets_parked_at else job.parked_at,
        finished_at=now if change.sets_finished_at else job.finished_at,
        deadlines=change.deadlines,
        **fields,
    )


# Extra columns a write may set, and where they live on a loaded row: (on the Job?, field,
# conversion from the column's value).
_WRITTEN_COLUMNS: dict[str, tuple[bool, str, Callable[[Any], Any]]] = {
    "exit_code": (True, "exit_code", lambda v: v),
    "message": (True, "message", lambda v: v),
    "outputs": (True, "outputs", lambda v: None if v is None else json.loads(v)),
    "result": (True, "result_json", lambda v: v),
    "runner_id": (True, "runner_id", lambda v: v),
    "token_nonce": (True, "token_nonce", lambda v: v),
    "token_hash": (False, "", lambda v: v),
    "queued_at": (False, "", lambda v: v),
    "job_token_hash": (False, "job_token_hash", lambda v: v),
    "callback_digest": (False, "callback_digest", lambda v: v),
    "callback_key": (False, "callback_key", lambda v: v),
    "early_callback": (False, "early_callback", lambda v: v),
}


def _written(loaded: Loaded, change: Change, now: float, columns: dict[str, Any]) -> Loaded | None:
    """The row as a write of `change` and `columns` leaves it, without reading it back; None
    when a column is not one this knows."""
    job_fields: dict[str, Any] = {}
    row_fields: dict[str, Any] = {}
    for column, value in columns.items():
        known = _WRITTEN_COLUMNS.get(column)
        if known is None:
            return None
        on_job, field, convert = known
        if field:
            (job_fields if on_job else row_fields)[field] = convert(value)
    job = changed_job(loaded.job, change, now, **job_fields)
    sequence = loaded.event_sequence + (1 if change.transitioned else 0)
    return dataclasses.replace(loaded, job=job, event_sequence=sequence, **row_fields)


def transition_params(loaded: Loaded, change: Change, now: float) -> tuple[Any, ...]:
    """Parameters of UPDATE_TRANSITION (SET values, then the compare-and-set WHERE)."""
    d = change.deadlines
    earliest = d.earliest()
    return (
        change.state.value,
        None if change.failure_reason is None else change.failure_reason.value,
        now if change.sets_started_at else None,
        now if change.sets_parked_at else None,
        now if change.sets_finished_at else None,
        d.execution,
        d.callback,
        d.heartbeat,
        d.runner,
        d.queue,
        d.confirm,
        None if earliest is None else earliest[0],
        loaded.event_sequence + (1 if change.transitioned else 0),
        loaded.job.id,
        loaded.job.state.value,
        loaded.event_sequence,
    )


def event_params(loaded: Loaded, change: Change, cause: str, now: float) -> tuple[Any, ...]:
    return (
        loaded.job.id,
        loaded.event_sequence + 1,
        change.state.value,
        change.previous_state.value,
        None if change.failure_reason is None else change.failure_reason.value,
        cause,
        now,
    )


class Tx:
    """The bookkeeping of one transaction; see the module docstring."""

    def __init__(
        self,
        conn: Connection,
        policy: Policy,
        now: float,
        new_id: Callable[[], str],
        links: ArtifactLinks | None = None,
        endpoints: EndpointCache | None = None,
        dialect: Dialect = SQLITE,
    ) -> None:
        self.conn = conn
        self.dialect = dialect
        self.policy = policy
        self.now = now
        self.new_id = new_id
        self.outbox = Outbox(
            conn,
            new_id,
            now,
            inline_bytes=policy.inline_bytes,
            links=links,
            endpoints=endpoints,
        )
        self._pipeline_urls: dict[str, bool] = {}
        self.events: list[JobEvent] = []
        self.pipeline_events: list[PipelineEvent] = []
        self.credentials: dict[str, ContinueCredential] = {}
        self.requeued = 0
        self._touched: set[str] = set()

    def finish(self) -> None:
        """End of the verb: write what was buffered (the event-log entries)."""
        self.outbox.flush()

    def changes(self) -> Changes:
        return Changes(
            events=self.events,
            pipeline_events=self.pipeline_events,
            credentials=self.credentials,
            requeued=self.requeued,
            deliveries=self.outbox.deliveries,
            logged=self.outbox.logged,
        )

    # -- jobs ------------------------------------------------------------------------------

    def find_job(self, where: str, *params: Any) -> Loaded | None:
        row = self.conn.execute(f"{SELECT_JOB} WHERE {where}", params).fetchone()
        return None if row is None else load_job(row)

    def job(self, job_id: str) -> Loaded:
        loaded = self.find_job("id = ?", job_id)
        if loaded is None:
            raise NotFound(f"no job {job_id}")
        return loaded

    def lifecycle(self, job: Job) -> Lifecycle:
        return job.lifecycle_under(
            confirm_timeout_s=self.policy.confirm_timeout_s,
            runner_timeout_s=self.policy.runner_timeout_s,
        )

    def apply(
        self,
        loaded: Loaded,
        trigger: Trigger,
        cause: str,
        *,
        reason: FailureReason | None = None,
        **columns: Any,
    ) -> Loaded:
        """Advance the job by `trigger`, write it with `columns`, and return it re-read."""
        change = advance(self.lifecycle(loaded.job), trigger, self.now, reason=reason)
        return self.write(loaded, change, cause, **columns)

    def write(self, loaded: Loaded, change: Change, cause: str, **columns: Any) -> Loaded:
        """Compare-and-set `change` (plus extra `columns`) onto the row, record its event, and
        return the row as written. ConcurrentChange if the row moved since it was read (never
        on SQLite, whose writers are serialised; on PostgreSQL the store retries the verb)."""
        if change.requeued:
            columns = {**REQUEUE_COLUMNS, **columns}
            self.requeued += 1
        params = transition_params(loaded, change, self.now)
        extra = "".join(f", {name} = ?" for name in columns)
        sql = _TRANSITION_SET + extra + _TRANSITION_WHERE
        cursor = self.conn.execute(sql, params[:-3] + tuple(columns.values()) + params[-3:])
        if cursor.rowcount != 1:
            raise ConcurrentChange("the job changed concurrently; try again")
        after = _written(loaded, change, self.now, columns)
        if after is None:  # a column the mapping does not know: read the row back
            after = self.job(loaded.job.id)
        if change.transitioned:
            self._record(event_params(loaded, change, cause, self.now), after.job)
            if loaded.job.pipeline_id is not None:
                self._touched.add(loaded.job.pipeline_id)
        return after

    def _record(self, params: tuple[Any, ...], after: Job) -> None:
        event_id = self.conn.execute(INSERT_EVENT, params).fetchall()[0][0]
        event = job_event(event_id, params)
        self.events.append(event)
        self.outbox.job_event(event, after, lambda: after, self.pipeline_has_url)

    def pipeline_has_url(self, pipeline_id: str) -> bool:
        """Whether a pipeline has a state_webhook_url (read once per transaction)."""
        if pipeline_id not in self._pipeline_urls:
            self._pipeline_urls[pipeline_id] = bool(
                self.pipeline(pipeline_id)[0].spec.state_webhook_url
            )
        return self._pipeline_urls[pipeline_id]

    def add_implicit_endpoint(
        self,
        url: str,
        secret: str | None,
        *,
        job_id: str | None = None,
        pipeline_id: str | None = None,
    ) -> None:
        """A job's or pipeline's `state_webhook_url`: a subscription to its own events (and a
        pipeline's jobs' events), signed with its own secret or else the server's."""
        self.conn.execute(
            "INSERT INTO webhook_endpoints (id, url, destination, events, owner_job_id,"
            " owner_pipeline_id, secret, created_at) VALUES (?, ?, ?, '[]', ?, ?, ?, ?)",
            (self.new_id(), url, destination(url), job_id, pipeline_id, secret, self.now),
        )

    def insert_job(
        self,
        job_id: str,
        spec: JobSpec,
        minter: Minter,
        *,
        attempt: int = 1,
        retry_of: str | None = None,
        pipeline_id: str | None = None,
        needs: Sequence[str] = (),
    ) -> Loaded:
        """A new job: `pending` (with its deadlines running) unless it needs other jobs of its
        pipeline, then `created` until `settle` finds them done. An external job gets its
        continue credential now (it answers 409 not_ready until the job is pending)."""
        state = State.CREATED if pipeline_id is not None and needs else State.PENDING
        lifecycle = Lifecycle(
            kind=spec.kind,
            is_async=spec.is_async,
            state=state,
            timeout_s=spec.timeout_s,
            callback_timeout_s=spec.callback_timeout_s,
            heartbeat_timeout_s=spec.heartbeat_timeout_s,
            queue_timeout_s=spec.queue_timeout_s,
        )
        deadlines = entry_deadlines(lifecycle, self.now)
        earliest = deadlines.earliest()
        credential = minter.mint(job_id) if spec.kind is Kind.EXTERNAL else None
        if credential is not None:
            self.credentials[job_id] = credential
        self.conn.execute(
            "INSERT INTO jobs (id, pipeline_id, name, kind, is_async, state, attempt, retry_of,"
            " spec, needs, created_at, queued_at, execution_deadline_at, callback_deadline_at,"
            " heartbeat_deadline_at, queue_deadline_at, deadline_at, token_nonce, token_hash,"
            " event_sequence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
            (
                job_id,
                pipeline_id,
                spec.name,
                spec.kind.value,
                int(spec.is_async),
                state.value,
                attempt,
                retry_of,
                ENCODE.encode(spec).decode(),  # TEXT on both databases
                json.dumps(list(needs)) if needs else None,
                self.now,
                self.now if state is State.PENDING else None,
                deadlines.execution,
                deadlines.callback,
                deadlines.heartbeat,
                deadlines.queue,
                None if earliest is None else earliest[0],
                None if credential is None else credential.nonce,
                None if credential is None else credential.token_hash,
            ),
        )
        if spec.state_webhook_url:
            self.add_implicit_endpoint(
                spec.state_webhook_url, spec.state_webhook_secret, job_id=job_id
            )
        inserted = self.job(job_id)
        cause = "retry" if retry_of else "created"
        self._record((job_id, 1, state.value, None, None, cause, self.now), inserted.job)
        if pipeline_id is not None:
            self._touched.add(pipeline_id)
        return inserted

    # -- pipelines -------------------------------------------------------------------------

    def pipeline(self, pipeline_id: str, *, lock: bool = False) -> tuple[Pipeline, int]:
        """The pipeline and its event sequence; `lock`: held until the transaction ends (on
        PostgreSQL; SQLite's writers are serialised anyway)."""
        suffix = self.dialect.for_update() if lock else ""
        row = self.conn.execute(
            f"{SELECT_PIPELINE} WHERE id = ?{suffix}", (pipeline_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no pipeline {pipeline_id}")
        return load_pipeline(row)

    def latest_jobs(self, pipeline: Pipeline) -> list[Loaded]:
        """The latest attempt of each of the pipeline's jobs, in the order it defined them."""
        rows = self.conn.execute(
            f"{SELECT_JOB} WHERE pipeline_id = ? AND {LATEST_ATTEMPT}", (pipeline.id,)
        ).fetchall()
        order = {name: position for position, name in enumerate(pipeline.spec.jobs)}
        return sorted((load_job(row) for row in rows), key=lambda lj: order.get(lj.job.name, 0))

    def touch_pipeline(self, pipeline_id: str) -> None:
        self._touched.add(pipeline_id)

    def settle(self) -> None:
        """Bring every pipeline a change touched up to date: jobs whose needs succeeded become
        pending, jobs with a failed, canceled or skipped need are skipped (until nothing
        moves), then the pipeline's derived state is stored with an event if it changed.

        The pipeline row is locked first, so transactions settling one pipeline take turns and
        each sees the jobs the one before it committed (under READ COMMITTED a cascade could
        otherwise be skipped by both)."""
        while self._touched:
            pipeline_id = self._touched.pop()
            pipeline, sequence = self.pipeline(pipeline_id, lock=True)
            jobs = {lj.job.name: lj for lj in self.latest_jobs(pipeline)}
            moved = True
            while moved:
                moved = False
                for name, loaded in list(jobs.items()):
                    if loaded.job.state is not State.CREATED:
                        continue
                    ready = readiness([jobs[need].job.state for need in loaded.job.needs])
                    if ready is Readiness.READY:
                        jobs[name] = self.apply(
                            loaded, Trigger.NEEDS_MET, "needs", queued_at=self.now
                        )
                        moved = True
                    elif ready is Readiness.DOOMED:
                        jobs[name] = self.apply(loaded, Trigger.NEEDS_FAILED, "needs")
                        moved = True
            self._touched.discard(pipeline_id)
            self._store_pipeline_state(pipeline, sequence, [lj.job for lj in jobs.values()])

    def _store_pipeline_state(self, pipeline: Pipeline, sequence: int, jobs: list[Job]) -> None:
        statuses = [
            JobStatus(
                name=job.name,
                kind=job.kind,
                is_async=job.is_async,
                state=job.state,
                started=job.started_at is not None,
                needs=job.needs,
            )
            for job in jobs
        ]
        state = derive_state(statuses, canceled=pipeline.canceled)
        if state is pipeline.state:
            return
        started = pipeline.started_at
        if started is None and state not in (PipelineState.PENDING,):
            started = self.now
        updated = self.conn.execute(
            "UPDATE pipelines SET state = ?, started_at = ?, finished_at = ?, event_sequence = ?"
            " WHERE id = ? AND event_sequence = ?",
            (
                state.value,
                started,
                self.now if state.terminal else None,
                sequence + 1,
                pipeline.id,
                sequence,
            ),
        ).rowcount
        if updated != 1:
            raise ConcurrentChange("the pipeline changed concurrently; try again")
        params = (pipeline.id, sequence + 1, state.value, pipeline.state.value, self.now)
        event_id = self.conn.execute(
            "INSERT INTO pipeline_events (pipeline_id, sequence, state, previous_state, at)"
            " VALUES (?, ?, ?, ?, ?) RETURNING id",
            params,
        ).fetchall()[0][0]
        event = PipelineEvent(
            id=event_id,
            pipeline_id=pipeline.id,
            sequence=sequence + 1,
            state=state,
            previous_state=pipeline.state,
            at=self.now,
        )
        self.pipeline_events.append(event)
        self.outbox.pipeline_event(event, self.pipeline(pipeline.id)[0], jobs)
