"""Benchmark of webhook delivery: throughput to loopback receivers, transition -> receiver
latency at a steady 500 deliveries/s, and the same with 1 of 10 receivers hanging.

Run: `.venv/bin/python bench/webhooks.py [--quick] [--seconds S] [--jobs N] [--json PATH]
[--db postgresql://...]` (with --db, each phase's gateway runs on a fresh database there).
Everything is measured in one run and summarised in a table at the end. Each phase gets a
fresh `gateway serve` subprocess (`GATEWAY_WEBHOOK_ALLOW_NETS=127.0.0.0/8`, every other
webhook setting at its default: 15 s timeout, 32 attempts in flight, 4 per endpoint):

1. Throughput: 10 explicit subscriptions (`events: ["job.pending"]`), N external jobs created
   through `POST /api/v1/jobs` as fast as 20 connections go: 10 N deliveries. Deliveries/s =
   deliveries received / (last arrival - first arrival). Goal >= 2,000/s.
2. Latency, fan-out: the same 10 subscriptions; jobs created open-loop at 50/s for S seconds
   (after a 2 s warm-up that is not counted), so 500 deliveries/s reach the receivers. Latency
   = arrival at the receiver - the event's `timestamp` (the transition's time, taken before its
   transaction commits; millisecond resolution, so up to 1 ms high). Goal p99 < 100 ms.
3. The same with subscription 10 pointing at a receiver that accepts the connection and never
   answers. Goal: the other nine's p99 within 20% of phase 2's.
4. Latency, per job: no subscriptions; each job has its own `state_webhook_url` (round-robin
   over 10 receiver URLs), jobs created at 500/s: 500 transitions/s, one delivery each. This
   is seed 004's shape (every job names its own receiver).
5. The same with 1 of the 10 URLs hanging. Goal as in 3.

The receivers run in their own process (asyncio + uvloop, a minimal HTTP/1.1 server that
verifies every signature and records each arrival); the load generator in another. All three
only talk to 127.0.0.1, and every loop is bounded in count and time. Goals are reported, not
enforced: the exit code is non-zero only when a correctness check fails (a bad signature, a
lost delivery, a failed request).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import math
import multiprocessing
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harness import (
    ADMIN_TOKEN,
    BenchError,
    Gateway,
    HarnessError,
    Row,
    Summary,
    database_name,
    fail_if,
    is_postgres_url,
    percentile,
    postgres_cpu_s,
    postgres_database,
    print_table,
    process_cpu_s,
    run_context,
    run_fast,
    running,
    start_gateway,
)

SERVER_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"bench-webhook-secret-0123456789ab").decode()
ENDPOINTS = 10
HANGING = 9  # the index of the hanging receiver in phases 3 and 5
RATE = 500
WARMUP_S = 2.0
START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
ARRIVAL_TIMEOUT_S = 120.0

GOAL_PER_S = 2000.0
GOAL_P99_MS = 100.0
GOAL_HANG_RATIO = 1.2


# --------------------------------------------------------------------------------------------
# Receivers (a child process)
# --------------------------------------------------------------------------------------------

_HEADER_END = b"\r\n\r\n"
_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_TIMESTAMP = b'"timestamp":"'


@dataclass(frozen=True)
class Arrival:
    """One request a receiver got: when, where, which event, and whether it verified."""

    at: float
    path: str
    message_id: str
    event_at: float
    verified: bool
    hung: bool


class _ReceiverState:
    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.default_key = base64.b64decode(SERVER_WEBHOOK_SECRET.removeprefix("whsec_"))
        self.hang_prefix = "/hang/"
        self.arrivals: list[Arrival] = []
        self.answered: set[tuple[str, str]] = set()
        self.hung: list[asyncio.Transport] = []


def _verify(key: bytes, headers: dict[bytes, bytes], body: bytes) -> bool:
    signed = headers[b"webhook-id"] + b"." + headers[b"webhook-timestamp"] + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    return any(
        hmac.compare_digest(entry, b"v1," + expected)
        for entry in headers[b"webhook-signature"].split(b" ")
    )


def _event_at(body: bytes) -> float:
    start = body.find(_TIMESTAMP) + len(_TIMESTAMP)
    return datetime.fromisoformat(body[start : start + 24].decode()).timestamp()


class _Receiving(asyncio.Protocol):
    """One connection from the dispatcher; requests are answered in order."""

    def __init__(self, state: _ReceiverState) -> None:
        self.state = state
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(_HEADER_END)
            if end < 0:
                return
            lines = bytes(self.buffer[:end]).split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            total = end + 4 + int(headers.get(b"content-length", b"0"))
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            self._request(lines[0].split(b" ")[1].decode(), headers, body)

    def _request(self, path: str, headers: dict[bytes, bytes], body: bytes) -> None:
        assert self.transport is not None
        now = time.time()
        key = self.state.keys.get(path, self.state.default_key)
        hung = path.startswith(self.state.hang_prefix)
        self.state.arrivals.append(
            Arrival(
                at=now,
                path=path,
                message_id=headers[b"webhook-id"].decode(),
                event_at=_event_at(body),
                verified=_verify(key, headers, body),
                hung=hung,
            )
        )
        if hung:
            self.state.hung.append(self.transport)  # never answered
        else:
            self.state.answered.add((path, self.state.arrivals[-1].message_id))
            self.transport.write(_OK)


async def _receive(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    state = _ReceiverState()
    server = await loop.create_server(lambda: _Receiving(state), "127.0.0.1", 0)
    conn.send(server.sockets[0].getsockname()[1])

    def command(kind: str, argument: Any) -> Any:
        """Runs on the event loop, so it never races a request."""
        if kind == "keys":
            state.keys.update({path: base64.b64decode(s[6:]) for path, s in argument.items()})
            return None
        if kind == "count":
            return len(state.answered)
        arrivals, state.arrivals, state.answered = state.arrivals, [], set()
        for transport in state.hung:
            transport.close()
        state.hung = []
        return arrivals

    def serve_commands() -> None:
        """The pipe is read and written in this thread, blocking; the loop does the work."""
        while True:
            kind, argument = conn.recv()
            if kind == "stop":
                return
            future = asyncio.run_coroutine_threadsafe(_call(command, kind, argument), loop)
            answer = future.result()
            if kind != "keys":
                conn.send(answer)

    await asyncio.to_thread(serve_commands)
    server.close()


async def _call(function: Any, *args: Any) -> Any:
    return function(*args)


def _receiver_main(conn: Connection) -> None:
    run_fast(_receive(conn))


class Receivers:
    """The receiver process. Paths: `/e/{i}` explicit subscriptions, `/j/{i}` per-job URLs,
    `/hang/{i}` never answered."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._proc = context.Process(target=_receiver_main, args=(child,), daemon=True)
        self._proc.start()
        fail_if(not self._conn.poll(START_TIMEOUT_S), "the receivers did not start")
        self.url = f"http://127.0.0.1:{self._conn.recv()}"

    def _ask(self, kind: str, argument: Any = None) -> Any:
        self._conn.send((kind, argument))
        fail_if(not self._conn.poll(REQUEST_TIMEOUT_S), f"the receivers did not answer {kind}")
        return self._conn.recv()

    def set_keys(self, keys: dict[str, str]) -> None:
        self._conn.send(("keys", keys))

    def count(self) -> int:
        """Distinct deliveries answered 200 since the last collect."""
        count: int = self._ask("count")
        return count

    def collect(self) -> list[Arrival]:
        """Every arrival since the last collect (hanging connections are closed)."""
        arrivals: list[Arrival] = self._ask("collect")
        return arrivals

    def wait_for(self, count: int, timeout_s: float = ARRIVAL_TIMEOUT_S) -> bool:
        """Whether `count` distinct deliveries were answered within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.count() < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)  # polling with a deadline
        return True

    def cpu_s(self) -> float:
        """CPU seconds the receiver process has used so far."""
        assert self._proc.pid is not None
        return float(process_cpu_s(self._proc.pid))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(("stop", None))
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()


# --------------------------------------------------------------------------------------------
# Load generator (a child process)
# --------------------------------------------------------------------------------------------

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection with at most one request in flight."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(_HEADER_END)
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        length = _CONTENT_LENGTH.search(bytes(self.buffer[:end]))
        total = end + 4 + (int(length.group(1)) if length else 0)
        if len(self.buffer) < total:
            return
        status = int(self.buffer[9:12])
        del self.buffer[:total]
        self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))


@dataclass
class LoadResult:
    """`statuses[i]` is 0 for a transport error or a timeout; `late_s` is how far behind its
    schedule the latest request was sent (open loop)."""

    wall_s: float
    statuses: list[int]
    late_s: float


async def _drive(
    port: int, requests: Sequence[bytes], connections: int, rate: float | None
) -> LoadResult:
    """Send every request; with `rate`, request i leaves at start + i / rate (open loop)."""
    loop = asyncio.get_running_loop()
    free: asyncio.Queue[tuple[asyncio.BaseTransport, _Connection]] = asyncio.Queue()
    transports = []
    for _ in range(connections):
        transport, protocol = await loop.create_connection(_Connection, "127.0.0.1", port)
        transports.append(transport)
        free.put_nowait((transport, protocol))
    statuses = [0] * len(requests)
    late = 0.0
    in_flight: set[asyncio.Task[None]] = set()

    async def send(index: int, transport: Any, conn: _Connection) -> None:
        conn.waiter = loop.create_future()
        transport.write(requests[index])
        with contextlib.suppress(TimeoutError, ConnectionError):
            statuses[index] = await asyncio.wait_for(conn.waiter, REQUEST_TIMEOUT_S)
        if statuses[index]:
            free.put_nowait((transport, conn))

    started = time.perf_counter()
    for index in range(len(requests)):
        if rate is not None:
            wait = started + index / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
        transport, conn = await free.get()
        if rate is not None:
            late = max(late, time.perf_counter() - (started + index / rate))
        task = asyncio.create_task(send(index, transport, conn))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight)
    wall = time.perf_counter() - started
    for transport in transports:
        transport.close()
    return LoadResult(wall, statuses, late)


def _load_in_child(
    port: int, requests: Sequence[bytes], connections: int, rate: float | None
) -> LoadResult:
    return run_fast(_drive(port, requests, connections, rate))


class LoadGenerator:
    def __init__(self) -> None:
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        )

    def run(
        self, url: str, requests: Sequence[bytes], connections: int, rate: float | None = None
    ) -> LoadResult:
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1" and parts.port is not None, "loopback only"
        future = self._pool.submit(_load_in_child, parts.port, list(requests), connections, rate)
        return future.result(timeout=len(requests) / (rate or 100) + 120)

    def close(self) -> None:
        self._pool.shutdown()


def build_request(host: str, path: str, body: dict[str, Any]) -> bytes:
    raw = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(raw)}\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
    )
    return head.encode() + raw


# --------------------------------------------------------------------------------------------
# The gateway
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gateway(data_dir: Path, postgres: str | None = None) -> Iterator[tuple[Gateway, str | None]]:
    """A fresh `gateway serve` on a free loopback port (bench/harness.py; loopback webhooks
    allowed), stopped (SIGTERM) at the end, and its database URL: with `postgres` (a server's
    DSN), a fresh database there, dropped after; else None (SQLite in the data dir)."""
    with contextlib.ExitStack() as stack:
        db = None if postgres is None else stack.enter_context(postgres_database(postgres))
        server = start_gateway(data_dir, db=db, webhook_secret=SERVER_WEBHOOK_SECRET)
        with running(server):
            yield server, db


def subscribe(server: Gateway, receivers: Receivers, paths: Sequence[str]) -> None:
    """One explicit subscription to `job.pending` per path; their secrets go to the receivers."""
    import httpx

    keys = {}
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    ) as http:
        for path in paths:
            body = {"url": receivers.url + path, "events": ["job.pending"]}
            response = http.post("/api/v1/webhooks", json=body)
            fail_if(response.status_code != 201, f"subscription: {response.text}")
            keys[path] = response.json()["secret"]
    receivers.set_keys(keys)


def check_delivery_log(server: Gateway) -> dict[str, int]:
    """Delivery states of the subscriptions, through the API (explicit ones only)."""
    import httpx

    states: dict[str, int] = {}
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    ) as http:
        for endpoint in http.get("/api/v1/webhooks").json()["items"]:
            cursor = None
            for _ in range(10_000):
                params = {"limit": "500", **({"cursor": cursor} if cursor else {})}
                page = http.get(f"/api/v1/webhooks/{endpoint['id']}/deliveries", params=params)
                for item in page.json()["items"]:
                    states[item["state"]] = states.get(item["state"], 0) + 1
                cursor = page.json()["next_cursor"]
                if cursor is None:
                    break
    return states


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def ms(value: float) -> str:
    return f"{value:.1f} ms" if math.isfinite(value) else "not arrived"


@dataclass
class Latency:
    label: str
    deliveries: int = 0
    per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    hung_attempts: int = 0
    late_send_ms: float = 0.0
    server_cpu_share: float = 0.0

    def line(self) -> str:
        hung = f", {self.hung_attempts} attempts to the hanging one" if self.hung_attempts else ""
        return (
            f"  {self.label}: {self.deliveries} deliveries at {self.per_s:,.0f}/s, p50"
            f" {ms(self.p50_ms)}, p99 {ms(self.p99_ms)}, max {ms(self.max_ms)}{hung};"
            f" sender at most {self.late_send_ms:.0f} ms behind schedule; gateway CPU"
            f" {self.server_cpu_share:.0%} of a core"
        )


@dataclass
class Results:
    jobs: int
    seconds: float
    rate: int
    postgres: str | None = None
    throughput_per_s: float = 0.0
    throughput_deliveries: int = 0
    throughput_create_s: float = 0.0
    throughput_total_s: float = 0.0
    throughput_server_cpu_ms: float = 0.0
    throughput_receiver_cpu_ms: float = 0.0
    throughput_postgres_cpu_ms: float | None = None
    latency: dict[str, Latency] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def verified_once(arrivals: Sequence[Arrival], what: str) -> list[Arrival]:
    """The first arrival of each (receiver, webhook-id); every signature must verify."""
    bad = [a for a in arrivals if not a.verified]
    fail_if(bool(bad), f"{what}: {len(bad)} deliveries did not verify")
    first: dict[tuple[str, str], Arrival] = {}
    for arrival in sorted(arrivals, key=lambda a: a.at):
        first.setdefault((arrival.path, arrival.message_id), arrival)
    return list(first.values())


# --------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------


def bench_throughput(work: Path, loadgen: LoadGenerator, results: Results) -> None:
    jobs = results.jobs
    expected = jobs * ENDPOINTS
    print(f"[1] throughput: {jobs} jobs x {ENDPOINTS} subscriptions = {expected} deliveries ...")
    receivers = Receivers()
    try:
        with gateway(work / "throughput", results.postgres) as (server, db):
            paths = [f"/e/{i}" for i in range(ENDPOINTS)]
            subscribe(server, receivers, paths)
            requests = [build_request(server.host_header, "/api/v1/jobs", {"name": "bench"})] * jobs
            databases = None if db is None else {database_name(db)}
            postgres_before = postgres_cpu_s(databases) if databases else 0.0
            receiver_before = receivers.cpu_s()
            cpu_before = server.cpu_s()
            started = time.time()
            created = loadgen.run(server.url, requests, connections=20)
            bad = [s for s in created.statuses if s != 201]
            fail_if(bool(bad), f"{len(bad)} job creations failed ({sorted(set(bad))})")
            arrived = receivers.wait_for(expected)
            fail_if(not arrived, f"throughput: {receivers.count()} of {expected} arrived")
            cpu = server.cpu_s() - cpu_before
            receiver_cpu = receivers.cpu_s() - receiver_before
            if databases:
                postgres_ms = (postgres_cpu_s(databases) - postgres_before) * 1000 / expected
                results.throughput_postgres_cpu_ms = postgres_ms
            arrivals = verified_once(receivers.collect(), "throughput")
            states = check_delivery_log(server)
    finally:
        receivers.close()
    fail_if(len(arrivals) != expected, f"{len(arrivals)} distinct deliveries, not {expected}")
    fail_if(states.get("succeeded") != expected, f"delivery log: {states}")
    first, last = min(a.at for a in arrivals), max(a.at for a in arrivals)
    results.throughput_deliveries = expected
    results.throughput_per_s = expected / (last - first)
    results.throughput_create_s = created.wall_s
    results.throughput_total_s = last - started
    results.throughput_server_cpu_ms = cpu * 1000 / expected
    results.throughput_receiver_cpu_ms = receiver_cpu * 1000 / expected
    postgres = results.throughput_postgres_cpu_ms
    print(
        f"  created {jobs} jobs in {created.wall_s:.2f} s; {expected} deliveries arrived in"
        f" {last - first:.2f} s: {results.throughput_per_s:,.0f}/s (all {expected} verified and"
        f" `succeeded` in the delivery log); CPU per delivery: gateway"
        f" {results.throughput_server_cpu_ms:.2f} ms, receivers"
        f" {results.throughput_receiver_cpu_ms:.2f} ms"
        + ("" if postgres is None else f", PostgreSQL {postgres:.2f} ms")
    )


def bench_latency(
    work: Path, loadgen: LoadGenerator, results: Results, *, per_job: bool, hanging: bool
) -> None:
    shape = "per job" if per_job else "fan-out"
    label = f"{shape}{', 1 of 10 hanging' if hanging else ''}"
    transitions_per_s = results.rate if per_job else results.rate // ENDPOINTS
    total = int((WARMUP_S + results.seconds) * transitions_per_s)
    index = 1 + 2 * per_job + hanging + 1
    print(f"[{index}] latency, {label}: {transitions_per_s} jobs/s for {WARMUP_S:g} +")
    print(f"  {results.seconds:g} s, {results.rate} deliveries/s ...")

    def path(i: int) -> str:
        kind = "j" if per_job else "e"
        return f"/hang/{i}" if hanging and i == HANGING else f"/{kind}/{i}"

    receivers = Receivers()
    try:
        directory = work / label.replace(" ", "-").replace(",", "")
        with gateway(directory, results.postgres) as (server, _):
            if per_job:
                requests = [
                    build_request(
                        server.host_header,
                        "/api/v1/jobs",
                        {"name": "bench", "state_webhook_url": receivers.url + path(i % 10)},
                    )
                    for i in range(total)
                ]
            else:
                subscribe(server, receivers, [path(i) for i in range(ENDPOINTS)])
                requests = [
                    build_request(server.host_header, "/api/v1/jobs", {"name": "bench"})
                ] * total
            cpu_before = server.cpu_s()
            created_at = time.time()
            created = loadgen.run(server.url, requests, connections=64, rate=transitions_per_s)
            cpu = server.cpu_s() - cpu_before
            bad = [s for s in created.statuses if s != 201]
            fail_if(bool(bad), f"{len(bad)} job creations failed ({sorted(set(bad))})")
            if per_job:
                answered = sum(1 for i in range(total) if path(i % 10).startswith("/j/"))
            else:
                answered = total * (ENDPOINTS - hanging)
            # A hanging receiver may starve the others: then wait a bounded time and count
            # what has not arrived as slower than that (it is late, not lost: not a failure).
            patience = max(30.0, 3 * results.seconds) if hanging else ARRIVAL_TIMEOUT_S
            arrived = receivers.wait_for(answered, patience)
            fail_if(not arrived and not hanging, f"{label}: {receivers.count()} of {answered}")
            waited_s = time.time() - created_at - created.wall_s
            arrivals = verified_once(receivers.collect(), label)
    finally:
        receivers.close()
    answering = [a for a in arrivals if not a.hung]
    cutoff = created_at + WARMUP_S
    measured = sorted(a.at - a.event_at for a in answering if a.event_at >= cutoff)
    window = [a.at for a in answering if a.event_at >= cutoff]
    missing = answered - len(answering)
    if missing:
        measured += [math.inf] * missing
        results.notes.append(
            f"{label}: {missing} of {answered} deliveries to the answering receivers had not"
            f" arrived {waited_s:.0f} s after the last job was created"
        )
        print(f"  {results.notes[-1]}")
    latency = Latency(
        label=label,
        deliveries=len(measured),
        per_s=len(window) / (max(window) - min(window)) if len(window) > 1 else 0.0,
        p50_ms=percentile(measured, 0.50) * 1000,
        p99_ms=percentile(measured, 0.99) * 1000,
        max_ms=measured[-1] * 1000,
        hung_attempts=sum(1 for a in arrivals if a.hung),
        late_send_ms=created.late_s * 1000,
        server_cpu_share=cpu / created.wall_s,
    )
    results.latency[label] = latency
    print(latency.line())


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def summary(results: Results) -> list[Row]:
    table = Summary()
    info, goal, rows = table.info, table.goal, table.rows
    rate = results.rate

    per_s = results.throughput_per_s
    goal(
        f"deliveries/s ({ENDPOINTS} subscriptions, backlog)",
        f"{per_s:,.0f}",
        f">= {GOAL_PER_S:,.0f}",
        per_s >= GOAL_PER_S,
    )
    info("gateway CPU per delivery", f"{results.throughput_server_cpu_ms:.2f} ms")
    for shape in ("fan-out", "per job"):
        base = results.latency[shape]
        hung = results.latency[f"{shape}, 1 of 10 hanging"]
        kept_up = base.per_s >= 0.95 * rate
        info(
            f"{shape} {rate}/s: answered/s", f"{base.per_s:,.0f}{'' if kept_up else ' (saturated)'}"
        )
        info(f"{shape} {rate}/s: p50", ms(base.p50_ms))
        goal(
            f"{shape} {rate}/s: p99",
            ms(base.p99_ms),
            f"< {GOAL_P99_MS:.0f} ms",
            base.p99_ms < GOAL_P99_MS,
        )
        info(f"{shape} {rate}/s, 1 hanging: others' p50", ms(hung.p50_ms))
        ratio = hung.p99_ms / base.p99_ms
        figure = f"{shape} {rate}/s, 1 hanging: others' p99"
        value = f"{ms(hung.p99_ms)} (x{ratio:.2f})"
        if kept_up or not math.isfinite(ratio):
            goal(figure, value, f"<= x{GOAL_HANG_RATIO:.1f}", ratio <= GOAL_HANG_RATIO)
        else:  # both sides are queueing behind a saturated dispatcher: the ratio means nothing
            rows.append((figure, value, f"<= x{GOAL_HANG_RATIO:.1f}", "n/a (saturated)"))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, help="jobs in phase 1 (x10 deliveries; 2000/300)")
    parser.add_argument("--seconds", type=float, help="measured seconds per latency phase (20/5)")
    parser.add_argument(
        "--rate", type=int, default=RATE, help=f"deliveries/s of the latency phases ({RATE})"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--db",
        metavar="postgresql://...",
        help="a PostgreSQL server: each phase's gateway gets a fresh database there",
    )
    args = parser.parse_args(argv)
    if args.db is not None and not is_postgres_url(args.db):
        parser.error("--db takes a postgresql:// URL")
    results = Results(
        jobs=args.jobs or (300 if args.quick else 2000),
        seconds=args.seconds or (5.0 if args.quick else 20.0),
        rate=args.rate,
        postgres=args.db,
    )
    print(
        f"bench/webhooks.py: {results.jobs} jobs x {ENDPOINTS} subscriptions, latency at"
        f" {results.rate} deliveries/s for {results.seconds:g} s;"
        f" {'PostgreSQL' if results.postgres else 'SQLite'}; {run_context()}"
    )
    started = time.perf_counter()
    loadgen = LoadGenerator()
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
            work = Path(tmp)
            bench_throughput(work, loadgen, results)
            for per_job in (False, True):
                for hanging in (False, True):
                    bench_latency(work, loadgen, results, per_job=per_job, hanging=hanging)
    except (BenchError, HarnessError) as exc:
        print(f"bench/webhooks.py: CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        loadgen.close()
    print_table(summary(results))
    for note in results.notes:
        print(f"note: {note}")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.json:
        record = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **asdict(results)}
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
