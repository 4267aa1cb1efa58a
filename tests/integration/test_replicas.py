"""Three `gateway serve` replicas on one fresh PostgreSQL database (`bench.harness.Cluster`)
under load spread across them, then the same with one replica killed with SIGKILL mid-load.

The load is protocol-level: runners registered with `POST /api/v1/runners`, each long-polling
its own replica and sending its job calls to any; external systems calling continue URLs on
any replica, some racing the same terminal call to two replicas at once; standalone external,
script and async script jobs and pipelines with `needs`; a webhook receiver subscribed to `*`.

What must hold (PRODUCT.md "Storage", "Runner API", "Webhooks"): each hand-out goes to one
runner and each job is confirmed once; one terminal transition per job; one terminal event per
job at the receiver, and every event of every job delivered (same `webhook-id`, same body);
a racing pair gets 200 and 200 (the exact repeat) or 409; no 500 anywhere. After the kill: the
hand-outs the dead replica gave and nobody confirmed go to other runners, and the delivery
attempts it had in flight are taken over by the others once their lease lapses.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pytest
import standardwebhooks

from bench.harness import ADMIN_TOKEN, Cluster, postgres_database
from bench.harness import Receiver as ReceiverProcess
from tests.conftest import POSTGRES_DSN_VARIABLE, POSTGRES_HOWTO
from tests.receivers import Receiver as ThreadReceiver
from tests.receivers import Reply

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get(POSTGRES_DSN_VARIABLE), reason=POSTGRES_HOWTO),
]

T = TypeVar("T")

REPLICAS = 3
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TERMINAL = {"success", "failed", "canceled", "skipped"}
POLL_S = 0.05
LONG_POLL_S = 5
CONFIRM_TIMEOUT_S = 2
WEBHOOK_TIMEOUT_S = 2
LEASE_S = WEBHOOK_TIMEOUT_S + 5  # PRODUCT.md: a dead replica's leases lapse within this
ENDPOINT_CONCURRENCY = 8
SETTLE_S = 45.0
"""Deadline for the load to end and every delivery to succeed (it takes 5-15 s when idle)."""

CLIENT_LIMITS = httpx.Limits(max_connections=80, keepalive_expiry=1)
"""Idle connections are dropped well before uvicorn's keep-alive timeout (5 s) closes them:
a request sent on a connection the server is closing at that moment fails with ReadError."""

FAST = {
    "GATEWAY_SWEEP_INTERVAL_S": "0.2",
    "GATEWAY_WEBHOOK_TIMEOUT_S": str(WEBHOOK_TIMEOUT_S),
    "GATEWAY_WEBHOOK_RETRY_SCHEDULE": ",".join(["1"] * 30),
    "GATEWAY_WEBHOOK_ENDPOINT_CONCURRENCY": str(ENDPOINT_CONCURRENCY),
}


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    with postgres_database(os.environ[POSTGRES_DSN_VARIABLE]) as dsn:
        yield dsn


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, within_s: float) -> T:
    """Await `check()` until it returns something truthy; fail after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while not (value := await check()):
        assert time.monotonic() < deadline, f"timed out after {within_s:g} s waiting for {what}"
        await asyncio.sleep(POLL_S)  # polling with a deadline
    return value


# --- what a receiver got, whichever receiver it was ---------------------------------------


@dataclass(frozen=True)
class Arrival:
    webhook_id: str
    status: int
    body: str
    headers: dict[str, str]

    @property
    def event(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.body)
        return document


