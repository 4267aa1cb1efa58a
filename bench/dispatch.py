"""Benchmark of job dispatch to runners: hand-out rate, long-poll wake latency, and the
runner-seconds an async job saves while an external system works.

Run: `.venv/bin/python bench/dispatch.py [--runners R] [--jobs N] [--wakeups K] [--wait-s W]
[--quick] [--json PATH] [--db postgresql://... [--replicas N]]`. Everything is measured in one run
and summarised in a table at the end:

1. Hand-outs/s: a `gateway serve` subprocess with N pending script jobs (made through
   `POST /api/v1/jobs`); R runner clients in another process each loop
   `POST /api/v1/runner/jobs/request` (wait_s 0) -> `PUT {"state": "running"}` ->
   `PUT {"state": "success"}` until the queue is empty (204). Every job must be handed out
   exactly once and end `success`.
2. Long-poll wake latency: the R clients wait in long polls (wait_s 60); K times, a script job is
   created through the API (from the same process) and the time from sending that request to
   the arrival of the 201 that hands it out is one sample. The client that got it confirms and
   finishes it, re-enters its long poll, and the next job comes only once all R are waiting
   again (plus a pause). Goal: p99 < 50 ms.
3. The headline, with the real reference runner (`gateway runner --concurrency 2` subprocess)
   and a fake external system (an HTTP server in this process) that finishes its work W s after
   it was handed some: an async job whose script hands `$CI_JOB_CONTINUE_URL` to it and exits
   (the external system calls the URL back after W s), beside a polling job whose script asks
   for the same work and then loops `until [ -f done ]; do sleep 5; done` (the external system
   creates the file after W s). Both run at once. Runner-seconds = the time the job occupied a
   runner slot: `parked_at - started_at` for the async job, `finished_at - started_at` for the
   polling one (`started_at` is the confirmation). Goal: < 1 s vs ~W s.

With `--db postgresql://...` (a server: the run creates a fresh database on it and drops it
after) the gateway runs on PostgreSQL, and PostgreSQL's CPU per cycle (all `postgres` processes
of this machine) is reported beside the server's. `--replicas N` runs N replicas on it: in 1 the
creators and the runner clients spread over the replicas round-robin; in 2 the runner clients
long-poll on replica 0 while the jobs are made on the last replica, so every wake-up crosses
replicas (LISTEN/NOTIFY; goal p99 < 100 ms); in 3 the reference runner works against replica 0
and the jobs are made on the last one.

The runner clients of 1 and 2 run in their own process (asyncio + uvloop, a minimal HTTP/1.1
keep-alive client over asyncio streams, so their CPU cost per request stays small); everything
only talks to 127.0.0.1, and every loop is bounded in count and time. Goals are reported, not
enforced: the exit code is non-zero only when a correctness check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harness import (
    ADMIN_TOKEN,
    ROOT,
    BenchError,
    Cluster,
    Gateway,
    HarnessError,
    Row,
    Summary,
    database_name,
    end_process,
    fail_if,
    is_postgres_url,
    percentile,
    postgres_cpu_s,
    postgres_database,
    print_table,
    run_context,
    run_fast,
)

REQUEST_TIMEOUT_S = 30.0
PHASE_TIMEOUT_S = 600.0
LONG_POLL_S = 60
WAKE_PAUSE_S = (0.05, 0.10)  # after all runners are back in their long poll, before a job
POLL_SLEEP_S = 5  # the polling job's `sleep`
CREATE_CLIENTS = 10

GOAL_WAKE_P99_MS = 50.0
GOAL_CROSS_WAKE_P99_MS = 100.0  # issue 5: a job made pending on replica B wakes a runner on A
GOAL_ASYNC_RUNNER_S = 1.0


# --------------------------------------------------------------------------------------------
# Runner clients (run in a child process)
# --------------------------------------------------------------------------------------------


class Http:
    """One keep-alive HTTP/1.1 connection to the gateway, one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> tuple[int, bytes]:
        """Status and body; raises on a transport error or after `timeout_s`."""
        return await asyncio.wait_for(self._exchange(method, path, body, headers), timeout_s)

    async def _exchange(
        self, method: str, path: str, body: Any, headers: dict[str, str] | None
    ) -> tuple[int, bytes]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self._host}:{self._port}",
            f"Content-Length: {len(payload)}",
            *([] if body is None else ["Content-Type: application/json"]),
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
        ]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        status_line = await self._reader.readline()
        if not status_line:
            self.close()
            raise ConnectionError("the gateway closed the connection")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        closing = False
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "connection" and value.strip().lower() == "close":
                closing = True
        data = await self._reader.readexactly(length) if length else b""
        if closing:
            self.close()
        return status, data

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def script_job(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "script", "script": ["true"], **extra}


