"""Crash audit: a mixed load on real `gateway serve` processes killed with SIGKILL at random
moments, then an audit of the database and of loopback webhook receivers.

Run: `.venv/bin/python bench/chaos.py [--db sqlite|postgresql://...] [--replicas N] [--kills N]
[--seed N] [--quick] [--json PATH]`.

- `--db sqlite` (default): one server on a SQLite file. `--db postgresql://user@host/db`: a
  fresh database is created on that server (and dropped afterwards) and `--replicas` (default 2)
  servers share it. Every replica has the same keys; clients pick a live replica per request.
- Load: concurrent async clients create external jobs, async and plain script jobs, and
  pipelines with `needs`; protocol-level runners request, confirm, append trace and report exit
  (some drop a hand-out unconfirmed, some vanish after confirming); external systems call the
  continue URLs: once, exact duplicates (same body, with or without the same
  `Idempotency-Key`), two different bodies racing on two connections, early (while an async
  script still runs), late (after a 1-3 s `callback_timeout_s`); operators cancel (some racing
  a callback) and retry. One `*` subscription, and `state_webhook_url` on some jobs and
  pipelines, point at two loopback receivers (their own processes) that answer 500 now and then.
- A killer SIGKILLs a server (on PostgreSQL now and then both) after a random pause, `--kills`
  times, and starts it again; one restart in five is killed too, at a random moment of its
  start-up (counted apart, as `startup_kills`). Clients ride through: a request refused at
  connect is re-sent to a live replica; a request whose answer was lost is re-sent when it is
  idempotent (continue calls keep their body and `Idempotency-Key`; runner calls are
  keepalives, offset-checked trace appends, exit reports), else its outcome is **unknown**
  (never "failed").
- Then the load stops, runners drain the queue, every short deadline fires, and every delivery
  ends (all within a deadline). The audit reads the database directly (sqlite3 / asyncpg) and
  through the API, and the receivers' records:
  1. every terminal call answered 200 is reflected in its job (state, outputs, message, result;
     the terminal event's cause is `callback`); a call answered 202 (early) is applied when the
     script's exit 0 was accepted and is dropped only when the job failed or was canceled; no
     two different calls are accepted for one job; no external or async job succeeds but by
     its callback (a GET of the URL, which clients also send, never completes it); no job has
     two hand-outs confirmed or two exit reports accepted; an accepted exit report, job
     cancel or pipeline cancel decided the job's (or pipeline's) state;
  2. every job's events are one gapless history whose last event is its state, with exactly one
     terminal transition when the job is terminal and none otherwise;
  3. every event (job and pipeline) reached the `*` receiver with a 2xx by its `webhook-id`,
     every delivery row of an implicit subscription reached the other receiver, no delivery is
     left pending or failed, no `webhook-id` arrived that no committed event has, every
     signature verifies, and every arrival of one `webhook-id` carries the same body bytes as
     the stored message. Content is compared on the **whole body**: the outbox freezes the
     body with the transition, so nothing in it may vary between attempts; only the
     `webhook-timestamp` and `webhook-signature` headers are per attempt;
  4. every continue token a client holds for a terminal job answers a new terminal call with
     409 `already_final` and the job's state (404 for a hand-out's URL that was revoked when the
     hand-out was requeued);
  5. every non-terminal job has a deadline (`deadline_at`, which includes the runner and
     confirmation leases) or is `created` behind a need that has not ended; every terminal one
     has none;
  6. a trace whose appends were all acknowledged reads back byte for byte;
  7. no answer was a 5xx.
  It prints requests by kind and outcome, kills, jobs, transitions, deliveries, duplicate
  deliveries (allowed: at least once) and violations; the exit code is 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import random
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402
    Cluster,
    HarnessError,
    Receiver,
    describe_checkout,
    postgres_database,
)
from gateway.store.postgres.bridge import to_postgres  # noqa: E402

TERMINAL = frozenset({"success", "failed", "canceled", "skipped"})
LONG_DEADLINE_S = 3600  # jobs deliberately left parked: non-terminal with a deadline
REQUEST_TIMEOUT_S = 10.0
RECEIVER_FAIL_RATE = 0.05
DROP_HANDOUT_P = 0.05  # a runner that takes a job and never confirms it
VANISH_P = 0.03  # a runner that confirms and goes silent (runner_system_failure)
STARTUP_KILL_P = 0.2  # a restart that is killed too, at a random moment of its start


@dataclass(frozen=True)
class Profile:
    """How hard and how long: the full run, or the short one `make test` runs."""

    actors: int
    runners: int
    kill_gap_s: float  # pause before each kill: uniform in [0, kill_gap_s]
    short_deadline_s: int  # queue and pipeline deadlines, and how long a client rides
    settle_s: float  # for the clients to finish what they started once the kills are done
    drain_s: float  # for deadlines to fire and deliveries to end


FULL = Profile(actors=20, runners=6, kill_gap_s=3.0, short_deadline_s=20, settle_s=60, drain_s=90)
QUICK = Profile(actors=8, runners=3, kill_gap_s=2.0, short_deadline_s=8, settle_s=20, drain_s=30)

GATEWAY_ENV = {
    "GATEWAY_SWEEP_INTERVAL_S": "0.2",
    "GATEWAY_CONFIRM_TIMEOUT_S": "2",
    "GATEWAY_RUNNER_HEARTBEAT_TIMEOUT_S": "5",
    "GATEWAY_WEBHOOK_TIMEOUT_S": "2",
    "GATEWAY_WEBHOOK_RETRY_SCHEDULE": ",".join(["0.2", "0.5"] + ["1"] * 30),
}


# --------------------------------------------------------------------------------------------
# What the clients saw
# --------------------------------------------------------------------------------------------


@dataclass
class Call:
    """One terminal call on a continue URL, with its re-sends after a lost answer."""

    job_id: str
    token: str
    body: dict[str, Any]
    key: str | None
    status: int | None = None  # None: never answered (unknown)
    answer: Any = None

    @property
    def state(self) -> str:
        if "status" in self.body:
            return str(self.body["status"])
        return "failed" if self.body.get("exit_code", 0) else "success"

    def repeats(self, other: Call) -> bool:
        """The contract's exact repeat: a JSON-equal body, or the same `Idempotency-Key`."""
        return self.body == other.body or (self.key is not None and self.key == other.key)


