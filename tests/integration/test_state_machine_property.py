"""Stateful property test (hypothesis): random interleavings of job creation, runner hand-outs,
confirmations, trace appends and exits, terminal callbacks (exact repeats, other bodies,
idempotency keys, early ones), progress calls, cancels, retries, pipelines and clock jumps with
sweeps, against the real app on a real SQLite file. Every answer is checked against the
contract as the database stood just before the call, and the invariants are checked after every
step: one terminal transition per attempt, event sequences 1..n, nothing changed by a refused
call, no live continue URL on a terminal job, a deadline or a runner lease on every job that
waits, and every accepted callback reflected on its job.

`make test` runs a small budget; `GATEWAY_TEST_STATEFUL_EXAMPLES=2000` explores much further.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.clock import ManualClock
from gateway.config import Settings
from gateway.tokens import token_hash
from tests.conftest import ADMIN_TOKEN, BASE_URL, SECRET_KEY, continue_path, create_job, sweep

TERMINAL = frozenset({"success", "failed", "canceled", "skipped"})
# Deadline columns in the contract's tie-break order, with the failure reason each one gives
# (None: an unconfirmed hand-out goes back to the queue).
DEADLINES: dict[str, str | None] = {
    "execution_deadline_at": "job_execution_timeout",
    "callback_deadline_at": "callback_timeout",
    "heartbeat_deadline_at": "heartbeat_timeout",
    "runner_deadline_at": "runner_system_failure",
    "queue_deadline_at": "queue_timeout",
    "confirm_deadline_at": None,
}
UNKNOWN_TOKEN_BODY = {"error": "not_found", "detail": "this continue URL is not valid"}

# Terminal-call bodies (None: an empty body, which counts as `{}`).
CALLBACK_BODIES: list[dict[str, Any] | None] = [
    None,
    {},
    {"status": "success", "outputs": {"VERSION": "1.2.3"}, "result": {"ok": True, "n": 2}},
    {"status": "failed", "message": "provisioning failed"},
    {"exit_code": 3, "message": "exit 3"},
    {"outputs": {"HOST": "node-1"}},
    {"status": "success", "exit_code": 0, "message": "done"},
]
INVALID_CALLBACKS: list[tuple[bytes, int]] = [
    (b"not json", 400),
    (b'{"status": "success", "exit_code": 2}', 422),
    (b'{"unknown": 1}', 422),
    (b'{"outputs": {"1bad": "x"}}', 422),
    (b'{"status": "maybe"}', 422),
]
EXTERNAL_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "callback_timeout_s": st.sampled_from([30, 120, 3600]),
        "heartbeat_timeout_s": st.sampled_from([20, 90]),
        "timeout_s": st.sampled_from([60, 600]),
        "continue_on_get": st.just(True),
    },
)
SCRIPT_FIELDS = st.fixed_dictionaries(
    {"kind": st.just("script"), "script": st.just(["make deploy"])},
    optional={
        "timeout_s": st.sampled_from([45, 600]),
        "queue_timeout_s": st.sampled_from([50, 500]),
    },
)
ASYNC_SCRIPT_FIELDS = st.fixed_dictionaries(
    {"kind": st.just("script"), "script": st.just(["./provision"]), "async": st.just(True)},
    optional={
        "timeout_s": st.sampled_from([45, 600]),
        "queue_timeout_s": st.sampled_from([50, 500]),
        "callback_timeout_s": st.sampled_from([40, 900]),
        "heartbeat_timeout_s": st.just(25),
        "continue_on_get": st.just(True),
    },
)
PIPELINE_TIMEOUTS = st.fixed_dictionaries(
    {},
    optional={
        "queue_timeout_s": st.just(50),
        "callback_timeout_s": st.sampled_from([100, 2000]),
    },
)
EXITS = st.one_of(
    st.just({"state": "success"}),
    st.just({"state": "success", "exit_code": 0}),
    st.fixed_dictionaries(
        {"state": st.just("failed"), "exit_code": st.sampled_from([1, 2, 137])},
        optional={
            "failure_reason": st.sampled_from(
                ["script_failure", "job_execution_timeout", "runner_system_failure"]
            )
        },
    ),
)
# Jumps that cross each timeout the strategies above use, alone or several at once.
CLOCK_JUMPS = st.sampled_from(
    [5, 21, 26, 35, 41, 46, 55, 61, 95, 130, 301, 520, 1000, 3601, 86_401]
)


def _route(path: str) -> str:
    """A path with its ids and tokens blanked (for hypothesis' statistics)."""
    parts = path.split("?")[0].split("/")
    if len(parts) > 2 and parts[1] == "continue":
        parts[2] = "{token}"
    return "/".join("{id}" if len(part) == 26 and part.isalnum() else part for part in parts)


def _refusal(row: sqlite3.Row | None) -> tuple[int, str] | None:
    """What a continue-URL call other than the terminal one gets when its job cannot take it:
    an unknown token, a job that has ended, a job not yet started; None when it can."""
    if row is None:
        return 404, "not_found"
    if row["state"] in TERMINAL:
        return 409, "already_final"
    if row["state"] == "created":
        return 409, "not_ready"
    return None


def _normal(body: dict[str, Any] | None) -> dict[str, Any]:
    return {} if body is None else body


@dataclass(frozen=True)
class Call:
    """A terminal call as sent: its JSON body and its Idempotency-Key."""

    body: dict[str, Any]
    key: str | None

    def repeats(self, first: Call) -> bool:
        """An exact repeat of `first`: a JSON-equal body, or the same Idempotency-Key."""
        return self.body == first.body or (self.key is not None and self.key == first.key)

    @property
    def state(self) -> str:
        failed = self.body.get("status") == "failed" or (
            "status" not in self.body and bool(self.body.get("exit_code"))
        )
        return "failed" if failed else "success"


@dataclass
class TrackedJob:
    """What the test knows of one job attempt from the answers it got."""

    id: str
    name: str
    kind: str
    is_async: bool
    pipeline_id: str | None
    continue_token: str | None = None
    revoked_tokens: list[str] = field(default_factory=list)
    job_tokens: list[str] = field(default_factory=list)
    # The terminal call accepted for this attempt's URL (200 applied, or 202 kept early).
    finisher: Call | None = None
    finisher_answer: dict[str, Any] | None = None
    finisher_status: int | None = None
    probed_terminal: bool = False
    probed_revoked: set[str] = field(default_factory=set)
    checked_events: int = 0


@dataclass(frozen=True)
class RegisteredRunner:
    token: str
    tags: tuple[str, ...]
    run_untagged: bool

    def can_run(self, job_tags: list[str]) -> bool:
        return self.run_untagged if not job_tags else set(job_tags) <= set(self.tags)


class GatewayMachine(RuleBasedStateMachine):
    """The real app on its own event loop, SQLite file and manual clock; one per example."""

    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory(prefix="gateway-stateful-")
        self.settings = Settings(
            data_dir=Path(self._tmp.name) / "data",
            admin_token=ADMIN_TOKEN,
            secret_key=SECRET_KEY,
            public_url=BASE_URL,
        )
        self.clock = ManualClock()
        self.app = create_app(self.settings, clock=self.clock, run_sweeper=False)
        # Hypothesis drives rules synchronously: this machine owns the event loop the app (its
        # lifespan, its store's connection thread) lives on, from here to teardown.
        self.loop = asyncio.Runner()
        self._stack = contextlib.AsyncExitStack()
        try:
            self.loop.run(self._start())
        except BaseException:
            self.loop.close()
            self._tmp.cleanup()
            raise
        # Read-only, for what the API does not show (deadline columns, hashes, bookkeeping).
        self.db = sqlite3.connect(f"file:{self.settings.sqlite_path}?mode=ro", uri=True)
        self.db.row_factory = sqlite3.Row
        self.jobs: dict[str, TrackedJob] = {}
        self.runners: list[RegisteredRunner] = []
        self.pipelines: list[str] = []
        self.names = 0

    async def _start(self) -> None:
        await self._stack.enter_async_context(self.app.router.lifespan_context(self.app))
        transport = httpx.ASGITransport(app=self.app)
        self.http = await self._stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url=BASE_URL)
        )

    def teardown(self) -> None:
        self.db.close()
        self.loop.run(self._stack.aclose())
        self.loop.close()
        self._tmp.cleanup()

    # -- reading ---------------------------------------------------------------------------

    def row(self, job_id: str) -> sqlite3.Row:
        found = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert found is not None, f"job {job_id} vanished"
        return found

    def row_by_token(self, token: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(
            "SELECT * FROM jobs WHERE token_hash = ?", (token_hash(token),)
        ).fetchone()
        return row

    def events(self, job_id: str) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM job_events WHERE job_id = ? ORDER BY id", (job_id,)
        ).fetchall()

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a refused call must leave as it was."""
        jobs = [tuple(r) for r in self.db.execute("SELECT * FROM jobs ORDER BY id")]
        pipelines = [tuple(r) for r in self.db.execute("SELECT * FROM pipelines ORDER BY id")]
        events = self.db.execute("SELECT count(*) FROM job_events").fetchone()[0]
        traces = self.db.execute("SELECT count(*) FROM job_trace").fetchone()[0]
        return (jobs, pipelines, events, traces)

    def now(self) -> float:
        return self.clock.now()

    # -- calling ---------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        *,
        admin: bool = False,
        bearer: str | None = None,
        body: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        completing_get: bool = False,
    ) -> httpx.Response:
        """One request; never a 5xx, errors in the JSON error shape, and a refused call (4xx)
        or a GET (but one the contract lets complete a job) changes nothing stored."""
        sent = dict(headers or {})
        if admin:
            sent["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        if bearer is not None:
            sent["Authorization"] = f"Bearer {bearer}"
        if body is not None:
            content = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        before = self.snapshot()
        response = self.loop.run(self.http.request(method, path, content=content, headers=sent))
        assert response.status_code < 500, (method, path, response.status_code, response.text)
        event(f"{method} {_route(path)} -> {response.status_code}")
        if response.status_code >= 400 and method != "HEAD":
            error = response.json()
            assert isinstance(error.get("error"), str), response.text
            assert isinstance(error.get("detail"), str), response.text
        if response.status_code >= 400 or (method in ("GET", "HEAD") and not completing_get):
            assert self.snapshot() == before, f"{method} {path} -> {response.status_code} changed"
        return response

    def expect(self, response: httpx.Response, status: int, code: str | None = None) -> None:
        assert response.status_code == status, (status, response.status_code, response.text)
        if code is not None:
            assert response.json()["error"] == code, response.text

    # -- tracking --------------------------------------------------------------------------

    def track(self, body: dict[str, Any]) -> TrackedJob:
        job = TrackedJob(
            id=body["id"],
            name=body["name"],
            kind=body["kind"],
            is_async=body["async"],
            pipeline_id=body["pipeline_id"],
        )
        if "continue_url" in body:
            assert body["kind"] == "external"
            job.continue_token = body["continue_url"].removeprefix(f"{BASE_URL}/continue/")
        else:
            assert body["kind"] == "script", body
        assert job.id not in self.jobs
        self.jobs[job.id] = job
        return job

    def sync_revocations(self) -> None:
        """A hand-out nobody confirmed went back to the queue: its continue URL (and any
        terminal call kept early through it) is gone with it."""
        for job in self.jobs.values():
            token = job.continue_token
            if token is not None and self.row(job.id)["token_hash"] != token_hash(token):
                job.revoked_tokens.append(token)
                job.continue_token = None
                job.finisher = job.finisher_answer = job.finisher_status = None

    def tokened_jobs(self) -> list[TrackedJob]:
        return [j for j in self.jobs.values() if j.continue_token or j.revoked_tokens]

    def runner_jobs(self) -> list[TrackedJob]:
        return [j for j in self.jobs.values() if j.job_tokens]

    def next_name(self, prefix: str) -> str:
        self.names += 1
        return f"{prefix}-{self.names}"

    # -- rules ----------------------------------------------------------------------------
    # One rule per actor (whoever creates jobs, a runner, the external system holding a
    # continue URL, an operator, time), each drawing what it does: hypothesis enables a random
    # subset of rules per run, and a few broad actors keep every run an interplay.

    @initialize()
    def register_runners(self) -> None:
        for description, tags, untagged in (("shell", (), True), ("gpu", ("gpu",), False)):
            response = self.call(
                "POST",
                "/api/v1/runners",
                admin=True,
                body={"description": description, "tags": list(tags), "run_untagged": untagged},
            )
            self.expect(response, 201)
            self.runners.append(RegisteredRunner(response.json()["token"], tags, untagged))

    @initialize(external=EXTERNAL_FIELDS, script=SCRIPT_FIELDS, async_script=ASYNC_SCRIPT_FIELDS)
    def seed_jobs(
        self, external: dict[str, Any], script: dict[str, Any], async_script: dict[str, Any]
    ) -> None:
        """Every run starts with an external job, a script job and an async one to act on."""
        self.create_job("ext", {**external, "kind": "external"})
        self.create_job("script", script)
        self.create_job("script", async_script)

    @rule(
        data=st.data(),
        what=st.sampled_from(["external", "script", "async script", "pipeline"]),
    )
    def create(self, data: st.DataObject, what: str) -> None:
        """Someone creates a standalone job or (at most twice) a pipeline."""
        if what == "external":
            self.create_job("ext", {**data.draw(EXTERNAL_FIELDS), "kind": "external"})
        elif what == "script":
            self.create_job("script", data.draw(SCRIPT_FIELDS))
        elif what == "async script" or len(self.pipelines) >= 2:
            self.create_job("script", data.draw(ASYNC_SCRIPT_FIELDS))
        else:
            self.create_pipeline(data.draw(PIPELINE_TIMEOUTS))

    def create_job(self, prefix: str, fields: dict[str, Any]) -> None:
        body = {"name": self.next_name(prefix), **fields}
        response = self.call("POST", "/api/v1/jobs", admin=True, body=body)
        self.expect(response, 201)
        created = response.json()
        assert created["state"] == "pending"
        assert ("continue_url" in created) == (created["kind"] == "external")
        if created["kind"] == "external":
            assert created["deadline_at"] is not None  # nothing waits forever
        self.track(created)

    def create_pipeline(self, timeouts: dict[str, Any]) -> None:
        """Two chains: an approval (external) that releases a deploy (async script), and a
        build (script) that releases a verification (external, `created` until then). Its
        script jobs run on the gpu runner, the standalone ones on the other."""
        build: dict[str, Any] = {"script": ["make"], "tags": ["gpu"]}
        approve: dict[str, Any] = {"kind": "external"}
        if "queue_timeout_s" in timeouts:
            build["queue_timeout_s"] = timeouts["queue_timeout_s"]
        if "callback_timeout_s" in timeouts:
            approve["callback_timeout_s"] = timeouts["callback_timeout_s"]
        spec = {
            "name": self.next_name("release"),
            "variables": {"STAGE": "prod"},
            "jobs": {
                "build": build,
                "approve": approve,
                "deploy": {
                    "script": ["deploy"],
                    "async": True,
                    "needs": ["approve"],
                    "tags": ["gpu"],
                },
                "verify": {"kind": "external", "needs": ["build"]},
            },
        }
        response = self.call("POST", "/api/v1/pipelines", admin=True, body=spec)
        self.expect(response, 201)
        created = response.json()
        self.pipelines.append(created["id"])
        states = {job["name"]: job["state"] for job in created["jobs"]}
        assert states == {
            "build": "pending",
            "approve": "pending",
            "deploy": "created",
            "verify": "created",
        }
        for job in created["jobs"]:
            if job["state"] == "created":
                assert job["deadline_at"] is None, job  # its clocks start once its needs are met
            self.track(job)

    # -- the runner ------------------------------------------------------------------------

    @rule(
        data=st.data(),
        action=st.sampled_from(
            ["request", "request and confirm", "run", "confirm", "exit", "exit", "trace"]
        ),
    )
    def runner_acts(self, data: st.DataObject, action: str) -> None:
        """A runner asks for work, confirms or keeps a job alive, appends trace, reports an
        exit, or runs a job through; with the live job token mostly, sometimes a revoked one or
        a finished job's."""
        if action in ("request", "request and confirm", "run") or not self.runner_jobs():
            which = data.draw(st.sampled_from([0, 1]), label="runner (0: untagged, 1: gpu)")
            handed = self.request_job(which, and_confirm=action != "request")
            if action == "run" and handed is not None:
                job, job_token = handed
                self.append_trace(job, job_token, 0, b"$ make deploy\n")
                self.report_exit(job, job_token, data.draw(EXITS, label="exit"))
            return
        job, job_token = self.draw_job_token(data)
        if action == "confirm":
            self.confirm(job, job_token)
        elif action == "exit":
            outcome = data.draw(EXITS, label="exit")
            self.report_exit(job, job_token, outcome)
        else:
            shift = data.draw(st.sampled_from([0, 0, 0, 1, -1]), label="offset shift")
            text = data.draw(st.text(min_size=1, max_size=12), label="trace chunk")
            self.append_trace(job, job_token, shift, text.encode())

    def request_job(self, which: int, and_confirm: bool) -> tuple[TrackedJob, str] | None:
        """Ask for work as runner `which`: the oldest pending job it can run, or 204."""
        runner = self.runners[which]
        queued = self.db.execute(
            "SELECT id, spec FROM jobs WHERE state = 'pending' AND runner_id IS NULL"
            " AND kind = 'script' ORDER BY queued_at, id"
        ).fetchall()
        expected = next(
            (r["id"] for r in queued if runner.can_run(json.loads(r["spec"]).get("tags", []))),
            None,
        )
        response = self.call(
            "POST", "/api/v1/runner/jobs/request", bearer=runner.token, body={"wait_s": 0}
        )
        if expected is None:
            self.expect(response, 204)
            return None
        self.expect(response, 201)
        handout = response.json()
        assert handout["id"] == expected, "not the oldest pending job this runner can run"
        assert response.headers["Job-Status"] == "pending"
        assert self.row(expected)["state"] == "pending"
        job = self.jobs[expected]
        job.job_tokens.append(handout["token"])
        variables = {v["key"]: v for v in handout["variables"]}
        url = variables.get("CI_JOB_CONTINUE_URL")
        assert (url is not None) == job.is_async, handout
        if url is not None:
            assert url["masked"] is True
            assert job.continue_token is None, "a second hand-out while the first was live"
            job.continue_token = url["value"].removeprefix(f"{BASE_URL}/continue/")
        self.check_needs_outputs(job, variables)
        if and_confirm:
            self.confirm(job, handout["token"])
        return job, handout["token"]

    def check_needs_outputs(self, job: TrackedJob, variables: dict[str, Any]) -> None:
        """The outputs of the jobs it needs (the attempt of each that succeeded last: the need
        may have been retried since) are its variables."""
        row = self.row(job.id)
        for need in json.loads(row["needs"] or "[]"):
            upstream = self.db.execute(
                "SELECT outputs FROM jobs WHERE pipeline_id = ? AND name = ?"
                " AND state = 'success' ORDER BY attempt DESC",
                (job.pipeline_id, need),
            ).fetchone()
            assert upstream is not None, f"{job.name} handed out before {need} succeeded"
            for key, value in json.loads(upstream["outputs"] or "{}").items():
                assert variables[key]["value"] == value, (key, variables.get(key))

    def draw_job_token(self, data: st.DataObject) -> tuple[TrackedJob, str]:
        """Mostly the live token of a job that is not finished, sometimes any token ever
        handed out (revoked ones and finished jobs included)."""
        live = [j for j in self.runner_jobs() if self.row(j.id)["state"] not in TERMINAL]
        if live and data.draw(st.integers(0, 3), label="pick a live job") > 0:
            job = data.draw(st.sampled_from(live), label="job")
            return job, job.job_tokens[-1]
        job = data.draw(st.sampled_from(self.runner_jobs()), label="job")
        return job, data.draw(st.sampled_from(job.job_tokens), label="job token")

    def runner_expectation(self, row: sqlite3.Row, job_token: str, allowed: set[str]) -> int:
        """403 for a token that is not (or no longer) the job's, 409 on a terminal job or one
        in a state the call does not fit, else 0 (the call applies)."""
        if row["job_token_hash"] != token_hash(job_token):
            return 403
        if row["state"] in TERMINAL or row["state"] not in allowed:
            return 409
        return 0

    def check_job_status(self, response: httpx.Response, job_id: str) -> None:
        """Every runner answer about a job (but a 403) carries its state in `Job-Status`."""
        if response.status_code != 403:
            assert response.headers.get("Job-Status") == self.row(job_id)["state"], (
                response.status_code,
                response.headers,
            )

    def confirm(self, job: TrackedJob, job_token: str) -> None:
        before = self.row(job.id)
        expected = self.runner_expectation(before, job_token, {"pending", "running"})
        response = self.call(
            "PUT",
            f"/api/v1/runner/jobs/{job.id}",
            body={"state": "running"},
            headers={"Job-Token": job_token},
        )
        self.expect(response, expected or 200)
        self.check_job_status(response, job.id)
        if expected == 0:
            after = self.row(job.id)
            assert after["state"] == "running" and response.json() == {"state": "running"}
            assert after["runner_deadline_at"] == self.now() + 300
            assert after["confirm_deadline_at"] is None

    def report_exit(self, job: TrackedJob, job_token: str, update: dict[str, Any]) -> None:
        before = self.row(job.id)
        expected = self.runner_expectation(before, job_token, {"running"})
        response = self.call(
            "PUT", f"/api/v1/runner/jobs/{job.id}", body=update, headers={"Job-Token": job_token}
        )
        self.expect(response, expected or 200)
        self.check_job_status(response, job.id)
        if expected:
            return
        after = self.row(job.id)
        early = job.finisher if job.finisher_status == 202 else None
        if update["state"] == "failed":
            want, want_reason = "failed", update.get("failure_reason", "script_failure")
        elif not job.is_async:
            want, want_reason = "success", None
        elif early is None:
            want, want_reason = "waiting", None
        else:  # the terminal call kept early applies now
            want = early.state
            want_reason = "callback_failure" if want == "failed" else None
        assert (after["state"], after["failure_reason"]) == (want, want_reason), dict(after)
        assert response.json() == {"state": want}

    def append_trace(self, job: TrackedJob, job_token: str, shift: int, chunk: bytes) -> None:
        before = self.row(job.id)
        start = max(0, before["trace_size"] + shift)
        expected = self.runner_expectation(before, job_token, {"running"})
        if expected == 0 and start != before["trace_size"]:
            expected = 416
        last = start + len(chunk) - 1
        response = self.call(
            "PATCH",
            f"/api/v1/runner/jobs/{job.id}/trace",
            content=chunk,
            headers={"Job-Token": job_token, "Content-Range": f"{start}-{last}"},
        )
        self.expect(response, expected or 202)
        if expected == 0:
            size = before["trace_size"] + len(chunk)
            assert response.headers["Range"] == f"0-{size}"
            assert self.row(job.id)["trace_size"] == size
            assert self.row(job.id)["runner_deadline_at"] == self.now() + 300

    # -- the external system, with a continue URL -------------------------------------------

    @precondition(lambda self: self.tokened_jobs())
    @rule(
        data=st.data(),
        action=st.sampled_from(
            [
                "callback",
                "callback",
                "repeat",
                "start",
                "heartbeat",
                "log",
                "artifact",
                "GET",
                "HEAD",
                "invalid",
            ]
        ),
    )
    def external_system_calls(self, data: st.DataObject, action: str) -> None:
        """Whoever holds a continue URL (mostly a live one) finishes the job, repeats the call
        that finished it, reports progress, uploads an artifact, looks at it (a link unfurler
        too), or sends garbage."""
        job, token = self.draw_continue_token(data)
        if action in ("callback", "repeat"):
            body = data.draw(st.sampled_from(CALLBACK_BODIES), label="body")
            key = data.draw(st.sampled_from([None, None, "key-1", "key-2"]), label="key")
            if action == "repeat" and job.finisher is not None:
                body = job.finisher.body
                key = data.draw(st.sampled_from([None, job.finisher.key]), label="key")
            self.terminal_callback(job, token, body, key)
        elif action in ("GET", "HEAD"):
            self.view(job, token, action)
        elif action == "artifact":
            self.upload_artifact(job, token, data.draw(st.sampled_from(["report.txt", "log"])))
        elif action == "invalid":
            self.invalid_callback(token, data.draw(st.sampled_from(INVALID_CALLBACKS)))
        else:
            self.progress_call(job, token, action)

    def draw_continue_token(self, data: st.DataObject) -> tuple[TrackedJob, str]:
        """Mostly the live URL of a job that is not finished, sometimes any URL ever minted."""
        live = [
            j
            for j in self.jobs.values()
            if j.continue_token is not None and self.row(j.id)["state"] not in TERMINAL
        ]
        if live and data.draw(st.integers(0, 3), label="pick a live job") > 0:
            job = data.draw(st.sampled_from(live), label="job")
            assert job.continue_token is not None
            return job, job.continue_token
        job = data.draw(st.sampled_from(self.tokened_jobs()), label="job")
        tokens = [t for t in [job.continue_token, *job.revoked_tokens] if t is not None]
        return job, data.draw(st.sampled_from(tokens), label="continue token")

    def terminal_call_expectation(
        self, job: TrackedJob, row: sqlite3.Row | None, call: Call
    ) -> tuple[int, str | None]:
        """(status, error code) the contract gives a terminal call, from the job's row."""
        if row is None:
            return 404, "not_found"
        state = row["state"]
        first = job.finisher
        if state in TERMINAL:
            by_call = state == "success" or row["failure_reason"] == "callback_failure"
            if by_call and first is not None and call.repeats(first):
                return 200, None
            return 409, "already_final"
        if state == "created":
            return 409, "not_ready"
        if job.is_async and state in ("pending", "running"):
            if first is None or call.repeats(first):
                return 202, None
            return 409, "conflict"
        return 200, None

    def terminal_callback(
        self, job: TrackedJob, token: str, body: dict[str, Any] | None, key: str | None
    ) -> None:
        call = Call(_normal(body), key)
        row = self.row_by_token(token)
        status, code = self.terminal_call_expectation(job, row, call)
        response = self.call(
            "POST",
            f"/continue/{token}",
            content=b"" if body is None else json.dumps(body).encode(),
            headers={"Idempotency-Key": key} if key else None,
        )
        self.expect(response, status, code)
        answer = response.json()
        if status == 404:
            assert answer == UNKNOWN_TOKEN_BODY
            return
        assert row is not None
        if code == "already_final":
            assert answer["state"] == row["state"]
            assert answer["failure_reason"] == row["failure_reason"]
            return
        if status >= 400:
            return
        if status == 202:
            assert answer == {"job_id": job.id, "state": row["state"]}
            job.finisher, job.finisher_status = job.finisher or call, 202
            return
        if row["state"] in TERMINAL:  # the replay of the call that finished it
            if job.finisher_answer is not None:
                assert answer == job.finisher_answer, (answer, job.finisher_answer)
            else:  # kept early, applied when the script exited: the job as it ended
                assert job.finisher_status == 202
                assert answer == {"job_id": job.id, "state": row["state"]}
            return
        assert answer == {"job_id": job.id, "state": call.state}
        assert self.row(job.id)["state"] == call.state
        job.finisher, job.finisher_status, job.finisher_answer = call, 200, answer

    def invalid_callback(self, token: str, case: tuple[bytes, int]) -> None:
        """Refused (400/422) after the token check, and not consumed (`call` checks that)."""
        row = self.row_by_token(token)
        response = self.call("POST", f"/continue/{token}", content=case[0])
        self.expect(response, 404 if row is None else case[1])

    def view(self, job: TrackedJob, token: str, method: str) -> None:
        """GET and HEAD show the job and complete nothing, but a GET on the URL of a job created
        with `continue_on_get`, which counts as the terminal call `{}`."""
        row = self.row_by_token(token)
        live = row is not None and row["state"] not in TERMINAL and row["state"] != "created"
        on_get = live and method == "GET" and json.loads(row["spec"]).get("continue_on_get")
        response = self.call(method, f"/continue/{token}", completing_get=bool(on_get))
        if row is None:
            self.expect(response, 404)
            if method == "GET":
                assert response.json() == UNKNOWN_TOKEN_BODY
            return
        self.expect(response, 200)
        if method == "HEAD":
            return
        after = self.row(job.id)
        assert response.json() == {
            "job_id": job.id,
            "state": after["state"],
            "deadline_at": response.json()["deadline_at"],
        }
        if not on_get:
            return
        call = Call({}, None)
        if job.is_async and row["state"] in ("pending", "running"):  # kept early, if it can be
            assert after["state"] == row["state"]
            if job.finisher is None:
                job.finisher, job.finisher_status = call, 202
        else:
            assert after["state"] == "success", dict(after)
            job.finisher, job.finisher_status = call, 200
            job.finisher_answer = {"job_id": job.id, "state": "success"}

    def upload_artifact(self, job: TrackedJob, token: str, name: str) -> None:
        """An upload on the URL is a heartbeat; while an async script still runs it is kept
        (the job's result may come before the terminal call); refused once the job ended."""
        row = self.row_by_token(token)
        status, code = _refusal(row) or (201, None)
        response = self.call(
            "PUT",
            f"/continue/{token}/artifacts/{name}",
            content=b"42 tests passed\n",
            headers={"Content-Type": "text/plain"},
        )
        self.expect(response, status, code)
        if status != 201:
            return
        after = self.row(job.id)
        assert name in [a["name"] for a in json.loads(after["artifacts"])]
        assert after["state"] == row["state"]

    def progress_call(self, job: TrackedJob, token: str, action: str) -> None:
        row = self.row_by_token(token)
        status, code = _refusal(row) or (200, None)
        parked = row is None or not (job.is_async and row["state"] in ("pending", "running"))
        if status == 200 and not parked:
            status, code = 409, "not_parked"
        text = b"step 3/7 done\n" if action == "log" else None
        response = self.call("POST", f"/continue/{token}/{action}", content=text)
        self.expect(response, status, code)
        if status != 200:
            return
        assert row is not None
        after = self.row(job.id)
        want = "running" if action == "start" and row["state"] == "pending" else row["state"]
        assert after["state"] == want, (action, row["state"], after["state"])
        assert response.json()["state"] == want
        hb = json.loads(after["spec"]).get("heartbeat_timeout_s")
        if hb is not None:
            assert after["heartbeat_deadline_at"] == self.now() + hb
        if text is not None:
            assert after["trace_size"] == row["trace_size"] + len(text)

    # -- an operator, and time ---------------------------------------------------------------

    @rule(data=st.data(), action=st.sampled_from(["cancel", "retry", "retry", "cancel pipeline"]))
    def operator_acts(self, data: st.DataObject, action: str) -> None:
        """An operator cancels a job or a pipeline, or retries a job (mostly a finished latest
        attempt)."""
        if action == "cancel pipeline" and self.pipelines:
            self.cancel_pipeline(data.draw(st.sampled_from(self.pipelines), label="pipeline"))
            return
        jobs = list(self.jobs.values())
        if action == "retry":
            finished = [j for j in jobs if self.row(j.id)["state"] in TERMINAL]
            if finished and data.draw(st.integers(0, 3), label="pick a finished job") > 0:
                jobs = finished
        job = data.draw(st.sampled_from(jobs), label="job")
        if action == "retry":
            self.retry(job)
        else:
            self.cancel(job)

    def cancel_pipeline(self, pipeline_id: str) -> None:
        before = self.db.execute("SELECT * FROM pipelines WHERE id = ?", (pipeline_id,)).fetchone()
        response = self.call("POST", f"/api/v1/pipelines/{pipeline_id}/cancel", admin=True)
        if before["state"] in ("success", "failed", "canceled"):
            self.expect(response, 409, "already_final")
            return
        self.expect(response, 200)
        shown = response.json()
        assert shown["state"] == "canceled"
        assert all(job["state"] in TERMINAL for job in shown["jobs"]), shown

    def cancel(self, job: TrackedJob) -> None:
        before = self.row(job.id)
        response = self.call("POST", f"/api/v1/jobs/{job.id}/cancel", admin=True)
        if before["state"] in TERMINAL:
            self.expect(response, 409, "already_final")
            return
        self.expect(response, 200)
        assert response.json()["state"] == "canceled"

    def retry(self, job: TrackedJob) -> None:
        before = self.row(job.id)
        retried = self.db.execute("SELECT 1 FROM jobs WHERE retry_of = ?", (job.id,)).fetchone()
        response = self.call("POST", f"/api/v1/jobs/{job.id}/retry", admin=True)
        if before["state"] not in TERMINAL:
            self.expect(response, 409)
            return
        if retried is not None:
            self.expect(response, 409, "not_latest_attempt")
            return
        self.expect(response, 201)
        attempt = response.json()
        assert attempt["attempt"] == before["attempt"] + 1 and attempt["retry_of"] == job.id
        # a pipeline job whose needs failed is skipped again at once
        assert attempt["state"] in ("pending", "created", "skipped")
        assert (attempt["kind"] == "external") == ("continue_url" in attempt)
        self.track(attempt)
        for reopened in attempt.get("reopened", []):
            assert reopened["state"] in ("created", "skipped") and reopened["attempt"] >= 2
            self.track(reopened)
        assert tuple(self.row(job.id)) == tuple(before), "the old attempt changed"

    @rule(seconds=CLOCK_JUMPS, then_sweep=st.sampled_from([True, True, True, False]))
    def time_passes(self, seconds: int, then_sweep: bool) -> None:
        """The clock jumps and (mostly) the sweeper runs once: every due deadline fires with
        the reason of the earliest one, and none is left due. Without a sweep, whatever comes
        next races deadlines that have passed but not fired yet."""
        self.clock.advance(seconds)
        if not then_sweep:
            return
        now = self.now()
        due = self.db.execute("SELECT * FROM jobs WHERE deadline_at <= ?", (now,)).fetchall()
        self.loop.run(self.app.state.sweeper.sweep_once())
        for before in due:
            after = self.row(before["id"])
            first = min(
                (before[column], position, reason)
                for position, (column, reason) in enumerate(DEADLINES.items())
                if before[column] is not None
            )
            assert first[0] == before["deadline_at"], dict(before)
            if first[2] is None:  # a hand-out nobody confirmed: back in the queue
                assert after["runner_id"] is None and after["job_token_hash"] is None
                assert after["state"] in ("pending", "failed"), dict(after)
                continue
            assert (after["state"], after["failure_reason"]) == ("failed", first[2])
            last = self.events(before["id"])[-1]
            assert last["cause"] == "deadline" and last["at"] == now
        self.sync_revocations()
        overdue = self.db.execute(
            "SELECT id, state, deadline_at FROM jobs WHERE deadline_at <= ?", (now,)
        ).fetchall()
        assert not overdue, f"deadlines still due after the sweep: {[dict(r) for r in overdue]}"

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def events_are_one_gapless_history_with_one_terminal_transition(self) -> None:
        for row in self.db.execute("SELECT * FROM jobs ORDER BY id").fetchall():
            events = self.events(row["id"])
            assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
            assert row["event_sequence"] == len(events)
            assert events[0]["previous_state"] is None
            for earlier, later in itertools.pairwise(events):
                assert later["previous_state"] == earlier["state"], [dict(e) for e in events]
                assert later["at"] >= earlier["at"]
                assert later["state"] != earlier["state"]
            terminal = [e for e in events if e["state"] in TERMINAL]
            assert len(terminal) <= 1, [dict(e) for e in events]
            assert not terminal or terminal[0] is events[-1]
            assert events[-1]["state"] == row["state"]
            job = self.jobs.get(row["id"])
            if job is not None and job.checked_events != len(events):
                self.check_through_the_api(row, events)
                job.checked_events = len(events)

    def check_through_the_api(self, row: sqlite3.Row, events: list[sqlite3.Row]) -> None:
        """What the API shows of a job that moved matches what is stored."""
        shown = self.call("GET", f"/api/v1/jobs/{row['id']}", admin=True).json()
        assert shown["state"] == row["state"]
        assert shown["failure_reason"] == row["failure_reason"]
        listed = self.call("GET", f"/api/v1/jobs/{row['id']}/events?limit=500", admin=True).json()[
            "items"
        ]
        assert [(e["sequence"], e["state"], e["previous_state"], e["cause"]) for e in listed] == [
            (e["sequence"], e["state"], e["previous_state"], e["cause"]) for e in events
        ]

    @invariant()
    def every_waiting_job_has_a_deadline_or_a_runner_lease(self) -> None:
        for row in self.db.execute("SELECT * FROM jobs").fetchall():
            set_columns = [row[c] for c in DEADLINES if row[c] is not None]
            assert row["deadline_at"] == (min(set_columns) if set_columns else None), dict(row)
            state, kind = row["state"], row["kind"]
            if state in TERMINAL:
                assert not set_columns and row["finished_at"] is not None, dict(row)
                assert (row["failure_reason"] is not None) == (state == "failed"), dict(row)
                continue
            assert row["finished_at"] is None and row["failure_reason"] is None, dict(row)
            if state == "created":
                assert not set_columns, dict(row)  # its clocks start when its needs are met
            elif kind == "external" or state == "waiting":
                assert row["callback_deadline_at"] is not None, dict(row)  # nothing waits forever
            elif state == "running":
                assert row["runner_deadline_at"] is not None, dict(row)
            elif row["runner_id"] is not None:
                assert row["confirm_deadline_at"] is not None, dict(row)
            else:  # queued for a runner: bounded only when queue_timeout_s is set
                queue = json.loads(row["spec"]).get("queue_timeout_s")
                assert (row["queue_deadline_at"] is not None) == (queue is not None), dict(row)

    @invariant()
    def every_accepted_callback_is_reflected(self) -> None:
        self.sync_revocations()
        for job in self.jobs.values():
            row = self.row(job.id)
            last_cause = self.events(job.id)[-1]["cause"]
            by_call = last_cause == "callback"
            if row["state"] == "success" and (job.kind == "external" or job.is_async):
                assert by_call, f"{job.name} succeeded without a callback"
            call = job.finisher
            if by_call:
                assert call is not None, f"{job.name} finished by a callback nobody got 2xx for"
            if call is None:
                continue
            if job.finisher_status == 200:
                assert by_call and row["state"] == call.state, (dict(row), call)
            elif not by_call:  # kept early: applied at exit 0, unless something else ended it
                assert row["state"] in ("pending", "running", "failed", "canceled"), dict(row)
                continue
            assert row["state"] == call.state
            assert json.loads(row["outputs"] or "{}") == call.body.get("outputs", {})
            result = call.body.get("result")
            assert (None if row["result"] is None else json.loads(row["result"])) == result
            if "message" in call.body:
                assert row["message"] == call.body["message"]

    @invariant()
    def no_live_continue_url_on_a_terminal_job(self) -> None:
        for job in self.jobs.values():
            for token in set(job.revoked_tokens) - job.probed_revoked:
                response = self.call("POST", f"/continue/{token}/heartbeat")
                self.expect(response, 404)
                assert response.json() == UNKNOWN_TOKEN_BODY
                job.probed_revoked.add(token)
            row = self.row(job.id)
            if job.continue_token is None or job.probed_terminal or row["state"] not in TERMINAL:
                continue
            job.probed_terminal = True
            token = job.continue_token
            for action in ("start", "heartbeat", "log"):
                self.expect(self.call("POST", f"/continue/{token}/{action}"), 409, "already_final")
            late = self.call("POST", f"/continue/{token}", body={"message": "a late caller"})
            self.expect(late, 409, "already_final")
            assert late.json()["state"] == row["state"]
            assert late.json()["failure_reason"] == row["failure_reason"]

    @invariant()
    def pipelines_are_settled(self) -> None:
        """No job is left `created` once its needs decided, and the API shows each pipeline's
        latest attempts."""
        for pipeline_id in self.pipelines:
            latest = {
                r["name"]: r
                for r in self.db.execute(
                    "SELECT * FROM jobs WHERE pipeline_id = ? AND NOT EXISTS"
                    " (SELECT 1 FROM jobs AS later WHERE later.retry_of = jobs.id)",
                    (pipeline_id,),
                )
            }
            for row in latest.values():
                if row["state"] != "created":
                    continue
                needs = [latest[n]["state"] for n in json.loads(row["needs"])]
                assert not all(s == "success" for s in needs), (row["name"], needs)
                assert not any(s in ("failed", "canceled", "skipped") for s in needs), needs
            shown = self.call("GET", f"/api/v1/pipelines/{pipeline_id}", admin=True).json()
            assert {j["name"]: j["id"] for j in shown["jobs"]} == {
                name: r["id"] for name, r in latest.items()
            }
            stored = self.db.execute(
                "SELECT * FROM pipelines WHERE id = ?", (pipeline_id,)
            ).fetchone()
            assert shown["state"] == stored["state"]
            states = [r["state"] for r in latest.values()]
            if stored["canceled"]:
                assert stored["state"] == "canceled"
            elif all(s in TERMINAL for s in states):
                assert stored["state"] in ("success", "failed", "canceled"), (states, stored)
                assert (stored["state"] == "failed") == ("failed" in states), (states, stored)
                if stored["state"] == "success":
                    assert set(states) <= {"success", "skipped"}, states
            else:
                assert stored["state"] in ("pending", "running", "waiting"), (states, stored)
            events = self.db.execute(
                "SELECT sequence, state, previous_state FROM pipeline_events"
                " WHERE pipeline_id = ? ORDER BY sequence",
                (pipeline_id,),
            ).fetchall()
            assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
            assert stored["event_sequence"] == len(events)
            for earlier, later in itertools.pairwise(events):
                assert later["previous_state"] == earlier["state"] != later["state"]
            if events:
                assert events[-1]["state"] == stored["state"]