async def create_script_jobs(
    targets: Sequence[tuple[str, int]], count: int
) -> tuple[list[str], float]:
    """Create `count` pending script jobs through the API (creator k on `targets[k % n]`); their
    ids and the wall time."""
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ids: list[str] = []
    numbers = iter(range(count))

    async def creator(host: str, port: int) -> None:
        http = Http(host, port)
        try:
            for number in numbers:
                status, body = await http.request(
                    "POST", "/api/v1/jobs", script_job(f"dispatch-{number}"), auth
                )
                fail_if(status != 201, f"job creation answered {status}: {body[:200]!r}")
                ids.append(json.loads(body)["id"])
        finally:
            http.close()

    started = time.perf_counter()
    await asyncio.gather(
        *(creator(*targets[k % len(targets)]) for k in range(min(CREATE_CLIENTS, count)))
    )
    return ids, time.perf_counter() - started


async def finish_handed_out(http: Http, job: dict[str, Any]) -> None:
    """Confirm a hand-out and report exit 0, checking both answers."""
    path = f"/api/v1/runner/jobs/{job['id']}"
    job_token = {"Job-Token": job["token"]}
    status, body = await http.request("PUT", path, {"state": "running"}, job_token)
    fail_if(status != 200, f"confirmation answered {status}: {body[:200]!r}")
    status, body = await http.request("PUT", path, {"state": "success"}, job_token)
    fail_if(status != 200, f"exit report answered {status}: {body[:200]!r}")
    fail_if(json.loads(body)["state"] != "success", f"exit report answered {body[:200]!r}")


@dataclass
class HandOutRun:
    wall_s: float
    handed_out: list[str]
    cycle_s: list[float]
    client_cpu_s: float


async def _hand_outs(
    targets: Sequence[tuple[str, int]], runner_token: str, runners: int
) -> HandOutRun:
    """R runner clients, client k on `targets[k % n]`, loop request -> confirm -> exit until the
    queue is empty."""
    auth = {"Authorization": f"Bearer {runner_token}"}
    handed_out: list[str] = []
    cycles: list[float] = []
    give_up_at = time.monotonic() + PHASE_TIMEOUT_S

    async def runner(host: str, port: int) -> None:
        http = Http(host, port)
        try:
            while time.monotonic() < give_up_at:
                started = time.perf_counter()
                status, body = await http.request(
                    "POST", "/api/v1/runner/jobs/request", {"wait_s": 0}, auth
                )
                if status == 204:
                    return
                fail_if(status != 201, f"jobs/request answered {status}: {body[:200]!r}")
                job = json.loads(body)
                await finish_handed_out(http, job)
                handed_out.append(job["id"])
                cycles.append(time.perf_counter() - started)
        finally:
            http.close()

    cpu_before = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(runner(*targets[k % len(targets)]) for k in range(runners)))
    wall = time.perf_counter() - started
    return HandOutRun(
        wall_s=wall,
        handed_out=handed_out,
        cycle_s=cycles,
        client_cpu_s=time.process_time() - cpu_before,
    )


@dataclass
class WakeRun:
    latencies_s: list[float]
    create_s: list[float]
    spurious: int