@dataclass
class Tracked:
    """A job some client learned of: its continue tokens and what was answered about it."""

    id: str
    kind: str
    is_async: bool
    live_tokens: set[str] = field(default_factory=set)  # should stay known to the server
    maybe_revoked: set[str] = field(default_factory=set)  # a hand-out's URL that may be requeued
    calls: list[Call] = field(default_factory=list)
    exits: list[tuple[dict[str, Any], int, Any]] = field(default_factory=list)  # accepted ones
    cancels_ok: int = 0
    confirmed: set[str] = field(default_factory=set)  # job tokens whose confirmation got 200
    trace: bytes | None = None  # every append acknowledged and the exit accepted


class Books:
    """Every outcome, every tracked job, every violation found while the load ran."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.events: Counter[str] = Counter()
        self.jobs: dict[str, Tracked] = {}
        self.pipelines_canceled: set[str] = set()  # a cancel answered 200
        self.violations: list[str] = []

    def count(self, kind: str, outcome: str) -> None:
        self.requests[(kind, outcome)] += 1

    def job(self, job_id: str, kind: str, is_async: bool) -> Tracked:
        if job_id not in self.jobs:
            self.jobs[job_id] = Tracked(job_id, kind, is_async)
        return self.jobs[job_id]

    def violation(self, what: str) -> None:
        self.violations.append(what)


# --------------------------------------------------------------------------------------------
# Talking to the gateways through kills
# --------------------------------------------------------------------------------------------


class Gateways:
    """The base URL of each replica, None while it is down (the killer keeps this current)."""

    def __init__(self, urls: list[str]) -> None:
        self.urls: list[str | None] = list(urls)
        self.changed = asyncio.Event()
        self._pick = random.Random(0)

    def pick(self) -> str | None:
        live = [url for url in self.urls if url is not None]
        return self._pick.choice(live) if live else None

    def down(self, index: int) -> None:
        self.urls[index] = None

    def up(self, index: int, url: str) -> None:
        self.urls[index] = url
        self.changed.set()
        self.changed = asyncio.Event()


def token_of(url: str) -> str:
    return url.rsplit("/continue/", 1)[1]


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class Api:
    """Requests that ride through kills. A request refused at connect never reached a server:
    it is re-sent to a live replica. One whose answer was lost is re-sent only when
    `idempotent`; otherwise it is counted `unknown` and None is returned."""

    def __init__(self, http: httpx.AsyncClient, gateways: Gateways, books: Books, ride_s: float):
        self.http = http
        self.gateways = gateways
        self.books = books
        self.ride_s = ride_s

    async def send(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        idempotent: bool,
        body: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response | None:
        give_up = time.monotonic() + self.ride_s
        while True:
            base = self.gateways.pick()
            if base is None:
                if time.monotonic() > give_up:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.gateways.changed.wait(), 0.5)
                continue
            try:
                response = await self.http.request(
                    method, base + path, json=body, content=content, headers=headers
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
                self.books.count(kind, "refused_at_connect")
            except httpx.TransportError:
                self.books.count(kind, "answer_lost")
                if not idempotent:
                    break
            else:
                outcome = f"{response.status_code // 100}xx"
                self.books.count(kind, outcome)
                if response.status_code >= 500:
                    self.books.violation(
                        f"{kind}: {method} {path.split('/continue/')[0]} answered"
                        f" {response.status_code}: {response.text[:200]}"
                    )
                return response
            if time.monotonic() > give_up:
                break
            await asyncio.sleep(0.05)  # back-off before a re-send, not synchronisation
        self.books.count(kind, "unknown")
        return None


# --------------------------------------------------------------------------------------------
# The load
# --------------------------------------------------------------------------------------------


class Load:
    """Actors (job creators, external systems, operators) and runners on one `Api`."""

    def __init__(
        self,
        api: Api,
        books: Books,
        profile: Profile,
        admin_token: str,
        hook_url: str,
        seed: int,
    ) -> None:
        self.api = api
        self.books = books
        self.profile = profile
        self.admin = {"Authorization": f"Bearer {admin_token}"}
        self.hook_url = hook_url
        self.seed = seed
        self.stop_creating = asyncio.Event()
        self.stop_running = asyncio.Event()
        self.names = itertools.count()
        self.external_tasks: set[asyncio.Task[None]] = set()

    # -- helpers ---------------------------------------------------------------------------

    def name(self, prefix: str) -> str:
        return f"{prefix}-{next(self.names)}"

    def callback_body(self, rng: random.Random, tag: str) -> dict[str, Any]:
        failed = rng.random() < 0.25
        body: dict[str, Any] = {"message": f"{tag} {rng.getrandbits(32):08x}"}
        if failed:
            body["status"] = "failed"
            body["exit_code"] = rng.choice([1, 2, 42])
        else:
            body["outputs"] = {"IP": f"10.0.{rng.randrange(256)}.{rng.randrange(256)}"}
        if rng.random() < 0.5:
            body["result"] = {"n": rng.randrange(1000), "tag": tag}
        return body

    async def terminal_call(
        self, job: Tracked, token: str, body: dict[str, Any], key: str | None
    ) -> Call:
        call = Call(job.id, token, body, key)
        job.calls.append(call)
        headers = {"Idempotency-Key": key} if key else None
        response = await self.api.send(
            "continue.call",
            "POST",
            f"/continue/{token}",
            idempotent=True,
            body=body,
            headers=headers,
        )
        if response is not None:
            call.status, call.answer = response.status_code, _json(response)
        return call

    async def repeat(self, job: Tracked, first: Call, same_key: bool) -> None:
        """An exact repeat of an answered call gets the same answer again."""
        key = first.key if same_key else None
        again = await self.terminal_call(job, first.token, first.body, key)
        answered = first.status in (200, 202) and again.status is not None
        ended_meanwhile = (  # a kept early call is dropped when a cancel or deadline ends it
            first.status == 202
            and again.status == 409
            and (again.answer or {}).get("error") == "already_final"
        )
        same = (again.status, again.answer) == (first.status, first.answer)
        if answered and not ended_meanwhile and not same:
            self.books.violation(
                f"job {job.id}: an exact repeat of a call answered {first.status}"
                f" {first.answer} got {again.status} {again.answer}"
            )

    async def create(self, kind: str, path: str, body: dict[str, Any]) -> Any:
        response = await self.api.send(
            kind, "POST", path, idempotent=False, body=body, headers=self.admin
        )
        if response is None or response.status_code != 201:
            return None
        return response.json()

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        response = await self.api.send(
            "job.get", "GET", f"/api/v1/jobs/{job_id}", idempotent=True, headers=self.admin
        )
        if response is None or response.status_code != 200:
            return None
        job: dict[str, Any] = response.json()
        return job

    async def until_terminal(self, job_id: str, within_s: float) -> dict[str, Any] | None:
        give_up = time.monotonic() + within_s
        while time.monotonic() < give_up:
            job = await self.get_job(job_id)
            if job is not None and job["state"] in TERMINAL:
                return job
            await asyncio.sleep(0.25)  # polling with a deadline
        return None

    async def cancel(self, job: Tracked) -> None:
        if await self.admin_post("job.cancel", f"/api/v1/jobs/{job.id}/cancel"):
            job.cancels_ok += 1

    async def admin_post(self, kind: str, path: str) -> bool:
        """POST `path` with no body as the admin; whether it answered 200."""
        response = await self.api.send(kind, "POST", path, idempotent=False, headers=self.admin)
        return response is not None and response.status_code == 200

    def track(self, item: dict[str, Any]) -> Tracked:
        """Book a job an answer lists (created, reopened), with its continue URL's token."""
        job = self.books.job(item["id"], item["kind"], item["async"])
        if "continue_url" in item:
            job.live_tokens.add(token_of(item["continue_url"]))
        return job

    async def retry(self, job: Tracked, rng: random.Random) -> Any:
        """Retry a terminal job; an external one's new attempt is called back at once."""
        answer = await self.create("job.retry", f"/api/v1/jobs/{job.id}/retry", {})
        if answer is None:
            return None
        new = self.track(answer)
        for item in answer.get("reopened", []):
            self.track(item)
        if job.kind == "external" and "continue_url" in answer:
            await asyncio.sleep(rng.uniform(0, 0.3))  # the external system's pace
            await self.terminal_call(
                new, token_of(answer["continue_url"]), self.callback_body(rng, "retried"), None
            )
        return answer

    # -- actors ----------------------------------------------------------------------------

    async def actor(self, index: int) -> None:
        rng = random.Random(f"{self.seed}-actor-{index}")
        scenarios = [self.external_job, self.script_job, self.pipeline]
        while not self.stop_creating.is_set():
            scenario = rng.choices(scenarios, weights=[5, 4, 2])[0]
            await scenario(rng)

    async def external_job(self, rng: random.Random) -> None:
        short = rng.random() < 0.3
        spec: dict[str, Any] = {
            "name": self.name("ext"),
            "callback_timeout_s": rng.randint(1, 3) if short else LONG_DEADLINE_S,
            "metadata": {"chaos": True},
        }
        if rng.random() < 0.3:
            spec["state_webhook_url"] = self.hook_url
        if not short and rng.random() < 0.1:
            spec["heartbeat_timeout_s"] = rng.randint(1, 3)
        created = await self.create("job.create", "/api/v1/jobs", spec)
        if created is None:
            return
        job = self.books.job(created["id"], "external", False)
        token = token_of(created["continue_url"])
        job.live_tokens.add(token)
        for action in rng.sample(["start", "log", "heartbeat", "view"], k=rng.randint(0, 4)):
            if action == "view":  # a link unfurler: GET never completes the job
                await self.api.send("continue.get", "GET", f"/continue/{token}", idempotent=True)
                continue
            content = f"progress of {job.id}\n".encode() if action == "log" else None
            await self.api.send(
                f"continue.{action}",
                "POST",
                f"/continue/{token}/{action}",
                idempotent=True,
                content=content,
            )
        ending = rng.choices(
            ["once", "duplicate", "race_different", "race_same", "cancel_race", "cancel", "park"],
            weights=[4, 3, 2, 1, 2, 1, 0.3],
        )[0]
        if short:
            await asyncio.sleep(rng.uniform(0, 4))  # late or not: the sweeper races it
        body = self.callback_body(rng, "ext")
        key = f"k-{rng.getrandbits(64):016x}" if rng.random() < 0.5 else None
        if ending == "once":
            await self.terminal_call(job, token, body, key)
        elif ending == "duplicate":
            first = await self.terminal_call(job, token, body, key)
            await self.repeat(job, first, same_key=rng.random() < 0.5)
        elif ending == "race_different":
            other = self.callback_body(rng, "rival")
            await asyncio.gather(
                self.terminal_call(job, token, body, key),
                self.terminal_call(job, token, other, None),
            )
        elif ending == "race_same":
            await asyncio.gather(
                self.terminal_call(job, token, body, key),
                self.terminal_call(job, token, body, key),
            )
        elif ending == "cancel_race":
            await asyncio.gather(self.terminal_call(job, token, body, key), self.cancel(job))
        elif ending == "cancel":
            await self.cancel(job)
        else:
            return  # parked until its (long) deadline
        if rng.random() < 0.2:
            await self.retry(job, rng)

    async def script_job(self, rng: random.Random) -> None:
        is_async = rng.random() < 0.6
        if is_async:
            plan = rng.choices(["late", "early", "early-fail", "silent"], weights=[4, 3, 1, 1])[0]
        else:
            plan = rng.choices(["exit0", "exit1", "fail-first"], weights=[4, 1, 1])[0]
        spec: dict[str, Any] = {
            "name": self.name(plan),
            "kind": "script",
            "async": is_async,
            "script": ["echo chaos"],
            "variables": {"CHAOS_PLAN": plan},
            "queue_timeout_s": self.profile.short_deadline_s,
        }
        if is_async:
            spec["callback_timeout_s"] = rng.randint(1, 3) if plan == "silent" else 30
        if rng.random() < 0.3:
            spec["state_webhook_url"] = self.hook_url
        created = await self.create("job.create", "/api/v1/jobs", spec)
        if created is None:
            return
        job = self.books.job(created["id"], "script", is_async)
        if rng.random() < 0.1:
            await asyncio.sleep(rng.uniform(0, 1.5))
            await self.cancel(job)
        ended = await self.until_terminal(job.id, self.profile.short_deadline_s + 10)
        if ended is not None and plan == "fail-first" and rng.random() < 0.7:
            await self.retry(job, rng)

    async def pipeline(self, rng: random.Random) -> None:
        build_plan = rng.choices(["exit0", "exit1", "fail-first"], weights=[5, 1, 2])[0]
        short = self.profile.short_deadline_s
        spec: dict[str, Any] = {
            "name": self.name("pipe"),
            "variables": {"REGION": "chaos-1"},
            "jobs": {
                "build": {
                    "script": ["make"],
                    "variables": {"CHAOS_PLAN": build_plan},
                    "queue_timeout_s": short,
                },
                "provision": {"kind": "external", "needs": ["build"], "callback_timeout_s": short},
                "deploy": {
                    "script": ["deploy"],
                    "async": True,
                    "needs": ["provision"],
                    "variables": {"CHAOS_PLAN": "late"},
                    "queue_timeout_s": short,
                    "callback_timeout_s": short,
                },
            },
        }
        if rng.random() < 0.5:
            spec["state_webhook_url"] = self.hook_url
        created = await self.create("pipeline.create", "/api/v1/pipelines", spec)
        if created is None:
            return
        by_name = {}
        for item in created["jobs"]:
            by_name[item["name"]] = (self.track(item), item)
        provision, item = by_name["provision"]
        token = token_of(item["continue_url"])
        if rng.random() < 0.1:
            await asyncio.sleep(rng.uniform(0, 2))
            pipeline_cancel = f"/api/v1/pipelines/{created['id']}/cancel"
            if await self.admin_post("pipeline.cancel", pipeline_cancel):
                self.books.pipelines_canceled.add(created["id"])
        await self.provision(provision, token, rng)
        build, _ = by_name["build"]
        if build_plan == "fail-first" and rng.random() < 0.7:
            ended = await self.until_terminal(build.id, 5)
            if ended is not None and ended["state"] == "failed":
                answer = await self.retry(build, rng)
                for reopened in (answer or {}).get("reopened", []):
                    if reopened["name"] == "provision":
                        job = self.books.jobs[reopened["id"]]
                        await self.provision(job, token_of(reopened["continue_url"]), rng)

    async def provision(self, job: Tracked, token: str, rng: random.Random) -> None:
        """The external system of a pipeline's external job: its URL answers 409 `not_ready`
        (not consumed) until the job's needs succeeded."""
        body = self.callback_body(rng, "provision")
        give_up = time.monotonic() + self.profile.short_deadline_s + 5
        while True:
            call = await self.terminal_call(job, token, body, None)
            if call.status != 409 or (call.answer or {}).get("error") != "not_ready":
                return
            job.calls.remove(call)  # not consumed: it is no call at all
            if time.monotonic() > give_up:
                return
            await asyncio.sleep(0.3)  # polling with a deadline

    # -- runners ---------------------------------------------------------------------------

    async def runner(self, index: int) -> None:
        rng = random.Random(f"{self.seed}-runner-{index}")
        registered = None
        while registered is None and not self.stop_running.is_set():
            registered = await self.create(
                "runner.register", "/api/v1/runners", {"description": f"chaos-{index}"}
            )
        if registered is None:
            return
        auth = {"Authorization": f"Bearer {registered['token']}"}
        while not self.stop_running.is_set():
            response = await self.api.send(
                "runner.request",
                "POST",
                "/api/v1/runner/jobs/request",
                idempotent=False,
                body={"wait_s": 1},
                headers=auth,
            )
            if response is not None and response.status_code == 201:
                await self.run(response.json(), rng)

    async def run(self, handout: dict[str, Any], rng: random.Random) -> None:
        """One hand-out, as the protocol says, with some runners misbehaving."""
        job_id = handout["id"]
        job = self.books.job(job_id, "script", handout["async"])
        variables = {v["key"]: v["value"] for v in handout["variables"]}
        plan = variables.get("CHAOS_PLAN", "exit0")
        token = token_of(variables["CI_JOB_CONTINUE_URL"]) if handout["async"] else None
        if token is not None:
            job.maybe_revoked.add(token)
        headers = {"Job-Token": handout["token"]}
        path = f"/api/v1/runner/jobs/{job_id}"
        if rng.random() < DROP_HANDOUT_P:
            self.books.events["handouts_dropped"] += 1
            return
        confirmed = await self.api.send(
            "runner.confirm",
            "PUT",
            path,
            idempotent=True,
            body={"state": "running"},
            headers=headers,
        )
        if confirmed is None or confirmed.status_code != 200:
            return
        job.confirmed.add(handout["token"])
        if token is not None:
            job.maybe_revoked.discard(token)
            job.live_tokens.add(token)
        sent = b""
        for line in range(rng.randint(1, 3)):
            chunk = f"{job_id} line {line}\n".encode()
            size = await self.append(path, headers, len(sent), chunk)
            if size is None:
                return  # not this runner's job any more (canceled, timed out)
            sent += chunk
        if rng.random() < VANISH_P:
            self.books.events["runners_vanished"] += 1
            return
        early = None
        if token is not None and plan in ("early", "early-fail"):
            early = await self.terminal_call(job, token, self.callback_body(rng, "early"), None)
            if early.status == 202 and rng.random() < 0.3:
                await self.repeat(job, early, same_key=False)
        code = 1 if plan in ("exit1", "early-fail") else 0
        if plan == "fail-first" and handout["attempt"] == 1:
            code = 1
        report = {"state": "failed" if code else "success", "exit_code": code}
        exited = await self.api.send(
            "runner.exit", "PUT", path, idempotent=True, body=report, headers=headers
        )
        if exited is None:
            return
        if exited.status_code == 200:
            job.exits.append((report, exited.status_code, _json(exited)))
            job.trace = sent
        if token is not None and plan == "late" and exited.status_code == 200:
            task = asyncio.create_task(self.external_system(job, token, rng.random()))
            self.external_tasks.add(task)
            task.add_done_callback(self.external_tasks.discard)

    async def append(
        self, path: str, headers: dict[str, str], offset: int, chunk: bytes
    ) -> int | None:
        end = offset + len(chunk)
        response = await self.api.send(
            "runner.trace",
            "PATCH",
            f"{path}/trace",
            idempotent=True,
            content=chunk,
            headers={**headers, "Content-Range": f"{offset}-{end - 1}"},
        )
        if response is None:
            return None
        if response.status_code == 202:
            return end
        if response.status_code == 416:
            size = (_json(response) or {}).get("size")
            if size == end:
                return end  # the lost answer's append had landed
            self.books.violation(f"{path}: trace holds {size} bytes, the runner sent {offset}")
        return None

    async def external_system(self, job: Tracked, token: str, pace: float) -> None:
        """The system an async job's script handed its URL to: calls back a little later."""
        rng = random.Random(f"{self.seed}-{job.id}")
        await asyncio.sleep(pace * 0.5)  # the external system's pace
        first = await self.terminal_call(job, token, self.callback_body(rng, "late"), None)
        if rng.random() < 0.2:
            await self.repeat(job, first, same_key=False)