# `make test` explores a small budget; GATEWAY_TEST_STATEFUL_EXAMPLES=2000 explores far more.
STATEFUL_EXAMPLES_VARIABLE = "GATEWAY_TEST_STATEFUL_EXAMPLES"
MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.timeout(900)  # shrinking a failure replays many runs; a pass takes seconds
def test_random_interleavings_keep_the_contract() -> None:
    """Whatever runners, callers, operators and the clock do in whatever order, every answer
    is the contract's and the invariants hold after every step."""
    examples = os.environ.get(STATEFUL_EXAMPLES_VARIABLE)
    budget = MACHINE_SETTINGS
    if examples:
        budget = settings(MACHINE_SETTINGS, max_examples=int(examples))
    run_state_machine_as_test(GatewayMachine, settings=budget)


# --- regressions found by the machine ----------------------------------------------------------


async def test_a_requeued_hand_out_whose_queue_deadline_passed_fails_in_the_same_sweep(
    client: httpx.AsyncClient, clock: ManualClock, app: Starlette
) -> None:
    """A hand-out nobody confirmed goes back to the queue, and a queue deadline that passed
    too fires in that same sweep (queue_timeout), so no runner can take the job meanwhile."""
    runner = (await client.post("/api/v1/runners", json={})).json()["token"]
    job = await create_job(client, kind="script", script=["make"], queue_timeout_s=500)
    handout = await client.post(
        "/api/v1/runner/jobs/request",
        json={"wait_s": 0},
        headers={"Authorization": f"Bearer {runner}"},
    )
    assert handout.status_code == 201 and handout.json()["id"] == job["id"]

    clock.advance(600)  # past the confirmation (60 s) and the queue deadline (500 s)
    await sweep(app)

    shown = (await client.get(f"/api/v1/jobs/{job['id']}")).json()
    assert (shown["state"], shown["failure_reason"]) == ("failed", "queue_timeout")
    assert shown["deadline_at"] is None
    again = await client.post(
        "/api/v1/runner/jobs/request",
        json={"wait_s": 0},
        headers={"Authorization": f"Bearer {runner}"},
    )
    assert again.status_code == 204