async def _wakeups(
    targets: Sequence[tuple[str, int]], runner_token: str, samples: int, runners: int
) -> WakeRun:
    """The runner clients long-poll on `targets[0]`; the jobs are created on `targets[-1]` (with
    several replicas, a wake-up has to cross from one replica to another)."""
    (host, port), (create_host, create_port) = targets[0], targets[-1]
    auth = {"Authorization": f"Bearer {runner_token}"}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    waiting = [False] * runners
    arrivals: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
    rng = random.Random(7)

    async def runner(index: int) -> None:
        """Long-poll until handed a `drain-` job (one per client at the end), so no request is
        left asleep in the gateway, where it could later take a job of the next phase."""
        http = Http(host, port)
        try:
            while True:
                waiting[index] = True
                status, body = await http.request(
                    "POST",
                    "/api/v1/runner/jobs/request",
                    {"wait_s": LONG_POLL_S},
                    auth,
                    timeout_s=LONG_POLL_S + REQUEST_TIMEOUT_S,
                )
                arrived = time.perf_counter()
                waiting[index] = False
                if status == 204:
                    continue
                fail_if(status != 201, f"long poll answered {status}: {body[:200]!r}")
                job = json.loads(body)
                arrivals.put_nowait((arrived, job["id"]))
                await finish_handed_out(http, job)
                if job["name"].startswith("drain-"):
                    return
        finally:
            http.close()

    async def all_waiting() -> None:
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while not all(waiting):
            fail_if(time.monotonic() > deadline, "the runner clients never all waited again")
            await asyncio.sleep(0.001)  # polling with a deadline

    tasks = [asyncio.create_task(runner(i)) for i in range(runners)]
    http = Http(create_host, create_port)
    latencies: list[float] = []
    creates: list[float] = []
    spurious = 0
    try:
        for number in range(samples):
            await all_waiting()
            # Let the requests reach the server and go to sleep in their long poll.
            await asyncio.sleep(rng.uniform(*WAKE_PAUSE_S))
            sent = time.perf_counter()
            status, body = await http.request(
                "POST", "/api/v1/jobs", script_job(f"wake-{number}"), admin
            )
            creates.append(time.perf_counter() - sent)
            fail_if(status != 201, f"job creation answered {status}: {body[:200]!r}")
            job_id = json.loads(body)["id"]
            while True:
                get = asyncio.create_task(arrivals.get())
                done, _ = await asyncio.wait(
                    {get, *tasks}, timeout=REQUEST_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
                )
                if get not in done:
                    get.cancel()
                    for task in done:
                        task.result()  # a runner client failed: raise its error
                    raise BenchError(
                        f"job {job_id} was not handed out within {REQUEST_TIMEOUT_S} s"
                    )
                arrived, handed_id = get.result()
                if handed_id == job_id:
                    break
                spurious += 1
            latencies.append(arrived - sent)
        for number in range(runners):
            status, body = await http.request(
                "POST", "/api/v1/jobs", script_job(f"drain-{number}"), admin
            )
            fail_if(status != 201, f"job creation answered {status}: {body[:200]!r}")
        _, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S)
        fail_if(bool(pending), f"{len(pending)} runner clients did not take a drain job")
        for task in tasks:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        http.close()
    return WakeRun(latencies_s=latencies, create_s=creates, spurious=spurious)


def _in_child(phase: str, urls: list[str], runner_token: str, count: int, runners: int) -> Any:
    targets = []
    for url in urls:
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1" and parts.port is not None, "loopback only"
        targets.append((parts.hostname, parts.port))
    if phase == "create":
        return run_fast(create_script_jobs(targets, count))
    if phase == "hand-outs":
        return run_fast(_hand_outs(targets, runner_token, runners))
    return run_fast(_wakeups(targets, runner_token, count, runners))