# --------------------------------------------------------------------------------------------
# The killer
# --------------------------------------------------------------------------------------------


@dataclass
class Killer:
    """Kills `kills` times at random moments and starts the victims again. Now and then a
    start is killed too, before or just after it got ready (`startup_kills`, not counted in
    `done`): a start must survive being cut anywhere."""

    cluster: Cluster
    gateways: Gateways
    kills: int
    gap_s: float
    seed: int
    done: int = 0
    startup_kills: int = 0
    restart_s: list[float] = field(default_factory=list)

    async def run(self) -> None:
        rng = random.Random(f"{self.seed}-killer")
        replicas = len(self.gateways.urls)
        while self.done < self.kills:
            await asyncio.sleep(rng.uniform(0, self.gap_s))  # a random moment to kill at
            victims = [rng.randrange(replicas)]
            if replicas > 1 and rng.random() < 0.15:
                victims = list(range(replicas))  # a full outage now and then
            victims = victims[: self.kills - self.done]
            for index in victims:
                self.gateways.down(index)
                await asyncio.to_thread(self.cluster.kill, index)
                self.done += 1
            for index in victims:
                started = time.monotonic()
                url = await self.restart(index, rng)
                self.restart_s.append(time.monotonic() - started)
                self.gateways.up(index, url)

    async def restart(self, index: int, rng: random.Random) -> str:
        while True:
            starting = asyncio.create_task(asyncio.to_thread(self.cluster.restart, index))
            killed: set[int] = set()
            if rng.random() < STARTUP_KILL_P:
                await asyncio.sleep(rng.uniform(0.05, 1.5))  # a random moment of the start
                running = {g.process.pid for g in self.cluster.gateways}
                for pid in serving_children() - running:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed.add(pid)
                self.startup_kills += len(killed)
            try:
                gateway = await starting
            except HarnessError:
                continue  # killed before it was ready: start it again
            if gateway.process.pid not in killed:
                return gateway.url
            await asyncio.to_thread(gateway.kill)  # killed once ready: reap, start again


