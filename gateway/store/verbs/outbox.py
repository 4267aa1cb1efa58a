"""The webhook outbox and event log: in the transaction that records an event, its
message (the frozen body, which is also what the live event stream serves), an entry in the
global event log, and one delivery per matching endpoint. Nothing is sent here; the dispatcher
claims due deliveries later, so a crash at any point loses nothing.

A job's terminal event lists its artifacts with their bytes inlined (smallest first, within
the inline budget) or with an expiring signed URL, minted now and frozen into the body.
"""

from __future__ import annotations

import base64
import functools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.artifacts import ArtifactLinks
from gateway.clock import rfc3339
from gateway.config import DEFAULT_WEBHOOK_INLINE_BYTES
from gateway.models import (
    Job,
    JobEvent,
    Pipeline,
    PipelineEvent,
    artifact_to_wire,
    job_to_wire,
    pipeline_to_wire,
)
from gateway.states import State
from gateway.store.verbs.connection import Connection
from gateway.webhooks import events as wire

ENDPOINT_COLUMNS = "id, url, events, pipeline_id, owner_job_id, owner_pipeline_id, enabled"


@dataclass(frozen=True)
class Target:
    """What matching needs to know of an endpoint."""

    id: str
    patterns: tuple[str, ...]
    pipeline_id: str | None
    enabled: bool


def _target(row: Sequence[Any]) -> Target:
    return Target(
        id=row[0], patterns=tuple(json.loads(row[2])), pipeline_id=row[3], enabled=bool(row[6])
    )


class EndpointCache:
    """The explicit endpoints, shared by a store's transactions: read again after a local
    change, or after `ttl_s` of wall time (another process may have changed them)."""

    def __init__(self, ttl_s: float = 1.0) -> None:
        self._ttl_s = ttl_s
        self._targets: list[Target] | None = None
        self._read_at = 0.0

    def targets(self, conn: Connection) -> list[Target]:
        if self._targets is None or time.monotonic() - self._read_at > self._ttl_s:
            rows = conn.execute(
                f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE owner_job_id IS NULL"
                " AND owner_pipeline_id IS NULL AND deleted_at IS NULL"
            ).fetchall()
            self._targets = [_target(row) for row in rows]
            self._read_at = time.monotonic()
        return self._targets

    def invalidate(self) -> None:
        self._targets = None