class RunnerClients:
    """The separate process where the runner clients of phases 1 and 2 run."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        )

    def run(self, phase: str, urls: list[str], runner_token: str, count: int, runners: int) -> Any:
        future = self._pool.submit(_in_child, phase, urls, runner_token, count, runners)
        return future.result(timeout=PHASE_TIMEOUT_S + 60)

    def close(self) -> None:
        self._pool.shutdown()


# --------------------------------------------------------------------------------------------
# Processes: the gateway and the reference runner
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def reference_runner(url: str, token: str, log_path: Path, concurrency: int) -> Iterator[None]:
    """`gateway runner` against `url` for the duration of the block (SIGTERM at its end)."""
    env = {**os.environ, "GATEWAY_RUNNER_TOKEN": token}
    command = [sys.executable, "-m", "gateway", "runner", "--url", url]
    command += ["--concurrency", str(concurrency)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        yield
    finally:
        end_process(proc, graceful=True)


def api(url: str) -> Any:
    import httpx

    return httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=REQUEST_TIMEOUT_S
    )


def register_runner(url: str, description: str) -> str:
    with api(url) as http:
        response = http.post("/api/v1/runners", json={"description": description})
    fail_if(response.status_code != 201, f"runner registration: {response.text}")
    token: str = response.json()["token"]
    return token


def count_jobs(url: str, state: str) -> int:
    """Jobs in `state`, read through `GET /api/v1/jobs` page by page."""
    total = 0
    cursor: str | None = None
    with api(url) as http:
        for _ in range(100_000):
            params = {"state": state, "limit": "500", **({"cursor": cursor} if cursor else {})}
            page = http.get("/api/v1/jobs", params=params)
            fail_if(page.status_code != 200, f"listing jobs: {page.text}")
            body = page.json()
            total += len(body["items"])
            cursor = body["next_cursor"]
            if cursor is None:
                break
    return total


# --------------------------------------------------------------------------------------------
# The fake external system of phase 3
# --------------------------------------------------------------------------------------------


class ExternalSystem:
    """Takes work over HTTP and finishes it `work_s` later: `POST /async` (body: a continue URL)
    is called back with a terminal call; `POST /poll` (body: a file path) gets the file made."""

    def __init__(self, work_s: float) -> None:
        self.work_s = work_s
        self.received: dict[str, float] = {}
        self.continue_url: str | None = None
        self.callback_status: int | None = None
        self.callback_at: float | None = None
        self._timers: list[threading.Timer] = []
        system = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                system.take(self.path, body.strip())
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def take(self, path: str, body: str) -> None:
        self.received[path] = time.time()
        if path == "/async":
            self.continue_url = body
        action = self._call_back if path == "/async" else self._make_file
        timer = threading.Timer(self.work_s, action, args=(body,))
        self._timers.append(timer)
        timer.start()

    def _call_back(self, continue_url: str) -> None:
        import httpx

        response = httpx.post(
            continue_url, json={"outputs": {"MACHINE": "bench-42"}}, timeout=REQUEST_TIMEOUT_S
        )
        self.callback_status = response.status_code
        self.callback_at = time.time()

    def _make_file(self, path: str) -> None:
        Path(path).touch()

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._server.shutdown()
        self._server.server_close()


def async_script(hand_over: str) -> list[str]:
    return [
        'echo "handing $CI_JOB_CONTINUE_URL to the external system"',
        hand_over.format(data='"$CI_JOB_CONTINUE_URL"', path="/async"),
        'echo "handed over; exiting: the gateway waits, not the runner"',
    ]


def polling_script(hand_over: str) -> list[str]:
    return [
        hand_over.format(data='"$DONE_FILE"', path="/poll"),
        f'until [ -f "$DONE_FILE" ]; do sleep {POLL_SLEEP_S}; done',
        'echo "the external system is done"',
    ]


def hand_over_command() -> str:
    """A shell command template that POSTs `{data}` to the external system's `{path}`."""
    if shutil.which("curl"):
        return 'curl -fsS -X POST --data-binary {data} "$EXTERNAL_URL{path}"'
    return (
        f'"{sys.executable}" -c "import sys, urllib.request;'
        ' urllib.request.urlopen(sys.argv[1], data=sys.argv[2].encode())"'
        ' "$EXTERNAL_URL{path}" {data}'
    )


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


@dataclass
class Results:
    runners: int
    jobs: int
    wakeups: int
    wait_s: float
    store: str = "sqlite"
    replicas: int = 1
    create_per_s: float = 0.0
    handouts_per_s: float = 0.0
    cycle_p50_ms: float = 0.0
    cycle_p99_ms: float = 0.0
    client_cpu_share: float = 0.0
    server_cpu_ms_per_handout: float = 0.0
    postgres_cpu_ms_per_handout: float = 0.0
    wake_p50_ms: float = 0.0
    wake_p99_ms: float = 0.0
    wake_max_ms: float = 0.0
    wake_create_p50_ms: float = 0.0
    wake_spurious: int = 0
    async_runner_s: float = 0.0
    async_total_s: float = 0.0
    polling_runner_s: float = 0.0
    busy_slots_during_wait: int = 0
    notes: list[str] = field(default_factory=list)