def serving_children() -> set[int]:
    """Processes of `gateway serve` that this process started (through the harness)."""
    found = set()
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if parent == me and b"serve" in command and b"gateway" in command:
            found.add(int(entry.name))
    return found


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------


class Database:
    """Read-only SQL on the store (`?` placeholders, whichever store it is)."""

    def __init__(self, sqlite_path: Path | None, dsn: str | None) -> None:
        self.sqlite_path = sqlite_path
        self.dsn = dsn

    async def rows(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        if self.dsn is not None:
            conn = await asyncpg.connect(self.dsn)
            try:
                return [dict(row) for row in await conn.fetch(to_postgres(sql), *params)]
            finally:
                await conn.close()
        assert self.sqlite_path is not None

        def read() -> list[dict[str, Any]]:
            conn = sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True, timeout=30)
            conn.row_factory = sqlite3.Row
            try:
                return [dict(row) for row in conn.execute(sql, params)]
            finally:
                conn.close()

        return await asyncio.to_thread(read)

    async def value(self, sql: str, *params: Any) -> Any:
        rows = await self.rows(sql, *params)
        return next(iter(rows[0].values())) if rows else None


@dataclass(frozen=True)
class Arrival:
    """One request a receiver recorded."""

    webhook_id: str
    timestamp: str
    signatures: str
    body: bytes
    ok: bool