class Outbox:
    """Per-transaction access to endpoints and message writing."""

    def __init__(
        self,
        conn: Connection,
        new_id: Callable[[], str],
        now: float,
        *,
        inline_bytes: int = DEFAULT_WEBHOOK_INLINE_BYTES,
        links: ArtifactLinks | None = None,
        endpoints: EndpointCache | None = None,
    ) -> None:
        self._conn = conn
        self.endpoints = endpoints or EndpointCache()
        self._new_id = new_id
        self._now = now
        self._inline_bytes = inline_bytes
        self._links = links
        self.deliveries = 0
        self.logged = 0
        self._log_rows: list[tuple[Any, ...]] = []
        self._explicit: dict[tuple[str, str | None], list[Target]] = {}

    def _explicit_targets(self, event_type: str, pipeline_id: str | None) -> list[Target]:
        """The explicit endpoints that want `event_type` of a job in `pipeline_id` (matched
        once per transaction: a sweep logs thousands of events of one type)."""
        key = (event_type, pipeline_id)
        found = self._explicit.get(key)
        if found is None:
            found = self._explicit[key] = [
                t
                for t in self.endpoints.targets(self._conn)
                if (t.pipeline_id is None or t.pipeline_id == pipeline_id)
                and wire.matches(t.patterns, event_type)
            ]
        return found

    def _owned(self, column: str, owner_id: str) -> list[Target]:
        rows = self._conn.execute(
            f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE {column} = ?"
            " AND deleted_at IS NULL",
            (owner_id,),
        ).fetchall()
        return [_target(row) for row in rows]

    def _targets(
        self, event_type: str, pipeline_id: str | None, owners: list[tuple[str, str]]
    ) -> list[Target]:
        found = self._explicit_targets(event_type, pipeline_id)
        for column, owner_id in owners:
            owned = self._owned(column, owner_id)
            found = found + [t for t in owned if wire.matches(t.patterns, event_type)]
        return found

    def job_event(
        self,
        event: JobEvent,
        job: Job,
        after: Callable[[], Job],
        pipeline_has_url: Callable[[str], bool],
    ) -> None:
        """Log `event` of `job` (only its id, spec and pipeline are read: they never change)
        and, when an endpoint wants it, freeze its webhook message from `after()`, the job as
        the event left it, and queue one delivery per endpoint."""
        own_url = bool(job.spec.state_webhook_url)
        self.job_event_of(event, job.pipeline_id, own_url, after, pipeline_has_url)

    def job_event_of(
        self,
        event: JobEvent,
        pipeline_id: str | None,
        own_url: bool,
        after: Callable[[], Job],
        pipeline_has_url: Callable[[str], bool],
    ) -> None:
        """`job_event` for a job known by its event, its pipeline and whether it has a
        `state_webhook_url` (`own_url`): the sweep fails jobs without loading them, and
        `after()` is called only when a message is written."""
        job_id = event.job_id
        event_type = f"job.{event.state.value}"
        owners: list[tuple[str, str]] = []
        if own_url:
            owners.append(("owner_job_id", job_id))
        if pipeline_id is not None and pipeline_has_url(pipeline_id):
            owners.append(("owner_pipeline_id", pipeline_id))
        targets = self._targets(event_type, pipeline_id, owners)
        message_id = wire.message_id("job", job_id, event.sequence)
        if targets:
            snapshot = after()
            data = job_event_data(snapshot, event.previous_state, event.sequence)
            if event.state.terminal and snapshot.artifacts:
                data["artifacts"] = self._terminal_artifacts(snapshot)
            body = wire.body(event_type, event.at, data)
            self._write(message_id, event_type, body, targets, job_id, pipeline_id)
        self._log(
            "job",
            job_id,
            event.sequence,
            event_type,
            job_id,
            pipeline_id,
            message_id if targets else None,
            event.at,
        )

    def job_events_of(
        self,
        swept: Iterable[tuple[JobEvent, str | None, bool]],
        snapshot: Callable[[str], Job],
        pipeline_has_url: Callable[[str], bool],
    ) -> None:
        """`job_event_of` for many events (each with its job's pipeline and `own_url`), with
        `snapshot(job_id)` the job as its event left it: an event nobody can want (no own or
        pipeline webhook, no explicit subscription) costs one buffered log row."""
        event_types: dict[State, str] = {}
        for event, pipeline_id, own_url in swept:
            event_type = event_types.get(event.state)
            if event_type is None:
                event_type = event_types[event.state] = f"job.{event.state.value}"
            job_id = event.job_id
            if own_url or pipeline_id is not None or self._explicit_targets(event_type, None):
                after = functools.partial(snapshot, job_id)
                self.job_event_of(event, pipeline_id, own_url, after, pipeline_has_url)
            else:
                self._log("job", job_id, event.sequence, event_type, job_id, None, None, event.at)

    def _terminal_artifacts(self, job: Job) -> list[dict[str, Any]]:
        """Every artifact's metadata; the smallest ones, while their total stays within the
        inline budget, with `content_base64`; the others with a signed `url` (none when the
        store was given no links)."""
        inline: list[str] = []
        total = 0
        for artifact in sorted(job.artifacts, key=lambda a: (a.size, a.name)):
            if total + artifact.size > self._inline_bytes:
                break
            inline.append(artifact.name)
            total += artifact.size
        contents: dict[str, bytes] = {}
        if inline:
            rows = self._conn.execute(
                "SELECT name, data FROM artifacts WHERE job_id = ?"
                " AND name IN (SELECT value FROM json_each(?))",
                (job.id, json.dumps(inline)),
            ).fetchall()
            contents = dict(rows)
        listing = []
        for artifact in job.artifacts:
            entry = artifact_to_wire(artifact)
            if artifact.name in contents:
                entry["content_base64"] = base64.b64encode(contents[artifact.name]).decode()
            elif self._links is not None:
                url, expires_at = self._links.mint(job.id, artifact.name, self._now)
                entry["url"] = url
                entry["url_expires_at"] = rfc3339(expires_at)
            listing.append(entry)
        return listing

    def pipeline_event(self, event: PipelineEvent, pipeline: Pipeline, jobs: list[Job]) -> None:
        event_type = f"pipeline.{event.state.value}"
        owners = [("owner_pipeline_id", pipeline.id)] if pipeline.spec.state_webhook_url else []
        targets = self._targets(event_type, pipeline.id, owners)
        message_id = wire.message_id("pipeline", pipeline.id, event.sequence)
        if targets:
            data = pipeline_event_data(pipeline, jobs, event)
            body = wire.body(event_type, event.at, data)
            self._write(message_id, event_type, body, targets, None, pipeline.id)
        self._log(
            "pipeline",
            pipeline.id,
            event.sequence,
            event_type,
            None,
            pipeline.id,
            message_id if targets else None,
            event.at,
        )

    def _log(self, *row: Any) -> None:
        self._log_rows.append(row)
        self.logged += 1

    def flush(self) -> None:
        """Write the event-log entries of the transaction (in one statement)."""
        if self._log_rows:
            self._conn.executemany(
                "INSERT INTO event_log (kind, owner_id, sequence, event_type, job_id,"
                " pipeline_id, message_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                self._log_rows,
            )
            self._log_rows = []

    def _write(
        self,
        message_id: str,
        event_type: str,
        body: bytes,
        targets: list[Target],
        job_id: str | None,
        pipeline_id: str | None,
    ) -> None:
        self._conn.execute(
            "INSERT INTO webhook_messages (id, event_type, job_id, pipeline_id, body, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (message_id, event_type, job_id, pipeline_id, body, self._now),
        )
        self._conn.executemany(
            "INSERT INTO webhook_deliveries (id, message_id, endpoint_id, job_id, state,"
            " next_attempt_at, created_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    self._new_id(),
                    message_id,
                    target.id,
                    job_id,
                    "pending" if target.enabled else "skipped",
                    self._now if target.enabled else None,
                    self._now,
                    None if target.enabled else self._now,
                )
                for target in targets
            ],
        )
        self.deliveries += sum(1 for t in targets if t.enabled)


def job_event_data(job: Job, previous: State | None, sequence: int) -> dict[str, Any]:
    """`data` of a job event: the job as GET shows it, its previous state and sequence."""
    return {
        **job_to_wire(job),
        "previous_state": None if previous is None else previous.value,
        "sequence": sequence,
    }


def pipeline_event_data(
    pipeline: Pipeline, jobs: list[Job], event: PipelineEvent
) -> dict[str, Any]:
    return {
        **pipeline_to_wire(pipeline, jobs),
        "state": event.state.value,
        "previous_state": None if event.previous_state is None else event.previous_state.value,
        "sequence": event.sequence,
    }