def arrivals_of(receiver: ReceiverProcess | ThreadReceiver) -> list[Arrival]:
    if isinstance(receiver, ReceiverProcess):
        return [
            Arrival(
                r["webhook-id"],
                r["status"],
                r["body"],
                {k: r[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")},
            )
            for r in receiver.records()
        ]
    return [
        Arrival(r.webhook_id, r.status, r.body.decode(), dict(r.headers)) for r in receiver.received
    ]


# --- the load ---------------------------------------------------------------------------


@dataclass
class Handout:
    job_id: str
    attempt: int
    token: str
    replica: int
    at: float
    confirm_status: int | None = None


@dataclass
class Ledger:
    """Everything the load saw, checked at the end."""

    handouts: list[Handout] = field(default_factory=list)
    stalled: list[Handout] = field(default_factory=list)
    races: list[tuple[int, int]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    expected: dict[str, str] = field(default_factory=dict)
    """job id -> the terminal state it must end in."""
    pipelines: dict[str, str] = field(default_factory=dict)
    """pipeline id -> the terminal state it must end in."""
    script_jobs: set[str] = field(default_factory=set)
    """The script jobs some runner must run (skipped ones aside)."""

    def surprise(self, what: str, response: httpx.Response) -> None:
        self.unexpected.append(f"{what}: {response.status_code} {response.text[:300]}")


class Load:
    """Runners, external systems and job creators spread over a cluster's replicas."""

    def __init__(self, cluster: Cluster, http: httpx.AsyncClient, seed: int) -> None:
        self.cluster = cluster
        self.http = http
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self.succeeded: defaultdict[tuple[str | None, str], asyncio.Event] = defaultdict(
            asyncio.Event
        )
        self.tasks: set[asyncio.Task[None]] = set()
        self.runners: list[asyncio.Task[None]] = []

    # -- plumbing --------------------------------------------------------------------------

    def live(self) -> list[int]:
        return [i for i, gateway in enumerate(self.cluster.gateways) if gateway.alive()]

    async def send(
        self, method: str, path: str, *, replica: int | None = None, **kwargs: Any
    ) -> tuple[httpx.Response, bool]:
        """`method path` on `replica` (default: any live one); a transport error from a replica
        that is dead by now is answered by resending to a live one, as a client behind a load
        balancer would. Returns the answer and whether it is a resend."""
        index = self.rng.choice(self.live()) if replica is None else replica
        resent = False
        while True:
            try:
                response = await self.http.request(
                    method, f"{self.cluster.gateways[index].url}{path}", **kwargs
                )
            except httpx.TransportError as exc:
                if self.cluster.gateways[index].alive():
                    exc.add_note(f"{method} {path} on live replica {index}")
                    raise
                index, resent = self.rng.choice(self.live()), True
                continue
            if response.status_code >= 500:
                self.ledger.surprise(f"{method} {path}", response)
            return response, resent

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self.watched(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def watched(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """`work` as a task whose exception, if it raises one, is written in the ledger
        (checked while the load runs)."""

        def record(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and (exc := task.exception()) is not None:
                notes = " ".join(getattr(exc, "__notes__", []))
                self.ledger.unexpected.append(f"{type(exc).__name__}: {exc!r} {notes}")

        task = asyncio.ensure_future(work)
        task.add_done_callback(record)
        return task

    # -- runners ---------------------------------------------------------------------------

    async def register_runner(self, n: int) -> str:
        response, _ = await self.send(
            "POST", "/api/v1/runners", json={"description": f"runner-{n}"}, headers=ADMIN
        )
        assert response.status_code == 201, response.text
        token: str = response.json()["token"]
        return token

    async def start_runners(self, count: int) -> None:
        """`count` runners, their homes spread over the replicas."""
        for n in range(count):
            token = await self.register_runner(n)
            work = self.run_runner(token, n % len(self.cluster.gateways))
            self.runners.append(self.watched(work))

    async def start_stallers(self, count: int, replica: int) -> None:
        """`count` runners on `replica` that take one hand-out each and never confirm it."""
        for n in range(count):
            token = await self.register_runner(1000 + n)
            work = self.run_staller(token, replica)
            self.runners.append(self.watched(work))

    async def long_poll(
        self, token: str, replica: int
    ) -> tuple[tuple[dict[str, Any], Handout] | None, int]:
        """One `jobs/request` on `replica` (another live one once it is dead): the hand-out
        and its record, or None; and the replica asked."""
        if not self.cluster.gateways[replica].alive():
            replica = self.rng.choice(self.live())
        try:
            response = await self.http.post(
                f"{self.cluster.gateways[replica].url}/api/v1/runner/jobs/request",
                json={"wait_s": LONG_POLL_S},
                headers={"Authorization": f"Bearer {token}"},
                timeout=LONG_POLL_S + 30,
            )
        except httpx.TransportError as exc:
            if self.cluster.gateways[replica].alive():
                exc.add_note(f"jobs/request on live replica {replica}")
                raise
            return None, replica
        if response.status_code == 204:
            return None, replica
        if response.status_code != 201:
            self.ledger.surprise("jobs/request", response)
            return None, replica
        body: dict[str, Any] = response.json()
        record = Handout(body["id"], body["attempt"], body["token"], replica, time.monotonic())
        self.ledger.handouts.append(record)
        return (body, record), replica

    async def run_runner(self, token: str, home: int) -> None:
        replica = home
        while True:
            got, replica = await self.long_poll(token, replica)
            if got is not None:
                await self.run_job(*got)

    async def run_staller(self, token: str, replica: int) -> None:
        got = None
        while got is None:
            got, _ = await self.long_poll(token, replica)
        self.ledger.stalled.append(got[1])

    async def run_job(self, handout: dict[str, Any], record: Handout) -> None:
        """Confirm, append a trace line, report the exit the job's variables ask for."""
        job_id = handout["id"]
        path = f"/api/v1/runner/jobs/{job_id}"
        headers = {"Job-Token": handout["token"]}
        confirm, _ = await self.send("PUT", path, json={"state": "running"}, headers=headers)
        record.confirm_status = confirm.status_code
        if confirm.status_code == 403:
            return  # confirmed too late: requeued, someone else's now
        if confirm.status_code != 200 or confirm.headers.get("Job-Status") != "running":
            self.ledger.surprise(f"confirm {job_id}", confirm)
            return
        trace = f"{handout['name']} {job_id}: hello\n".encode()
        append, resent = await self.send(
            "PATCH",
            f"{path}/trace",
            content=trace,
            headers={**headers, "Content-Range": f"0-{len(trace) - 1}"},
        )
        if not (
            append.status_code == 202
            or (resent and append.status_code == 416 and append.json()["size"] == len(trace))
        ):
            self.ledger.surprise(f"trace {job_id}", append)
        variables = {v["key"]: v["value"] for v in handout["variables"]}
        exit_code = int(variables["E1_EXIT"])
        report = {"state": "success"} if exit_code == 0 else {"state": "failed", "exit_code": 1}
        answer, resent = await self.send("PUT", path, json=report, headers=headers)
        wanted = "failed" if exit_code else ("waiting" if handout["async"] else "success")
        if answer.status_code == 200:
            state = answer.json()["state"]
        elif resent and answer.status_code == 409:  # the first report applied, its 200 lost
            state = answer.headers.get("Job-Status", "")
        else:
            state = ""
        if state != wanted:
            self.ledger.surprise(f"exit report {job_id} (wanted {wanted})", answer)
            return
        if state == "success":
            self.succeeded[(handout["pipeline_id"], handout["name"])].set()
        if state == "waiting":
            body = callback_body(variables["E1_CALLBACK"], job_id)
            race = variables["E1_RACE"] == "1"
            self.spawn(self.finish(variables["CI_JOB_CONTINUE_URL"], body, race=race))

    # -- external systems ------------------------------------------------------------------

    async def finish(
        self,
        continue_url: str,
        body: dict[str, Any],
        *,
        race: bool,
        start: bool = False,
        after: tuple[str | None, str] | None = None,
    ) -> None:
        """The terminal call on the continue URL (after its need succeeded, when it has one),
        sent to one replica, or to two at once when it races."""
        path = urlsplit(continue_url).path
        if after is not None:
            await self.succeeded[after].wait()
        if start:
            answer, _ = await self.send("POST", f"{path}/start")
            if answer.status_code != 200:
                self.ledger.surprise(f"start {path}", answer)
        while True:
            if race and len(self.live()) >= 2:
                first, second = self.rng.sample(self.live(), 2)
                (a, _), (b, _) = await asyncio.gather(
                    self.send("POST", path, json=body, replica=first),
                    self.send("POST", path, json=body, replica=second),
                )
                if not_ready(a) or not_ready(b):
                    self.ledger.surprise(f"raced terminal call {path} (needs met)", a)
                self.ledger.races.append((a.status_code, b.status_code))
                return
            answer, _ = await self.send("POST", path, json=body)
            if answer.status_code != 200:
                self.ledger.surprise(f"terminal call {path}", answer)
            return

    # -- job creators ----------------------------------------------------------------------

    async def create(self, n: int, replica: int) -> None:
        """Creation number `n` on `replica`: in turn a standalone external job, a script job,
        an async script job and a pipeline of four (build -> deploy, external -> verify, async
        -> notify). Some scripts fail (n % 7 == 3), some callbacks say failed (n % 5 == 1),
        a third of the terminal calls race, half the standalone external jobs `start` first."""
        kind = ("external", "script", "async", "pipeline")[n % 4]
        if kind == "pipeline":
            await self.create_pipeline(n, replica)
            return
        fields: dict[str, Any] = {"name": f"{kind}-{n}", "kind": "external"}
        if kind != "external":
            fields = {
                "name": f"{kind}-{n}",
                "kind": "script",
                "script": ["true"],
                "async": kind == "async",
                "variables": job_variables(n),
            }
        response, _ = await self.send(
            "POST", "/api/v1/jobs", replica=replica, json=fields, headers=ADMIN
        )
        assert response.status_code == 201, response.text
        job = response.json()
        callback = "failed" if n % 5 == 1 else "success"
        script_fails = n % 7 == 3
        if kind == "external":
            self.ledger.expected[job["id"]] = callback
            body = callback_body(callback, job["id"])
            self.spawn(self.finish(job["continue_url"], body, race=n % 3 == 0, start=n % 2 == 0))
            return
        self.ledger.script_jobs.add(job["id"])
        if kind == "script":
            self.ledger.expected[job["id"]] = "failed" if script_fails else "success"
        else:
            self.ledger.expected[job["id"]] = "failed" if script_fails else callback

    async def create_pipeline(self, n: int, replica: int) -> None:
        """build (its script fails when n % 7 == 3: the rest is skipped) -> deploy (external)
        -> verify (async; its callback says failed when n % 5 == 1: notify is skipped) ->
        notify."""
        build_fails, verify_fails = n % 7 == 3, n % 5 == 1
        script = {"script": ["true"]}
        jobs = {
            "build": {**script, "variables": job_variables(n)},
            "deploy": {"kind": "external", "needs": ["build"]},
            "verify": {**script, "async": True, "needs": ["deploy"], "variables": job_variables(n)},
            "notify": {**script, "needs": ["verify"], "variables": job_variables(0)},
        }
        response, _ = await self.send(
            "POST",
            "/api/v1/pipelines",
            replica=replica,
            json={"name": f"pipeline-{n}", "jobs": jobs},
            headers=ADMIN,
        )
        assert response.status_code == 201, response.text
        pipeline = response.json()
        named = {job["name"]: job for job in pipeline["jobs"]}
        if build_fails:
            ends = {
                "build": "failed",
                "deploy": "skipped",
                "verify": "skipped",
                "notify": "skipped",
            }
        elif verify_fails:
            ends = {
                "build": "success",
                "deploy": "success",
                "verify": "failed",
                "notify": "skipped",
            }
        else:
            ends = dict.fromkeys(named, "success")
        for name, job in named.items():
            self.ledger.expected[job["id"]] = ends[name]
            if name != "deploy" and ends[name] != "skipped":
                self.ledger.script_jobs.add(job["id"])
        self.ledger.pipelines[pipeline["id"]] = (
            "failed" if build_fails or verify_fails else "success"
        )
        if not build_fails:
            deploy = named["deploy"]
            self.spawn(
                self.finish(
                    deploy["continue_url"],
                    callback_body("success", deploy["id"]),
                    race=n % 3 == 0,
                    after=(pipeline["id"], "build"),
                )
            )

    async def create_all(self, count: int) -> None:
        """`count` creations, round-robin over the replicas, a few at a time."""
        limit = asyncio.Semaphore(6)

        async def one(n: int) -> None:
            async with limit:
                await self.create(n, n % len(self.cluster.gateways))

        await asyncio.gather(*(one(n) for n in range(count)))

    # -- the end ---------------------------------------------------------------------------

    async def unfinished(self) -> int:
        """How many jobs are not terminal yet (asked of a live replica)."""
        total = 0
        for state in ("created", "pending", "running", "waiting"):
            response, _ = await self.send(
                "GET", "/api/v1/jobs", params={"state": state, "limit": 500}, headers=ADMIN
            )
            assert response.status_code == 200, response.text
            total += len(response.json()["items"])
        return total

    async def settle(self, within_s: float) -> None:
        """Wait until every job is terminal and every external system is done; stop runners."""

        async def done() -> bool:
            assert self.ledger.unexpected == []
            return not self.tasks and await self.unfinished() == 0

        try:
            await eventually(done, "every job to end", within_s)
        finally:
            for task in [*self.runners, *self.tasks]:
                task.cancel()
            await asyncio.gather(*self.runners, *self.tasks, return_exceptions=True)

    async def get(self, path: str, **params: Any) -> Any:
        response, _ = await self.send("GET", path, params=params or None, headers=ADMIN)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text}"
        return response.json()

    async def all_pages(self, path: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 500}
            if cursor:
                params["cursor"] = cursor
            page = await self.get(path, **params)
            items += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return items


def job_variables(n: int) -> dict[str, str]:
    """What the runner (exit code) and the external system (callback, racing or not) of
    script job number `n` are to do; see `Load.create`."""
    return {
        "E1_EXIT": "1" if n % 7 == 3 else "0",
        "E1_CALLBACK": "failed" if n % 5 == 1 else "success",
        "E1_RACE": "1" if n % 3 == 0 else "0",
    }


def callback_body(outcome: str, job_id: str) -> dict[str, Any]:
    if outcome == "failed":
        return {"status": "failed", "exit_code": 3, "message": f"{job_id} went wrong"}
    return {"message": f"{job_id} done", "outputs": {"JOB": job_id}}


def not_ready(response: httpx.Response) -> bool:
    return response.status_code == 409 and response.json().get("error") == "not_ready"


# --- the checks -------------------------------------------------------------------------


async def subscribe(load: Load, url: str) -> dict[str, Any]:
    response, _ = await load.send(
        "POST", "/api/v1/webhooks", json={"url": url, "events": ["*"]}, headers=ADMIN
    )
    assert response.status_code == 201, response.text
    endpoint: dict[str, Any] = response.json()
    return endpoint


async def every_delivery_succeeded(
    load: Load, endpoint_id: str, within_s: float
) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]] | None:
        items = await load.all_pages(f"/api/v1/webhooks/{endpoint_id}/deliveries")
        return items if all(d["state"] == "succeeded" for d in items) else None

    return await eventually(check, "every delivery to succeed", within_s)


async def check_jobs(load: Load) -> dict[str, list[dict[str, Any]]]:
    """Each job ended as planned with exactly one terminal transition and gapless sequences;
    returns each job's events."""
    ledger = load.ledger
    limit = asyncio.Semaphore(8)

    async def one(job_id: str) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
        async with limit:
            job = await load.get(f"/api/v1/jobs/{job_id}")
            events = (await load.get(f"/api/v1/jobs/{job_id}/events", limit=500))["items"]
            return job_id, job, events

    found = await asyncio.gather(*(one(job_id) for job_id in ledger.expected))
    history = {}
    for job_id, job, events in found:
        assert job["state"] == ledger.expected[job_id], (job, events)
        assert job["attempt"] == 1 and job["retry_of"] is None, job
        terminal = [e for e in events if e["state"] in TERMINAL]
        assert len(terminal) == 1, (job_id, events)
        assert [e["sequence"] for e in events] == list(range(1, len(events) + 1)), events
        assert events[-1]["state"] == job["state"], events
        history[job_id] = events
    for pipeline_id, state in ledger.pipelines.items():
        assert (await load.get(f"/api/v1/pipelines/{pipeline_id}"))["state"] == state
    return history


def check_receiver(
    load: Load,
    arrivals: list[Arrival],
    history: dict[str, list[dict[str, Any]]],
    deliveries: list[dict[str, Any]],
    secret: str,
) -> None:
    """Same webhook-id, same body; one terminal event per job and per pipeline; every event
    of every job reached the receiver, and the gateway's deliveries are exactly those."""
    bodies: defaultdict[str, set[str]] = defaultdict(set)
    for arrival in arrivals:
        bodies[arrival.webhook_id].add(arrival.body)
    assert {wid for wid, seen in bodies.items() if len(seen) > 1} == set()

    delivered = {a.webhook_id: a for a in arrivals if a.status == 200}
    wanted = {f"job_{job_id}_{e['sequence']}" for job_id, events in history.items() for e in events}
    assert wanted - delivered.keys() == set(), "events that never reached the receiver"

    terminal_ids: defaultdict[str, set[str]] = defaultdict(set)
    for arrival in arrivals:
        event = arrival.event
        state = event["type"].partition(".")[2]
        if state in TERMINAL:
            terminal_ids[event["data"]["id"]].add(arrival.webhook_id)
            assert event["data"]["state"] == state, event
    owners = {*load.ledger.expected, *load.ledger.pipelines}
    assert {owner: len(ids) for owner, ids in terminal_ids.items() if len(ids) != 1} == {}
    assert owners - terminal_ids.keys() == set(), "jobs or pipelines without a terminal event"
    for job_id, events in history.items():
        (terminal_id,) = terminal_ids[job_id]
        assert terminal_id == f"job_{job_id}_{events[-1]['sequence']}"

    message_ids = Counter(d["message_id"] for d in deliveries)
    assert [m for m, n in message_ids.items() if n > 1] == [], "one delivery per event"
    assert set(message_ids) == delivered.keys()

    verifier = standardwebhooks.Webhook(secret)
    for arrival in delivered.values():
        verifier.verify(arrival.body, arrival.headers)


def check_races(ledger: Ledger) -> None:
    assert ledger.races, "no terminal call raced"
    assert {tuple(sorted(pair)) for pair in ledger.races} <= {(200, 200), (200, 409)}, ledger.races


# --- the tests --------------------------------------------------------------------------


async def test_three_replicas_share_the_load_and_lose_nothing(
    tmp_path: Path, fresh_database: str
) -> None:
    """Runners on every replica, callbacks (some racing) on any: each job is handed out once,
    ends once, and every one of its events reaches the receiver once per webhook-id."""
    env = {**FAST, "GATEWAY_CONFIRM_TIMEOUT_S": "60"}
    with (
        ReceiverProcess() as receiver,
        Cluster(tmp_path / "cluster", replicas=REPLICAS, db=fresh_database, env=env) as cluster,
    ):
        hook = receiver.start(tmp_path / "received.jsonl", fail_rate=0.1, seed=5)
        async with httpx.AsyncClient(timeout=30, limits=CLIENT_LIMITS) as http:
            load = Load(cluster, http, seed=1)
            endpoint = await subscribe(load, f"{hook}/all")
            await load.start_runners(9)
            await load.create_all(120)
            await load.settle(SETTLE_S)
            history = await check_jobs(load)
            deliveries = await every_delivery_succeeded(load, endpoint["id"], SETTLE_S)
            arrivals = arrivals_of(receiver)

    ledger = load.ledger
    assert ledger.unexpected == []
    by_job = Counter(h.job_id for h in ledger.handouts)
    assert {job_id: n for job_id, n in by_job.items() if n != 1} == {}, "handed out twice"
    assert all(h.confirm_status == 200 for h in ledger.handouts)
    assert set(by_job) == ledger.script_jobs
    assert {h.replica for h in ledger.handouts} == set(range(REPLICAS))
    check_races(ledger)
    check_receiver(load, arrivals, history, deliveries, endpoint["secret"])
    assert any(a.status != 200 for a in arrivals), "the receiver's failures forced retries"


def connections_to(pid: int, port: int) -> int:
    """How many established TCP connections process `pid` holds to 127.0.0.1:`port` (its
    sockets' inodes matched in the /proc/net/tcp table of its network namespace)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port and inode in inodes:
            count += 1
    return count


async def test_a_replica_killed_mid_load_loses_nothing(tmp_path: Path, fresh_database: str) -> None:
    """kill -9 one replica while it holds unconfirmed hand-outs and delivery attempts in
    flight: those hand-outs go to runners on the other replicas after the confirmation
    timeout, the attempts are taken over once their lease lapses (same webhook-id), and all
    of the first test still holds."""
    doomed = 1
    env = {**FAST, "GATEWAY_CONFIRM_TIMEOUT_S": str(CONFIRM_TIMEOUT_S)}
    # Every attempt hangs until the kill: whatever a replica claimed then is in flight.
    with (
        ThreadReceiver(Reply(200, delay_s=120)) as receiver,
        Cluster(tmp_path / "cluster", replicas=REPLICAS, db=fresh_database, env=env) as cluster,
    ):
        async with httpx.AsyncClient(timeout=30, limits=CLIENT_LIMITS) as http:
            load = Load(cluster, http, seed=2)
            endpoint = await subscribe(load, receiver.url("/all"))
            await load.start_runners(6)
            await load.create_all(80)  # before the kill: a creation resent could make a twin
            victim = cluster.gateways[doomed]

            def attempts_in_flight() -> bool:
                return connections_to(victim.pid, receiver.port) > 0

            async def mid_load() -> bool:
                confirmed = sum(h.confirm_status == 200 for h in load.ledger.handouts)
                return confirmed >= 10 and attempts_in_flight()

            async def stalled_and_in_flight() -> bool:
                return len(load.ledger.stalled) == 2 and attempts_in_flight()

            await eventually(mid_load, "jobs running and attempts in flight on the replica", 30)
            # the stallers come last, so their hand-outs still await confirmation at the kill
            await load.start_stallers(2, doomed)
            await eventually(stalled_and_in_flight, "hand-outs awaiting confirmation there", 30)
            cluster.kill(doomed)
            killed_at = time.monotonic()
            receiver.release()
            await load.settle(SETTLE_S)
            history = await check_jobs(load)
            deliveries = await every_delivery_succeeded(load, endpoint["id"], SETTLE_S)
            arrivals = arrivals_of(receiver)
            received = receiver.received

            # a stalled hand-out's token was revoked when it went back to the queue
            for stalled in load.ledger.stalled:
                answer, _ = await load.send(
                    "PUT",
                    f"/api/v1/runner/jobs/{stalled.job_id}",
                    json={"state": "running"},
                    headers={"Job-Token": stalled.token},
                )
                assert answer.status_code == 403, answer.text

    ledger = load.ledger
    assert ledger.unexpected == []
    assert victim.process.returncode == -9
    confirmed = Counter(h.job_id for h in ledger.handouts if h.confirm_status == 200)
    assert {job_id: n for job_id, n in confirmed.items() if n != 1} == {}, "confirmed twice"
    assert set(confirmed) == ledger.script_jobs
    taken_over_after_the_kill = 0
    for stalled in ledger.stalled:
        assert stalled.replica == doomed
        (taken_over,) = [
            h for h in ledger.handouts if h.job_id == stalled.job_id and h.confirm_status == 200
        ]
        assert stalled.at < taken_over.at < stalled.at + CONFIRM_TIMEOUT_S + 5
        if taken_over.at > killed_at:  # else it was requeued before the kill: a slow machine
            assert taken_over.replica != doomed
            taken_over_after_the_kill += 1
    assert taken_over_after_the_kill, "no hand-out of the killed replica was taken over"
    check_races(ledger)
    check_receiver(load, arrivals, history, deliveries, endpoint["secret"])

    # Attempts the kill cut short reached the receiver but were never recorded by the gateway;
    # another replica delivered each of them (same webhook-id) once its lease lapsed.
    sent = Counter(a.webhook_id for a in arrivals)
    recorded = {d["message_id"]: len(d["attempts"]) for d in deliveries}
    cut = {wid for wid, n in sent.items() if n > recorded[wid]}
    assert cut, "the killed replica had no delivery attempt in flight"
    for wid in cut:
        later = [r.arrived for r in received if r.webhook_id == wid and r.arrived > killed_at]
        assert later, f"{wid} was never sent again after the kill"
        assert min(later) - killed_at < LEASE_S + 5, f"{wid} waited past its lease"


async def test_a_long_poll_on_one_replica_wakes_for_a_job_made_on_another(
    tmp_path: Path, fresh_database: str
) -> None:
    """A runner waiting on replica 0 gets a job created on replica 1 within 1 s (LISTEN/NOTIFY;
    without it the long poll's 5 s re-check would find it). The median of five tries."""
    with Cluster(tmp_path / "cluster", replicas=2, db=fresh_database) as cluster:
        waiter, maker = cluster.gateways
        async with httpx.AsyncClient(timeout=30) as http:
            load = Load(cluster, http, seed=3)
            token = await load.register_runner(0)
            runner_auth = {"Authorization": f"Bearer {token}"}
            latencies = []
            for n in range(5):
                before = await load.get("/api/v1/runners")
                seen = before["items"][0]["last_seen_at"]
                poll = asyncio.ensure_future(
                    http.post(
                        f"{waiter.url}/api/v1/runner/jobs/request",
                        json={"wait_s": 15},
                        headers=runner_auth,
                    )
                )

                async def waiting(seen: str | None = seen) -> bool:
                    runners = await load.get("/api/v1/runners")
                    return bool(runners["items"][0]["last_seen_at"] != seen)

                await eventually(waiting, "the long poll to reach the replica", 10)
                started = time.monotonic()
                made = await http.post(
                    f"{maker.url}/api/v1/jobs",
                    json={"name": f"probe-{n}", "kind": "script", "script": ["true"]},
                    headers=ADMIN,
                )
                assert made.status_code == 201, made.text
                handout = await poll
                latencies.append(time.monotonic() - started)
                assert handout.status_code == 201, handout.text
                assert handout.json()["id"] == made.json()["id"]
    assert statistics.median(latencies) < 1.0, latencies