def arrivals(receiver: Receiver) -> list[Arrival]:
    """What `receiver` recorded (bodies are UTF-8 JSON, recorded as text)."""
    return [
        Arrival(
            webhook_id=str(record.get("webhook-id")),
            timestamp=str(record.get("webhook-timestamp")),
            signatures=str(record.get("webhook-signature")),
            body=record["body"].encode(),
            ok=200 <= record["status"] < 300,
        )
        for record in receiver.records()
    ]


def signature_ok(secret: str, arrival: Arrival) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{arrival.webhook_id}.{arrival.timestamp}.".encode() + arrival.body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(s, expected) for s in arrival.signatures.split(" "))


JOB_COLUMNS = (
    "id, pipeline_id, name, kind, is_async, state, failure_reason, message, outputs, result, needs,"
    " event_sequence, deadline_at, finished_at"
)


async def poll(check: Callable[[], Awaitable[bool]], within_s: float) -> bool:
    """Await `check()` until it holds (True) or `within_s` passed (False)."""
    give_up = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > give_up:
            return False
        await asyncio.sleep(0.25)  # polling with a deadline
    return True


async def queue_empty(db: Database) -> bool:
    pending = await db.value(
        "SELECT count(*) FROM jobs WHERE state = 'pending' AND kind = 'script'"
    )
    return bool(pending == 0)


async def drain(db: Database, within_s: float) -> tuple[bool, str]:
    """Wait until no deadline is due within the next minute (every short one fired) and no
    delivery is pending. Returns whether that happened, and what was left."""
    give_up = time.monotonic() + within_s
    left = ""
    while True:
        now = time.time()
        due = await db.value(
            "SELECT count(*) FROM jobs WHERE deadline_at IS NOT NULL AND deadline_at < ?",
            now + 60,
        )
        pending = await db.value("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")
        left = f"{due} short deadlines, {pending} deliveries pending"
        if due == 0 and pending == 0:
            return True, left
        if time.monotonic() > give_up:
            return False, left
        await asyncio.sleep(0.25)  # polling with a deadline