def bench_hand_outs(
    gateways: list[Gateway], clients: RunnerClients, results: Results, db: str | None
) -> None:
    """Phase 1; with several replicas the creators and the runner clients spread over them."""
    urls, jobs, runners = [g.url for g in gateways], results.jobs, results.runners
    url = urls[0]
    print(f"[1] hand-outs: {jobs} pending script jobs, {runners} runner clients ...")
    token = register_runner(url, "bench hand-outs")
    ids, create_s = clients.run("create", urls, "", jobs, CREATE_CLIENTS)
    postgres = db is not None

    def cpu_s() -> tuple[float, float]:
        servers = sum(g.cpu_s() for g in gateways)
        return servers, 0.0 if db is None else postgres_cpu_s({database_name(db)})

    server_before, postgres_before = cpu_s()
    run: HandOutRun = clients.run("hand-outs", urls, token, jobs, runners)
    server_after, postgres_after = cpu_s()
    results.server_cpu_ms_per_handout = (server_after - server_before) * 1000 / jobs
    results.postgres_cpu_ms_per_handout = (postgres_after - postgres_before) * 1000 / jobs
    fail_if(sorted(run.handed_out) != sorted(ids), "the jobs handed out are not the jobs created")
    results.create_per_s = len(ids) / create_s
    results.handouts_per_s = len(run.handed_out) / run.wall_s
    ordered = sorted(run.cycle_s)
    results.cycle_p50_ms = percentile(ordered, 0.50) * 1000
    results.cycle_p99_ms = percentile(ordered, 0.99) * 1000
    results.client_cpu_share = run.client_cpu_s / run.wall_s
    print(
        f"  created {len(ids)} jobs in {create_s:.2f} s ({results.create_per_s:,.0f}/s);"
        f" {len(run.handed_out)} request -> confirm -> exit cycles in {run.wall_s:.2f} s:"
        f" {results.handouts_per_s:,.0f} hand-outs/s, cycle p50 {results.cycle_p50_ms:.1f} ms,"
        f" p99 {results.cycle_p99_ms:.1f} ms; client CPU {results.client_cpu_share:.0%} of a core;"
        f" server CPU {results.server_cpu_ms_per_handout:.2f} ms per cycle"
        + (f", PostgreSQL CPU {results.postgres_cpu_ms_per_handout:.2f} ms" if postgres else "")
    )
    succeeded = count_jobs(url, "success")
    left = count_jobs(url, "pending") + count_jobs(url, "running")
    fail_if(succeeded != jobs, f"{succeeded} of {jobs} jobs ended success")
    fail_if(left != 0, f"{left} jobs are still pending or running")
    print(f"  checked: each job handed out once; all {succeeded} success through the API")


def bench_wakeups(urls: list[str], clients: RunnerClients, results: Results) -> None:
    """Phase 2; the runners wait on the first replica, the jobs are made on the last."""
    samples, runners, url = results.wakeups, results.runners, urls[0]
    across = " (waiting on replica 0, jobs made on the last one)" if len(urls) > 1 else ""
    print(
        f"[2] long-poll wake latency: {runners} runners waiting, {samples} jobs one by one"
        f"{across} ..."
    )
    token = register_runner(url, "bench wake-ups")
    before = count_jobs(url, "success")
    run: WakeRun = clients.run("wake-ups", [urls[0], urls[-1]], token, samples, runners)
    ordered = sorted(run.latencies_s)
    results.wake_p50_ms = percentile(ordered, 0.50) * 1000
    results.wake_p99_ms = percentile(ordered, 0.99) * 1000
    results.wake_max_ms = ordered[-1] * 1000
    results.wake_create_p50_ms = percentile(sorted(run.create_s), 0.50) * 1000
    results.wake_spurious = run.spurious
    print(
        f"  create sent -> hand-out received: p50 {results.wake_p50_ms:.1f} ms, p99"
        f" {results.wake_p99_ms:.1f} ms, max {results.wake_max_ms:.1f} ms (the create call"
        f" itself: p50 {results.wake_create_p50_ms:.1f} ms)"
    )
    fail_if(run.spurious != 0, f"{run.spurious} hand-outs of jobs not created by this phase")
    done = count_jobs(url, "success") - before
    expected = samples + runners  # and one drain job per runner client
    fail_if(done != expected, f"{done} of {expected} wake-up jobs ended success")
    fail_if(count_jobs(url, "pending") != 0, "a wake-up job is still pending")