async def test_a_job_released_by_an_upstream_success_gets_its_outputs_after_a_retry(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """A job made pending by its need's success is handed that attempt's outputs even when the
    need was retried meanwhile (its new attempt has none yet)."""
    runner = (await client.post("/api/v1/runners", json={})).json()["token"]
    created = await client.post(
        "/api/v1/pipelines",
        json={
            "name": "release",
            "jobs": {
                "approve": {"kind": "external"},
                "deploy": {"script": ["deploy"], "needs": ["approve"]},
            },
        },
    )
    assert created.status_code == 201, created.text
    approve = next(job for job in created.json()["jobs"] if job["name"] == "approve")
    done = await anon.post(
        continue_path(approve), json={"outputs": {"HOST": "node-1", "VERSION": "1.2"}}
    )
    assert done.status_code == 200
    assert (await client.post(f"/api/v1/jobs/{approve['id']}/retry")).status_code == 201

    handout = await client.post(
        "/api/v1/runner/jobs/request",
        json={"wait_s": 0},
        headers={"Authorization": f"Bearer {runner}"},
    )
    assert handout.status_code == 201 and handout.json()["name"] == "deploy"
    variables = {v["key"]: v["value"] for v in handout.json()["variables"]}
    assert (variables.get("HOST"), variables.get("VERSION")) == ("node-1", "1.2")