class Audit:
    def __init__(
        self,
        db: Database,
        api: Api,
        books: Books,
        admin_token: str,
        all_hook: tuple[Receiver, str, str],  # receiver, endpoint id, secret
        job_hook: tuple[Receiver, str],  # receiver, the server's webhook secret
    ) -> None:
        self.db = db
        self.api = api
        self.books = books
        self.admin = {"Authorization": f"Bearer {admin_token}"}
        self.all_hook = all_hook
        self.job_hook = job_hook
        self.figures: dict[str, Any] = {}

    def violation(self, what: str) -> None:
        self.books.violation(what)

    async def run(self) -> dict[str, Any]:
        jobs = {row["id"]: row for row in await self.db.rows(f"SELECT {JOB_COLUMNS} FROM jobs")}
        retried = {
            row["retry_of"]
            for row in await self.db.rows("SELECT retry_of FROM jobs WHERE retry_of IS NOT NULL")
        }
        events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in await self.db.rows(
            "SELECT job_id, sequence, state, previous_state, cause FROM job_events"
            " ORDER BY job_id, sequence"
        ):
            events[row["job_id"]].append(row)
        pipeline_events = await self.db.rows(
            "SELECT pipeline_id, sequence, state FROM pipeline_events"
        )
        self.figures["jobs"] = len(jobs)
        self.figures["jobs_by_state"] = dict(Counter(row["state"] for row in jobs.values()))
        self.figures["jobs_tracked"] = len(self.books.jobs)
        self.figures["pipelines"] = await self.db.value("SELECT count(*) FROM pipelines")
        self.figures["transitions"] = sum(len(e) for e in events.values())
        self.figures["pipeline_transitions"] = len(pipeline_events)
        self.histories(jobs, events)
        for pipeline_id in sorted(self.books.pipelines_canceled):
            state = await self.db.value("SELECT state FROM pipelines WHERE id = ?", pipeline_id)
            if state != "canceled":
                self.violation(f"pipeline {pipeline_id}: a cancel answered 200, it is {state}")
        self.deadlines(jobs, retried)
        await self.callbacks(jobs, events)
        await self.traces(jobs)
        await self.probes(jobs)
        await self.webhooks(events, pipeline_events)
        return self.figures

    def histories(self, jobs: dict[str, dict[str, Any]], events: dict[str, list[Any]]) -> None:
        """Each job's events: gapless, chained, last one its state, one terminal at the end."""
        for job_id, row in jobs.items():
            history = events.get(job_id, [])
            where = f"job {job_id} ({row['name']})"
            if [e["sequence"] for e in history] != list(range(1, len(history) + 1)):
                self.violation(f"{where}: event sequences {[e['sequence'] for e in history]}")
                continue
            if not history or row["event_sequence"] != len(history):
                self.violation(
                    f"{where}: {len(history)} events, event_sequence {row['event_sequence']}"
                )
                continue
            if history[-1]["state"] != row["state"]:
                self.violation(f"{where}: state {row['state']}, last event {history[-1]['state']}")
            for earlier, later in itertools.pairwise(history):
                if later["previous_state"] != earlier["state"]:
                    self.violation(
                        f"{where}: event {later['sequence']} does not follow the one before"
                    )
            terminal = [e for e in history if e["state"] in TERMINAL]
            expected = 1 if row["state"] in TERMINAL else 0
            if len(terminal) != expected:
                self.violation(
                    f"{where}: {len(terminal)} terminal transitions "
                    f"{[(e['state'], e['cause']) for e in terminal]} in state {row['state']}"
                )
            called = row["kind"] == "external" or row["is_async"]
            if called and row["state"] == "success" and history[-1]["cause"] != "callback":
                self.violation(f"{where}: succeeded without its callback ({history[-1]['cause']})")

    def deadlines(self, jobs: dict[str, dict[str, Any]], retried: set[str]) -> None:
        """Non-terminal: a deadline (leases included), or `created` behind an unended need."""
        latest = {
            (row["pipeline_id"], row["name"]): row
            for row in jobs.values()
            if row["pipeline_id"] is not None and row["id"] not in retried
        }
        for job_id, row in jobs.items():
            where = f"job {job_id} ({row['name']}, {row['state']})"
            if row["state"] in TERMINAL:
                if row["deadline_at"] is not None or row["finished_at"] is None:
                    self.violation(f"{where}: terminal with deadline_at {row['deadline_at']}")
            elif row["state"] == "created":
                needs = json.loads(row["needs"] or "[]")
                upstream = [latest.get((row["pipeline_id"], n)) for n in needs]
                if not any(u is not None and u["state"] not in TERMINAL for u in upstream):
                    self.violation(
                        f"{where}: created, but its needs ended "
                        f"{[u['state'] if u else None for u in upstream]}"
                    )
            elif row["deadline_at"] is None:
                self.violation(f"{where}: neither a deadline nor a runner lease")

    async def callbacks(
        self, jobs: dict[str, dict[str, Any]], events: dict[str, list[dict[str, Any]]]
    ) -> None:
        """Every accepted terminal call is the one that finished its job (through the API)."""
        accepted = 0
        for tracked in self.books.jobs.values():
            row = jobs.get(tracked.id)
            if row is None:
                self.violation(f"job {tracked.id}: answered 201 but is not in the database")
                continue
            where = f"job {tracked.id} ({row['name']})"
            if len(tracked.exits) > 1:
                self.violation(f"{where}: {len(tracked.exits)} exit reports accepted")
            if len(tracked.confirmed) > 1:
                self.violation(f"{where}: {len(tracked.confirmed)} hand-outs confirmed")
            ok = [c for c in tracked.calls if c.status == 200]
            early = [c for c in tracked.calls if c.status == 202]
            rivals = [
                (a.body, b.body)
                for a, b in itertools.combinations(ok + early, 2)
                if not a.repeats(b)
            ]
            if rivals:
                self.violation(f"{where}: different terminal calls accepted: {rivals[0]}")
                continue
            if tracked.cancels_ok and ok:
                self.violation(f"{where}: a cancel and a terminal call both answered 200")
            if tracked.cancels_ok and row["state"] != "canceled":
                self.violation(f"{where}: a cancel answered 200, the job is {row['state']}")
            for report, _, answer in tracked.exits:
                self.exit_reflected(where, row, report, answer)
            if not ok and not early:
                continue
            accepted += 1
            shown = await self._job(tracked.id)
            if shown is None:
                continue
            last = events[tracked.id][-1] if events.get(tracked.id) else None
            by_call = last is not None and last["state"] in TERMINAL and last["cause"] == "callback"
            call = (ok or early)[0]
            if not ok and not by_call:  # kept early, then dropped: only by a failure or cancel
                exit_zero = any(r[0]["exit_code"] == 0 for r in tracked.exits)
                if exit_zero or shown["state"] not in ("failed", "canceled"):
                    self.violation(
                        f"{where}: an early call answered 202 was dropped (exit 0 accepted:"
                        f" {exit_zero}); the job is {shown['state']} ({last and last['cause']})"
                    )
                continue
            self.reflected(where, shown, call, by_call)
        self.figures["jobs_with_accepted_calls"] = accepted

    def exit_reflected(
        self, where: str, row: dict[str, Any], report: dict[str, Any], answer: Any
    ) -> None:
        """An accepted exit report decided the job: failed on a non-zero exit, success on 0
        (an async job parks instead, and its callback, a deadline or a cancel ends it)."""
        if report["exit_code"] != 0:
            expected = frozenset({"failed"})
        elif row["is_async"]:
            expected = TERMINAL | {"waiting"}
        else:
            expected = frozenset({"success"})
        if row["state"] not in expected or (answer or {}).get("state") not in expected:
            self.violation(
                f"{where}: exit {report['exit_code']} answered {answer}, the job is {row['state']}"
            )
        elif report["exit_code"] != 0 and row["failure_reason"] != "script_failure":
            self.violation(f"{where}: exit {report['exit_code']} but {row['failure_reason']}")

    def reflected(self, where: str, shown: dict[str, Any], call: Call, by_call: bool) -> None:
        problems = []
        if not by_call:
            problems.append("not finished by a callback")
        if shown["state"] != call.state:
            problems.append(f"state {shown['state']} != {call.state}")
        if (shown.get("outputs") or {}) != call.body.get("outputs", {}):
            problems.append(f"outputs {shown.get('outputs')} != {call.body.get('outputs')}")
        if "message" in call.body and shown.get("message") != call.body["message"]:
            problems.append(f"message {shown.get('message')!r} != {call.body['message']!r}")
        if shown.get("result") != call.body.get("result"):
            problems.append(f"result {shown.get('result')} != {call.body.get('result')}")
        if problems:
            self.violation(f"{where}: accepted call not reflected: {'; '.join(problems)}")

    async def _job(self, job_id: str) -> dict[str, Any] | None:
        response = await self.api.send(
            "audit.get", "GET", f"/api/v1/jobs/{job_id}", idempotent=True, headers=self.admin
        )
        if response is None or response.status_code != 200:
            self.violation(f"job {job_id}: GET answered {response and response.status_code}")
            return None
        job: dict[str, Any] = response.json()
        return job

    async def traces(self, jobs: dict[str, dict[str, Any]]) -> None:
        checked = 0
        for tracked in self.books.jobs.values():
            if tracked.trace is None:
                continue
            response = await self.api.send(
                "audit.trace",
                "GET",
                f"/api/v1/jobs/{tracked.id}/trace",
                idempotent=True,
                headers=self.admin,
            )
            checked += 1
            if response is None or response.content != tracked.trace:
                got = response.content[:200] if response is not None else None
                self.violation(f"job {tracked.id}: trace {got!r} != sent {tracked.trace[:200]!r}")
        self.figures["traces_checked"] = checked

    async def probes(self, jobs: dict[str, dict[str, Any]]) -> None:
        """No live continue token on a terminal job: a new terminal call gets 409."""
        probed = 0
        body = {"message": "chaos audit probe", "result": {"probe": True}}
        for tracked in self.books.jobs.values():
            row = jobs.get(tracked.id)
            if row is None or row["state"] not in TERMINAL:
                continue
            for token in sorted(tracked.live_tokens | tracked.maybe_revoked):
                response = await self.api.send(
                    "audit.probe", "POST", f"/continue/{token}", idempotent=True, body=body
                )
                probed += 1
                if response is None:
                    continue
                answer = _json(response) or {}
                if response.status_code == 404 and token not in tracked.live_tokens:
                    continue  # the URL of a requeued hand-out: revoked
                if (
                    response.status_code != 409
                    or answer.get("error") != "already_final"
                    or answer.get("state") != row["state"]
                ):
                    self.violation(
                        f"job {tracked.id} ({row['state']}): a probe of its continue URL got"
                        f" {response.status_code} {answer}"
                    )
        self.figures["terminal_tokens_probed"] = probed

    async def webhooks(
        self, events: dict[str, list[dict[str, Any]]], pipeline_events: list[dict[str, Any]]
    ) -> None:
        all_receiver, all_endpoint, all_secret = self.all_hook
        job_receiver, server_secret = self.job_hook
        messages = {
            row["id"]: bytes(row["body"])
            for row in await self.db.rows("SELECT id, body FROM webhook_messages")
        }
        deliveries = await self.db.rows(
            "SELECT d.message_id, d.endpoint_id, d.state, e.owner_job_id, e.owner_pipeline_id"
            " FROM webhook_deliveries AS d JOIN webhook_endpoints AS e ON e.id = d.endpoint_id"
        )
        self.figures["deliveries_by_state"] = dict(Counter(d["state"] for d in deliveries))
        for d in deliveries:
            if d["state"] != "succeeded":
                self.violation(f"delivery of {d['message_id']} ended {d['state']}")
        expected_all: dict[str, tuple[str, int, str]] = {}
        for job_id, history in events.items():
            for e in history:
                expected_all[f"job_{job_id}_{e['sequence']}"] = ("job", e["sequence"], e["state"])
        for e in pipeline_events:
            expected_all[f"pipeline_{e['pipeline_id']}_{e['sequence']}"] = (
                "pipeline",
                e["sequence"],
                e["state"],
            )
        expected_job_hook = {
            d["message_id"]
            for d in deliveries
            if d["endpoint_id"] != all_endpoint
            and (d["owner_job_id"] is not None or d["owner_pipeline_id"] is not None)
        }
        got_all = arrivals(all_receiver)
        got_job = arrivals(job_receiver)
        self.figures["receiver_requests"] = len(got_all) + len(got_job)
        delivered = duplicates = truncated = 0
        for name, got, secret, expected in (
            ("*", got_all, all_secret, set(expected_all)),
            ("state_webhook_url", got_job, server_secret, expected_job_hook),
        ):
            whole: list[Arrival] = []
            for arrival in got:
                stored = messages.get(arrival.webhook_id)
                if arrival.webhook_id not in expected_all or stored is None:
                    self.violation(f"receiver {name}: {arrival.webhook_id} has no committed event")
                elif arrival.body != stored and stored.startswith(arrival.body):
                    # The sender was killed mid-request: the receiver got part of the body and
                    # no signature over it verifies, so no receiver takes it for a delivery.
                    truncated += 1
                elif arrival.body != stored:
                    pairs = enumerate(zip(arrival.body, stored, strict=False))
                    at = next((i for i, (a, b) in pairs if a != b), len(stored))
                    start = max(0, at - 20)
                    self.violation(
                        f"receiver {name}: {arrival.webhook_id} arrived with other content than"
                        f" stored from byte {at}: {arrival.body[start : at + 40]!r}"
                        f" vs {stored[start : at + 40]!r}"
                    )
                elif not signature_ok(secret, arrival):
                    self.violation(f"receiver {name}: bad signature on {arrival.webhook_id}")
                else:
                    whole.append(arrival)
                    kind, sequence, state = expected_all[arrival.webhook_id]
                    data = json.loads(arrival.body)
                    if (data["type"], data["data"]["sequence"]) != (f"{kind}.{state}", sequence):
                        self.violation(f"receiver {name}: {arrival.webhook_id} is {data['type']}")
            ok_by_id: Counter[str] = Counter(a.webhook_id for a in whole if a.ok)
            delivered += len(ok_by_id)
            duplicates += sum(n - 1 for n in ok_by_id.values())
            for missing in sorted(expected - set(ok_by_id))[:50]:
                self.violation(f"receiver {name}: event {missing} never delivered")
        self.figures["requests_cut_off_by_a_kill"] = truncated
        self.figures["deliveries_received"] = delivered
        self.figures["duplicates_delivered"] = duplicates


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