def bench_runner_seconds(urls: list[str], work: Path, results: Results) -> None:
    """Phase 3; the reference runner works against the first replica, the jobs are made (and
    watched) on the last."""
    wait_s, url = results.wait_s, urls[0]
    print(
        f"[3] runner-seconds while an external system works {wait_s:g} s: async job vs polling"
        " job, reference runner (gateway runner --concurrency 2) ..."
    )
    token = register_runner(url, "bench reference runner")
    external = ExternalSystem(wait_s)
    done_file = work / "external-done"
    hand_over = hand_over_command()
    common = {"kind": "script", "callback_timeout_s": int(wait_s) + 300}
    variables = {"EXTERNAL_URL": external.url, "DONE_FILE": str(done_file)}
    try:
        with reference_runner(url, token, work / "runner.log", 2), api(urls[-1]) as http:
            created = {}
            for name, script, is_async in (
                ("async-wait", async_script(hand_over), True),
                ("polling-wait", polling_script(hand_over), False),
            ):
                body = {
                    "name": name,
                    "script": script,
                    "async": is_async,
                    "variables": variables,
                    **common,
                }
                response = http.post("/api/v1/jobs", json=body)
                fail_if(response.status_code != 201, f"creating {name}: {response.text}")
                created[name] = response.json()["id"]
            jobs = wait_for_jobs(http, created, wait_s, results)
            traces = {
                name: http.get(f"/api/v1/jobs/{job_id}/trace").text
                for name, job_id in created.items()
            }
    finally:
        external.close()
    async_job, polling_job = jobs["async-wait"], jobs["polling-wait"]
    for name, job in jobs.items():
        fail_if(job["state"] != "success", f"{name} ended {job['state']} ({job['failure_reason']})")
    fail_if(external.callback_status != 200, f"the callback answered {external.callback_status}")
    fail_if(async_job["parked_at"] is None, "the async job was never parked")
    fail_if(async_job["outputs"] != {"MACHINE": "bench-42"}, "the callback's outputs are missing")
    url_token = (external.continue_url or "").rsplit("/", 1)[-1]
    fail_if(not url_token, "the external system never got the continue URL")
    fail_if(url_token in traces["async-wait"], "the continue URL's token is in the trace")
    fail_if("handing [MASKED] to" not in traces["async-wait"], "the URL is not masked")
    results.async_runner_s = epoch(async_job["parked_at"]) - epoch(async_job["started_at"])
    results.async_total_s = epoch(async_job["finished_at"]) - epoch(async_job["started_at"])
    results.polling_runner_s = epoch(polling_job["finished_at"]) - epoch(polling_job["started_at"])
    print(
        f"  async job: on a runner {results.async_runner_s:.3f} s (started -> parked), then"
        f" waiting; success {results.async_total_s:.1f} s after it started"
    )
    print(f"  polling job: on a runner {results.polling_runner_s:.1f} s (started -> finished)")
    print(f"  runner slots busy halfway through the wait: {results.busy_slots_during_wait} of 2")