@dataclass
class Options:
    db: str
    replicas: int
    kills: int
    seed: int
    quick: bool
    json_path: Path | None


async def chaos(
    options: Options, cluster: Cluster, work: Path, dsn: str | None, books: Books
) -> dict[str, Any]:
    profile = QUICK if options.quick else FULL
    all_receiver, job_receiver = Receiver(), Receiver()
    all_url = all_receiver.start(
        work / "receiver-all.jsonl", fail_rate=RECEIVER_FAIL_RATE, seed=options.seed
    )
    job_url = job_receiver.start(
        work / "receiver-jobs.jsonl", fail_rate=RECEIVER_FAIL_RATE, seed=options.seed + 1
    )
    started = time.monotonic()
    try:
        gateways = Gateways([g.url for g in cluster.gateways])
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=40)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
            api = Api(http, gateways, books, ride_s=profile.short_deadline_s + 10)
            admin = {"Authorization": f"Bearer {cluster.admin_token}"}
            subscribed = await api.send(
                "webhook.create",
                "POST",
                "/api/v1/webhooks",
                idempotent=False,
                body={"url": f"{all_url}/all", "events": ["*"]},
                headers=admin,
            )
            assert subscribed is not None and subscribed.status_code == 201, subscribed
            subscription = subscribed.json()
            load = Load(api, books, profile, cluster.admin_token, f"{job_url}/state", options.seed)
            killer = Killer(cluster, gateways, options.kills, profile.kill_gap_s, options.seed)
            actors = [asyncio.create_task(load.actor(i)) for i in range(profile.actors)]
            runners = [asyncio.create_task(load.runner(i)) for i in range(profile.runners)]
            await killer.run()
            chaos_s = time.monotonic() - started
            load.stop_creating.set()
            _, late = await asyncio.wait(actors, timeout=profile.settle_s)
            for task in late:
                task.cancel()  # its requests in flight stay unknown
            books.events["actors_cut_off"] = len(late)
            await asyncio.gather(*late, return_exceptions=True)
            for task in actors:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            db = Database(None if dsn else work / "gateway.sqlite3", dsn)
            await poll(lambda: queue_empty(db), profile.settle_s)  # runners drain the queue
            await asyncio.gather(*list(load.external_tasks), return_exceptions=True)
            load.stop_running.set()
            await asyncio.gather(*runners)
            drained, left = await drain(db, profile.drain_s)
            if not drained:
                books.violation(f"not drained within {profile.drain_s} s: {left}")
            drain_s = time.monotonic() - started - chaos_s
            audit = Audit(
                db,
                api,
                books,
                cluster.admin_token,
                (all_receiver, subscription["id"], subscription["secret"]),
                (job_receiver, cluster.webhook_secret),
            )
            figures = await audit.run()
    finally:
        all_receiver.stop()
        job_receiver.stop()
    figures.update(
        kills=killer.done,
        startup_kills=killer.startup_kills,
        restart_s_max=round(max(killer.restart_s, default=0.0), 2),
        chaos_s=round(chaos_s, 1),
        drain_s=round(drain_s, 1),
        total_s=round(time.monotonic() - started, 1),
        events=dict(books.events),
        violations=len(books.violations),
    )
    return figures


def print_report(options: Options, books: Books, figures: dict[str, Any]) -> None:
    print("\nrequests by kind and outcome")
    outcomes = sorted({o for _, o in books.requests})
    kinds = sorted({k for k, _ in books.requests})
    print(f"  {'kind':<18}" + "".join(f"{o:>19}" for o in outcomes))
    for kind in kinds:
        print(f"  {kind:<18}" + "".join(f"{books.requests[(kind, o)]:>19}" for o in outcomes))
    totals = Counter[str]()
    for (_, outcome), n in books.requests.items():
        totals[outcome] += n
    print(f"  {'all':<18}" + "".join(f"{totals[o]:>19}" for o in outcomes))
    print("\nfigures")
    for key, value in figures.items():
        print(f"  {key}: {value}")
    if books.violations:
        print(f"\nVIOLATIONS ({len(books.violations)})")
        for line in books.violations[:40]:
            print(f"  - {line}")
    summary = {
        "requests": {f"{k}:{o}": n for (k, o), n in sorted(books.requests.items())},
        "outcomes": dict(totals),
        **figures,
    }
    print("summary " + json.dumps(summary, sort_keys=True))
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def work_dir(keep: Path | None) -> Iterator[Path]:
    """`keep` (made if needed, left behind), else a temporary directory."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="gateway-chaos-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def store(options: Options) -> Iterator[str | None]:
    """None for SQLite, else the DSN of a fresh database on the server `--db` names."""
    if options.db == "sqlite":
        yield None
        return
    with postgres_database(options.db) as dsn:
        yield dsn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="sqlite", help="sqlite, or a postgresql:// server DSN")
    parser.add_argument(
        "--replicas", type=int, help="servers (default 1 on SQLite, 2 on PostgreSQL)"
    )
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a short, lighter load")
    parser.add_argument("--json", dest="json_path", type=Path)
    parser.add_argument("--keep", type=Path, help="keep logs and receiver records in this dir")
    args = parser.parse_args(argv)
    if args.db != "sqlite" and not args.db.startswith(("postgresql://", "postgres://")):
        parser.error("--db is sqlite or a postgresql:// DSN")
    replicas = args.replicas or (1 if args.db == "sqlite" else 2)
    if args.db == "sqlite" and replicas != 1:
        parser.error("SQLite is one server; several replicas need --db postgresql://...")
    options = Options(
        db=args.db,
        replicas=replicas,
        kills=args.kills,
        seed=args.seed if args.seed is not None else random.randrange(1_000_000),
        quick=args.quick,
        json_path=args.json_path,
    )
    store_name = "sqlite" if options.db == "sqlite" else "postgresql"
    print(
        f"chaos: {describe_checkout()}, {store_name} x{replicas}, {options.kills} kills,"
        f" seed {options.seed}{', quick' if options.quick else ''}"
    )
    books = Books()
    with work_dir(args.keep) as work, store(options) as dsn:
        db = dsn or f"sqlite:///{work / 'gateway.sqlite3'}"
        with Cluster(work, replicas=replicas, db=db, env=GATEWAY_ENV) as cluster:
            figures = asyncio.run(chaos(options, cluster, work, dsn, books))
    print_report(options, books, figures)
    return 1 if books.violations else 0


if __name__ == "__main__":
    sys.exit(main())