def wait_for_jobs(
    http: Any, created: dict[str, str], wait_s: float, results: Results
) -> dict[str, dict[str, Any]]:
    """Poll the jobs (with a deadline) until both are terminal; halfway through the wait, note
    how many runner slots are busy (only the polling job should hold one)."""
    deadline = time.monotonic() + wait_s + POLL_SLEEP_S + 90
    halfway: float | None = None
    jobs: dict[str, dict[str, Any]] = {}
    while True:
        jobs = {name: http.get(f"/api/v1/jobs/{job_id}").json() for name, job_id in created.items()}
        if all(job["state"] in ("success", "failed", "canceled") for job in jobs.values()):
            return jobs
        started = [job["started_at"] for job in jobs.values() if job["started_at"]]
        if halfway is None and len(started) == len(jobs):
            halfway = max(epoch(stamp) for stamp in started) + wait_s / 2
        if halfway is not None and time.time() >= halfway and not results.busy_slots_during_wait:
            runners = http.get("/api/v1/runners").json()["items"]
            busy = [r for r in runners if r["description"] == "bench reference runner"]
            results.busy_slots_during_wait = len(busy[0]["running_job_ids"]) if busy else -1
            halfway = math.inf
        fail_if(time.monotonic() > deadline, f"the jobs did not finish: {jobs}")
        time.sleep(0.2)  # polling with a deadline


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def summary(results: Results) -> list[Row]:
    """The table's rows: figure, value, goal, met?"""
    r, w = results.runners, results.wait_s
    table = Summary()
    info, goal, rows = table.info, table.goal, table.rows

    info(f"hand-outs/s, request->confirm->exit ({r} runners)", f"{results.handouts_per_s:,.0f}")
    info("hand-out cycle p50 / p99", f"{results.cycle_p50_ms:.1f} / {results.cycle_p99_ms:.1f} ms")
    info(
        "server CPU per request->confirm->exit cycle",
        f"{results.server_cpu_ms_per_handout:.2f} ms",
    )
    if results.store == "postgresql":
        info("PostgreSQL CPU per cycle", f"{results.postgres_cpu_ms_per_handout:.2f} ms")
    info("job creation via API (jobs/s)", f"{results.create_per_s:,.0f}")
    info(f"long-poll wake latency p50 ({r} waiting)", f"{results.wake_p50_ms:.1f} ms")
    p99 = results.wake_p99_ms
    target = GOAL_WAKE_P99_MS if results.replicas == 1 else GOAL_CROSS_WAKE_P99_MS
    goal(
        f"long-poll wake latency p99 ({r} waiting)"
        + (" across replicas" if results.replicas > 1 else ""),
        f"{p99:.1f} ms",
        f"< {target:.0f} ms",
        p99 < target,
    )
    info("long-poll wake latency max", f"{results.wake_max_ms:.1f} ms")
    seconds = results.async_runner_s
    goal(
        f"runner-seconds, async job ({w:g} s external wait)",
        f"{seconds:.3f} s",
        f"< {GOAL_ASYNC_RUNNER_S:.0f} s",
        seconds < GOAL_ASYNC_RUNNER_S,
    )
    polling = results.polling_runner_s
    goal(
        f"runner-seconds, polling job (sleep {POLL_SLEEP_S} loop)",
        f"{polling:.1f} s",
        f"~{w:g} s",
        w <= polling <= w + POLL_SLEEP_S + 2,
    )
    info("async job: started -> success", f"{results.async_total_s:.1f} s")
    info("runner slots busy mid-wait (of 2)", str(results.busy_slots_during_wait))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", type=int, default=8, help="runner clients R (8)")
    parser.add_argument("--jobs", type=int, help="jobs handed out (default 2000; quick 300)")
    parser.add_argument("--wakeups", type=int, help="wake-up samples (default 300; quick 60)")
    parser.add_argument("--wait-s", type=float, help="external system's work W (60; quick 10)")
    parser.add_argument("--quick", action="store_true", help="small sizes, well under a minute")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--db",
        metavar="POSTGRESQL_URL",
        help="run on PostgreSQL: each run makes (and drops) a fresh database on this server",
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="gateway replicas (1; more need --db)"
    )
    args = parser.parse_args(argv)
    if args.db is not None and not is_postgres_url(args.db):
        parser.error("--db takes a postgresql:// URL (SQLite is the default)")
    if args.replicas < 1 or (args.replicas > 1 and args.db is None):
        parser.error("--replicas N > 1 needs --db postgresql://...")
    results = Results(
        store="sqlite" if args.db is None else "postgresql",
        replicas=args.replicas,
        runners=args.runners,
        jobs=args.jobs or (300 if args.quick else 2_000),
        wakeups=args.wakeups or (60 if args.quick else 300),
        wait_s=args.wait_s or (10.0 if args.quick else 60.0),
    )
    print(
        f"bench/dispatch.py: {results.store} x{results.replicas}, {results.runners} runner"
        f" clients, {results.jobs} hand-outs,"
        f" {results.wakeups} wake-ups, W = {results.wait_s:g} s; {run_context()}"
    )
    started = time.perf_counter()
    clients = RunnerClients()
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-bench-dispatch-") as tmp:
            work = Path(tmp)
            with contextlib.ExitStack() as stack:
                db = None if args.db is None else stack.enter_context(postgres_database(args.db))
                cluster = stack.enter_context(Cluster(work, replicas=args.replicas, db=db))
                bench_hand_outs(cluster.gateways, clients, results, db)
                bench_wakeups(cluster.urls, clients, results)
                bench_runner_seconds(cluster.urls, work, results)
    except (BenchError, HarnessError) as exc:
        print(f"bench/dispatch.py: CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        clients.close()
    print_table(summary(results))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.json:
        record = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **asdict(results)}
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
