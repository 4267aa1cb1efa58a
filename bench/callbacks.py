"""Benchmark of the callback hot path, memory with many parked jobs, and the deadline sweep.

Run: `.venv/bin/python bench/callbacks.py [--jobs N] [--clients C] [--quick] [--json PATH]
[--pin] [--db postgresql://... [--replicas N]]`.
Everything is measured in one run and summarised in a table at the end:

1. Hot path through the real gateway: a `gateway serve` subprocess; N external jobs parked
   through `POST /api/v1/jobs` (C concurrent clients; timed too), then one terminal callback
   per job (`POST /continue/{token}` with a small JSON body) from C concurrent keep-alive
   connections. Any non-200 is an error; every job must end `success`.
2. Raw ceiling: `bench/raw_ceiling_app.py` (bare Starlette, plain sqlite3 (or plain asyncpg)
   in the endpoint) on N pre-inserted rows, same uvicorn setup, same load generator, same C.
   Ratio = gateway / raw.
   Both servers run side by side and the measured callbacks go in 4 alternating rounds
   (gateway, raw, gateway, ...), so a slow spell of the shared machine hits both sides.
3. RSS of `gateway serve` on a database holding 1M parked jobs (100k with --quick), bulk
   inserted with sqlite3 from a template job made through the API, after a few hundred
   callbacks on other jobs (VmRSS and VmHWM from /proc).
4. The real store's sweep (`Sweeper.sweep_once` on `SQLiteStore`, ManualClock) over 100k jobs
   whose deadline has passed, beside 100k that are not due.

With `--db postgresql://...` (a server: each run creates fresh databases on it and drops them
after) the gateway and the raw ceiling both run on PostgreSQL, each on a database of its own,
and the server CPU figures come with PostgreSQL's CPU per callback beside them (all `postgres`
processes of this machine). `--replicas N` runs N gateway replicas on the database and N raw
apps, and the load generator spreads its connections over a side's servers round-robin (a
continue URL works on every replica). Phase 3 is SQLite's only (on PostgreSQL the parked jobs
live in the server): the VmRSS of every replica after the hot path is reported instead. Phase 4
runs `Sweeper.sweep_once` on `PostgresStore` over jobs bulk-inserted with one INSERT ... SELECT.

The load generator runs in its own process (asyncio + uvloop, a minimal HTTP/1.1 keep-alive
client over raw sockets, so its CPU cost per request stays small); it only ever talks to
127.0.0.1, and every loop is bounded in count and time. Goals come from the performance issue
and are reported, not enforced: the exit code is non-zero only when a correctness check fails.

`--pin` is a diagnostic: the gateway runs two busy threads (event loop and aiosqlite's
connection thread) that hand the GIL back and forth on every callback; when the scheduler puts
them on different cores, every hand-off crosses cores and the hot path runs at about half speed.
Pinning the servers to one CPU (and the load generator to the other) removes that mode.
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
import re
import secrets
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harness import (
    ADMIN_TOKEN,
    ROOT,
    BenchError,
    Cluster,
    HarnessError,
    Row,
    Server,
    Summary,
    database_name,
    fail_if,
    is_postgres_url,
    percentile,
    postgres_cpu_s,
    postgres_database,
    print_table,
    run_async,
    run_context,
    run_fast,
    running,
    start_gateway,
    start_server,
)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

JOB_BODY = {"name": "bench-deploy"}
CALLBACK_BODY = {
    "message": "deployed",
    "outputs": {
        "IMAGE_DIGEST": "sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f0",
        "ENV_URL": "https://x.y",
    },
}
REQUEST_TIMEOUT_S = 30.0
LOAD_TIMEOUT_S = 600.0

GOAL_RATIO = 0.6
GOAL_P99_MS = 30.0
GOAL_RSS_MB = 60.0
GOAL_SWEEP_S = 2.0
SWEEP_JOBS = 100_000
ROUNDS = 4


# --------------------------------------------------------------------------------------------
# Load generator (runs in a child process)
# --------------------------------------------------------------------------------------------

_HEADER_END = b"\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(_HEADER_END)
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(self.buffer[:end])
        length = _CONTENT_LENGTH.search(head)
        if length is None:
            self.waiter.set_exception(RuntimeError("response without content-length"))
            return
        total = end + 4 + int(length.group(1))
        if len(self.buffer) < total:
            return
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        status = int(head[9:12])
        self.waiter.set_result((status, body, _CONNECTION_CLOSE.search(head) is not None))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))


@dataclass
class LoadResult:
    """What one load run observed; `statuses[i]` is 0 for a transport error or a timeout."""

    wall_s: float
    statuses: list[int]
    latencies_s: list[float]
    bodies: list[bytes] | None
    client_cpu_s: float


def build_request(
    method: str, host: str, path: str, body: bytes, headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    if body:
        lines.append("Content-Type: application/json")
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _drive(
    targets: Sequence[tuple[str, int]], requests: Sequence[bytes], clients: int, keep_bodies: bool
) -> LoadResult:
    """Fire `requests` from `clients` keep-alive connections, client k on `targets[k % n]`."""
    loop = asyncio.get_running_loop()
    count = len(requests)
    statuses = [0] * count
    latencies = [0.0] * count
    bodies: list[bytes] | None = [b""] * count if keep_bodies else None
    next_index = iter(range(count))
    give_up_at = time.monotonic() + LOAD_TIMEOUT_S

    async def connect(host: str, port: int) -> tuple[asyncio.Transport, _Connection]:
        transport, protocol = await loop.create_connection(_Connection, host, port)
        return transport, protocol  # type: ignore[return-value]

    async def client(host: str, port: int) -> None:
        transport, protocol = await connect(host, port)
        try:
            for index in next_index:
                if time.monotonic() > give_up_at:
                    break
                if transport.is_closing():
                    transport, protocol = await connect(host, port)
                waiter: asyncio.Future[tuple[int, bytes, bool]] = loop.create_future()
                protocol.waiter = waiter
                started = time.perf_counter()
                transport.write(requests[index])
                try:
                    status, body, closing = await asyncio.wait_for(waiter, REQUEST_TIMEOUT_S)
                except (TimeoutError, ConnectionError, RuntimeError):
                    latencies[index] = time.perf_counter() - started
                    transport.close()
                    continue
                latencies[index] = time.perf_counter() - started
                statuses[index] = status
                if bodies is not None:
                    bodies[index] = body
                if closing:
                    transport.close()
        finally:
            transport.close()

    cpu_before = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(client(*targets[k % len(targets)]) for k in range(min(clients, count))))
    wall = time.perf_counter() - started
    return LoadResult(wall, statuses, latencies, bodies, time.process_time() - cpu_before)


def _load_in_child(
    targets: Sequence[tuple[str, int]], requests: Sequence[bytes], clients: int, keep_bodies: bool
) -> LoadResult:
    return run_fast(_drive(targets, requests, clients, keep_bodies))


class LoadGenerator:
    """A separate process that fires prepared requests at servers on loopback (its connections
    spread over them round-robin)."""

    def __init__(self, cpus: set[int] | None = None) -> None:
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=None if cpus is None else os.sched_setaffinity,
            initargs=() if cpus is None else (0, cpus),
        )

    def run(
        self,
        servers: Sequence[Server],
        requests: Sequence[bytes],
        clients: int,
        *,
        keep_bodies: bool = False,
    ) -> LoadResult:
        targets = []
        for server in servers:
            parts = urlsplit(server.url)
            assert parts.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
            assert parts.port is not None
            targets.append((parts.hostname, parts.port))
        future = self._pool.submit(_load_in_child, targets, list(requests), clients, keep_bodies)
        return future.result(timeout=LOAD_TIMEOUT_S + 60)

    def close(self) -> None:
        self._pool.shutdown()


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------


def start_raw(db: str, log_path: Path) -> Server:
    """The raw ceiling app on `db` (a SQLite file or a PostgreSQL URL)."""
    command = [sys.executable, str(ROOT / "bench" / "raw_ceiling_app.py"), "--db", db]
    return start_server(command, log_path)


@dataclass
class Side:
    """The servers that answer one side's callbacks (replicas of a gateway, or raw apps), and
    the PostgreSQL database they use (None: SQLite), whose CPU counts too."""

    servers: list[Server]
    postgres_db: str | None = None

    def cpu_s(self) -> tuple[float, float]:
        """(CPU seconds of the servers, of PostgreSQL working for this side's database) so far."""
        servers = sum(server.cpu_s() for server in self.servers)
        if self.postgres_db is None:
            return servers, 0.0
        return servers, postgres_cpu_s({database_name(self.postgres_db)})


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


@dataclass
class HotPath:
    label: str
    requests: int
    per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    server_cpu_ms_per_req: float
    client_cpu_share: float
    postgres_cpu_ms_per_req: float = 0.0

    @classmethod
    def of(
        cls, label: str, result: LoadResult, server_cpu_s: float, postgres_cpu_s: float = 0.0
    ) -> HotPath:
        ordered = sorted(result.latencies_s)
        count = len(result.statuses)
        return cls(
            label=label,
            requests=count,
            per_s=count / result.wall_s,
            p50_ms=percentile(ordered, 0.50) * 1000,
            p99_ms=percentile(ordered, 0.99) * 1000,
            max_ms=ordered[-1] * 1000,
            errors=sum(1 for status in result.statuses if status != 200),
            server_cpu_ms_per_req=server_cpu_s * 1000 / count,
            client_cpu_share=result.client_cpu_s / result.wall_s,
            postgres_cpu_ms_per_req=postgres_cpu_s * 1000 / count,
        )

    def line(self) -> str:
        return (
            f"  {self.label}: {self.requests} callbacks, {self.per_s:,.0f}/s, p50"
            f" {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, max {self.max_ms:.1f} ms,"
            f" errors {self.errors}; server CPU {self.server_cpu_ms_per_req:.3f} ms/callback,"
            + (
                f" PostgreSQL CPU {self.postgres_cpu_ms_per_req:.3f} ms/callback,"
                if self.postgres_cpu_ms_per_req
                else ""
            )
            + f" load generator CPU {self.client_cpu_share:.0%} of a core"
        )


@dataclass
class Results:
    jobs: int
    clients: int
    parked: int
    store: str = "sqlite"
    replicas: int = 1
    pinned: bool = False
    create_per_s: float = 0.0
    create_p99_ms: float = 0.0
    gateway: HotPath | None = None
    raw: HotPath | None = None
    gateway_rss_after_load_mb: float = 0.0
    replica_rss_mb: list[float] = field(default_factory=list)
    rss_idle_mb: float = 0.0
    rss_mb: float = 0.0
    hwm_mb: float = 0.0
    parked_build_s: float = 0.0
    parked_start_s: float = 0.0
    sweep_s: float = 0.0
    sweep_build_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        assert self.gateway is not None and self.raw is not None
        return self.gateway.per_s / self.raw.per_s


# --------------------------------------------------------------------------------------------
# Data: ULID-like ids and bulk-inserted parked jobs
# --------------------------------------------------------------------------------------------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]


def filler_ids(prefix: str, count: int) -> Iterator[str]:
    """`count` distinct 26-character ULID-like ids: a 16-character prefix (a real ULID's
    timestamp and 6 characters) and 10 characters counting up."""
    assert len(prefix) == 16
    for i in range(count):
        yield (
            prefix
            + _PAIRS[(i >> 40) & 1023]
            + _PAIRS[(i >> 30) & 1023]
            + _PAIRS[(i >> 20) & 1023]
            + _PAIRS[(i >> 10) & 1023]
            + _PAIRS[i & 1023]
        )


def bulk_park(
    db_path: Path, template_id: str, count: int, *, prefix: str, due_at: float | None = None
) -> None:
    """Insert `count` copies of the template job (a parked external job made through the API)
    with fresh id, token nonce and token hash. With `due_at`, their callback deadline (and so
    `deadline_at`) is set to `due_at` plus a few microseconds each, so they are all overdue."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
        template = conn.execute("SELECT * FROM jobs WHERE id = ?", (template_id,)).fetchone()
        fail_if(template is None, f"template job {template_id} is missing")
        at = {name: i for i, name in enumerate(columns)}

        def rows() -> Iterator[list[Any]]:
            for i, job_id in enumerate(filler_ids(prefix, count)):
                row = list(template)
                row[at["id"]] = job_id
                row[at["token_nonce"]] = os.urandom(16)
                row[at["token_hash"]] = os.urandom(32)
                if due_at is not None:
                    row[at["callback_deadline_at"]] = due_at + i * 1e-6
                    row[at["deadline_at"]] = due_at + i * 1e-6
                yield row

        # A bulk load: no journal and a big page cache, then back to the gateway's WAL mode.
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -512000")
        conn.execute("BEGIN")
        placeholders = ", ".join("?" * len(columns))
        conn.executemany(f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({placeholders})", rows())
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()


def gateway_db(data_dir: Path) -> Path:
    return data_dir / "gateway.sqlite3"


def make_template(data_dir: Path, db: str | None = None) -> str:
    """Start the gateway once on a fresh data dir or database (it migrates), park one job
    through the API, stop it. Returns the job's id."""
    import httpx

    with running(start_gateway(data_dir, db=db)) as server:
        response = httpx.post(
            f"{server.url}/api/v1/jobs",
            json=JOB_BODY,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=10,
        )
        fail_if(response.status_code != 201, f"template job: {response.text}")
        job = response.json()
    fail_if(job["state"] != "pending", f"the template job is {job['state']}, not pending")
    job_id: str = job["id"]
    return job_id


async def postgres_bulk_park(
    dsn: str, template_id: str, count: int, *, prefix: str, due_at: float | None = None
) -> None:
    """`bulk_park` on PostgreSQL: one INSERT ... SELECT of the template row over
    generate_series, with fresh ids (prefix + 10 digits), token nonces and token hashes."""
    import asyncpg

    assert len(prefix) == 16
    conn = await asyncpg.connect(dsn)
    try:
        columns = [
            row["column_name"]
            for row in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs'"
                " AND table_schema = current_schema() ORDER BY ordinal_position"
            )
        ]
        fail_if(
            await conn.fetchval("SELECT count(*) FROM jobs WHERE id = $1", template_id) != 1,
            f"template job {template_id} is missing",
        )
        made = {
            "id": "$2::text || lpad(g::text, 10, '0')",
            "token_nonce": "decode(md5(random()::text || g::text), 'hex')",
            "token_hash": "sha256(convert_to($2::text || random()::text || g::text, 'UTF8'))",
        }
        arguments: list[Any] = [template_id, prefix, count]
        if due_at is not None:
            made["callback_deadline_at"] = made["deadline_at"] = "$4::float8 + g * 1e-6"
            arguments.append(due_at)
        select = ", ".join(made.get(name, f't."{name}"') for name in columns)
        names = ", ".join(f'"{name}"' for name in columns)
        await conn.execute(
            f"INSERT INTO jobs ({names}) SELECT {select} FROM jobs t"
            " CROSS JOIN generate_series(0, $3::int - 1) g WHERE t.id = $1",
            *arguments,
        )
        await conn.execute("ANALYZE jobs")
    finally:
        await conn.close()


async def postgres_count(dsn: str, sql: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------


def create_jobs(
    servers: Sequence[Server], loadgen: LoadGenerator, count: int, clients: int
) -> tuple[list[str], list[str], LoadResult]:
    """Park `count` external jobs through the API (the connections spread over `servers`);
    returns their ids, continue paths and the load result of the creation."""
    body = json.dumps(JOB_BODY).encode()
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    request = build_request("POST", servers[0].host_header, "/api/v1/jobs", body, auth)
    result = loadgen.run(servers, [request] * count, clients, keep_bodies=True)
    bad = [s for s in result.statuses if s != 201]
    fail_if(bool(bad), f"{len(bad)} job creations failed (statuses {sorted(set(bad))})")
    assert result.bodies is not None
    jobs = [json.loads(raw) for raw in result.bodies]
    fail_if(any(job["state"] != "pending" for job in jobs), "a new external job is not pending")
    return [j["id"] for j in jobs], [urlsplit(j["continue_url"]).path for j in jobs], result


def fire_callbacks(
    side: Side, loadgen: LoadGenerator, paths: Sequence[str], clients: int
) -> tuple[LoadResult, float, float]:
    """One callback per path, the connections spread over the side's servers (a continue URL
    works on every replica); the result, and the CPU seconds its servers and PostgreSQL used."""
    body = json.dumps(CALLBACK_BODY).encode()
    host = side.servers[0].host_header
    requests = [build_request("POST", host, path, body) for path in paths]
    server_before, postgres_before = side.cpu_s()
    result = loadgen.run(side.servers, requests, clients, keep_bodies=True)
    server_after, postgres_after = side.cpu_s()
    assert result.bodies is not None
    for status, raw in zip(result.statuses, result.bodies, strict=True):
        if status == 200 and json.loads(raw)["state"] != "success":
            raise BenchError(f"a callback answered 200 with {raw!r}")
    return result, server_after - server_before, postgres_after - postgres_before


def count_jobs_by_api(server: Server, state: str) -> set[str]:
    """Ids of every job in `state`, read through `GET /api/v1/jobs` page by page."""
    import httpx

    found: set[str] = set()
    cursor: str | None = None
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    ) as http:
        for _ in range(100_000):
            params = {"state": state, "limit": "500", **({"cursor": cursor} if cursor else {})}
            page = http.get("/api/v1/jobs", params=params)
            fail_if(page.status_code != 200, f"listing jobs: {page.text}")
            body = page.json()
            found.update(job["id"] for job in body["items"])
            cursor = body["next_cursor"]
            if cursor is None:
                break
    return found


def warmup_count(jobs: int) -> int:
    return max(100, min(1000, jobs // 10))


def chunks(items: Sequence[str], count: int) -> list[Sequence[str]]:
    size = math.ceil(len(items) / count)
    return [items[i : i + size] for i in range(0, len(items), size)]


def merge(results: Sequence[LoadResult]) -> LoadResult:
    """One result for several load runs: walls and CPU add up, samples concatenate."""
    return LoadResult(
        wall_s=sum(r.wall_s for r in results),
        statuses=[s for r in results for s in r.statuses],
        latencies_s=[lat for r in results for lat in r.latencies_s],
        bodies=None,
        client_cpu_s=sum(r.client_cpu_s for r in results),
    )


def park_on_gateway(
    servers: Sequence[Server], loadgen: LoadGenerator, results: Results
) -> tuple[list[str], list[str]]:
    """Park warm-up + measured jobs through the API; the creation rate is a figure too."""
    ids, paths, created = create_jobs(
        servers, loadgen, warmup_count(results.jobs) + results.jobs, results.clients
    )
    results.create_per_s = len(ids) / created.wall_s
    results.create_p99_ms = percentile(sorted(created.latencies_s), 0.99) * 1000
    print(
        f"  parked {len(ids)} jobs through POST /api/v1/jobs in {created.wall_s:.2f} s:"
        f" {results.create_per_s:,.0f} jobs/s, p99 {results.create_p99_ms:.1f} ms"
    )
    return ids, paths


def park_on_raw(db: str, results: Results) -> list[str]:
    """A raw-ceiling database (a SQLite file, or an empty PostgreSQL database) with warm-up +
    measured parked rows; returns their paths."""
    import raw_ceiling_app

    count = warmup_count(results.jobs) + results.jobs
    tokens = [secrets.token_urlsafe(32) for _ in range(count)]
    jobs = list(zip(filler_ids("01KB0000000RAW00", count), tokens, strict=True))
    deadline_at = time.time() + 86_400
    if is_postgres_url(db):
        run_async(lambda: raw_ceiling_app.create_postgres_db(db, jobs, deadline_at))
    else:
        raw_ceiling_app.create_db(Path(db), jobs, deadline_at)
    return [f"/continue/{token}" for token in tokens]


def count_raw(db: str, sql: str) -> int:
    if is_postgres_url(db):
        return run_async(lambda: postgres_count(db, sql))
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def bench_hot_path(
    work: Path, loadgen: LoadGenerator, results: Results, server_dsn: str | None
) -> None:
    """Phases 1 and 2. Both sides run side by side (the idle one costs nothing) and the
    measured callbacks are fired in alternating rounds, gateway then raw, so a slow spell of
    this shared machine hits both sides instead of skewing the ratio. With `server_dsn` each
    side gets a fresh PostgreSQL database on that server, and with N replicas the raw side runs
    N raw apps too; the load generator spreads its connections over a side's servers."""
    jobs, clients, rounds, replicas = results.jobs, results.clients, ROUNDS, results.replicas
    warm = warmup_count(jobs)
    where = f"{results.store} x{replicas}"
    print(f"[1+2] hot path ({where}): {warm} warm-up + {jobs} measured callbacks on the gateway")
    print(f"  and on the raw ceiling app, {clients} clients, in {rounds} alternating rounds ...")
    with contextlib.ExitStack() as stack:
        if server_dsn is not None:
            gateway_db: str | None = stack.enter_context(postgres_database(server_dsn))
            raw_db = stack.enter_context(postgres_database(server_dsn))
        else:
            gateway_db, raw_db = None, str(work / "raw.sqlite3")
        cluster = stack.enter_context(Cluster(work / "hot", replicas=replicas, db=gateway_db))
        gateways: list[Server] = list(cluster.gateways)
        ids, gateway_paths = park_on_gateway(gateways, loadgen, results)
        raw_paths = park_on_raw(raw_db, results)
        raws = [
            stack.enter_context(running(start_raw(raw_db, work / f"raw-{i}.log")))
            for i in range(replicas)
        ]
        raw_postgres = raw_db if gateway_db is not None else None
        sides = [(Side(gateways, gateway_db), gateway_paths), (Side(raws, raw_postgres), raw_paths)]
        for side, paths in sides:
            fire_callbacks(side, loadgen, paths[:warm], clients)
        measured: list[list[LoadResult]] = [[], []]
        cpu = [[0.0, 0.0], [0.0, 0.0]]
        for round_paths in zip(*(chunks(paths[warm:], rounds) for _, paths in sides), strict=True):
            for index, (side, _) in enumerate(sides):
                result, server_cpu, postgres_cpu = fire_callbacks(
                    side, loadgen, round_paths[index], clients
                )
                measured[index].append(result)
                cpu[index][0] += server_cpu
                cpu[index][1] += postgres_cpu
        results.gateway = HotPath.of("gateway", merge(measured[0]), *cpu[0])
        results.raw = HotPath.of("raw", merge(measured[1]), *cpu[1])
        print(results.gateway.line())
        print(results.raw.line())
        print(f"  ratio gateway/raw = {results.ratio:.2f}")
        results.replica_rss_mb = [g.memory_kb()["VmRSS"] / 1024 for g in cluster.gateways]
        results.gateway_rss_after_load_mb = max(results.replica_rss_mb)
        rss = ", ".join(f"{mb:.1f}" for mb in results.replica_rss_mb)
        print(f"  gateway VmRSS after the run (per replica): {rss} MB")
        done = count_jobs_by_api(cluster.gateways[0], "success")
        pending = count_jobs_by_api(cluster.gateways[0], "pending")
        raw_done = count_raw(raw_db, "SELECT count(*) FROM jobs WHERE state = 'success'")
        events = count_raw(raw_db, "SELECT count(*) FROM job_events")
    fail_if(results.gateway.errors != 0, f"{results.gateway.errors} callbacks were not 200")
    fail_if(done != set(ids), f"{len(set(ids) - done)} jobs did not end success")
    fail_if(bool(pending), f"{len(pending)} jobs are still pending")
    print(f"  checked through the API: all {len(done)} gateway jobs are success, none pending")
    fail_if(results.raw.errors != 0, f"{results.raw.errors} raw callbacks were not 200")
    expected = warm + jobs
    fail_if(raw_done != expected or events != expected, f"raw: {raw_done} success, {events} events")


def bench_memory(work: Path, loadgen: LoadGenerator, results: Results) -> None:
    parked, clients = results.parked, results.clients
    print(f"[3] RSS with {parked:,} parked jobs ...")
    data_dir = work / "parked"
    template_id = make_template(data_dir)
    started = time.perf_counter()
    bulk_park(gateway_db(data_dir), template_id, parked, prefix=template_id[:10] + "PARK00")
    results.parked_build_s = time.perf_counter() - started
    size_mb = gateway_db(data_dir).stat().st_size / 1e6
    took = results.parked_build_s
    print(f"  bulk-inserted {parked:,} parked jobs in {took:.1f} s ({size_mb:.0f} MB)")
    with running(start_gateway(data_dir)) as server:
        results.parked_start_s = server.start_s
        results.rss_idle_mb = server.memory_kb()["VmRSS"] / 1024
        _, paths, _ = create_jobs([server], loadgen, 300, clients)
        result, _, _ = fire_callbacks(Side([server]), loadgen, paths, clients)
        fail_if(any(s != 200 for s in result.statuses), "a callback failed with many parked jobs")
        memory = server.memory_kb()
    results.rss_mb = memory["VmRSS"] / 1024
    results.hwm_mb = memory["VmHWM"] / 1024
    print(
        f"  gateway serve ready in {results.parked_start_s:.1f} s; VmRSS idle"
        f" {results.rss_idle_mb:.1f} MB; after 300 jobs + 300 callbacks VmRSS"
        f" {results.rss_mb:.1f} MB, VmHWM {results.hwm_mb:.1f} MB"
    )


SWEEP_CHECKS = (
    "SELECT count(*) FROM jobs WHERE state = 'failed'"
    " AND failure_reason = 'callback_timeout' AND deadline_at IS NULL",
    "SELECT count(*) FROM job_events WHERE state = 'failed'"
    " AND failure_reason = 'callback_timeout' AND cause = 'deadline'",
    "SELECT count(*) FROM jobs WHERE state = 'pending'",
)


def bench_sweep(work: Path, results: Results, server_dsn: str | None) -> None:
    """Phase 4: on the gateway's SQLite file, or on a fresh PostgreSQL database."""
    print(
        f"[4] sweep of {SWEEP_JOBS:,} expired deadlines (beside {SWEEP_JOBS:,} not due)"
        f" on {results.store} ..."
    )
    data_dir = work / "sweep"
    now = time.time()
    with contextlib.ExitStack() as stack:
        dsn = None if server_dsn is None else stack.enter_context(postgres_database(server_dsn))
        template_id = make_template(data_dir, db=dsn)
        dead, fresh = template_id[:10] + "DEAD00", template_id[:10] + "NEXT00"
        started = time.perf_counter()
        if dsn is None:
            db_path = gateway_db(data_dir)
            bulk_park(db_path, template_id, SWEEP_JOBS, prefix=dead, due_at=now - 3600)
            bulk_park(db_path, template_id, SWEEP_JOBS, prefix=fresh)
            results.sweep_build_s = time.perf_counter() - started
            expired, results.sweep_s = asyncio.run(_sweep(db_path, None, now))
            failed, events, pending = (count_raw(str(db_path), sql) for sql in SWEEP_CHECKS)
        else:
            park = postgres_bulk_park
            run_async(lambda: park(dsn, template_id, SWEEP_JOBS, prefix=dead, due_at=now - 3600))
            run_async(lambda: park(dsn, template_id, SWEEP_JOBS, prefix=fresh))
            results.sweep_build_s = time.perf_counter() - started
            expired, results.sweep_s = run_async(lambda: _sweep(None, dsn, now))
            failed, events, pending = (count_raw(dsn, sql) for sql in SWEEP_CHECKS)
    fail_if(expired != SWEEP_JOBS, f"sweep_once reported {expired}, expected {SWEEP_JOBS}")
    fail_if(failed != SWEEP_JOBS, f"{failed} jobs failed with callback_timeout")
    fail_if(events != SWEEP_JOBS, f"{events} callback_timeout events were written")
    fail_if(pending != SWEEP_JOBS + 1, f"{pending} not-due jobs are still pending")
    print(
        f"  sweep_once failed {expired:,} jobs (callback_timeout) and wrote {events:,} events in"
        f" {results.sweep_s:.2f} s; {pending:,} not-due jobs untouched"
    )


async def _sweep(db_path: Path | None, dsn: str | None, now: float) -> tuple[int, float]:
    """One `Sweeper.sweep_once` on the real store (SQLite file or PostgreSQL database)."""
    from gateway.clock import ManualClock
    from gateway.metrics import Metrics
    from gateway.store.base import Store
    from gateway.sweeper import Sweeper

    store: Store
    if dsn is not None:
        from gateway.store.postgres import PostgresStore

        store = PostgresStore(dsn)
    else:
        from gateway.store.sqlite import SQLiteStore

        assert db_path is not None
        store = SQLiteStore(db_path)
    await store.open()
    try:
        sweeper = Sweeper(store, ManualClock(now), Metrics(), interval_s=1.0)
        started = time.perf_counter()
        expired = await sweeper.sweep_once()
        return expired, time.perf_counter() - started
    finally:
        await store.close()


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def summary(results: Results) -> list[Row]:
    """The table's rows: figure, value, goal, met?"""
    gateway, raw = results.gateway, results.raw
    assert gateway is not None and raw is not None
    c, parked = results.clients, f"{results.parked:,}"
    table = Summary()
    info, goal, rows = table.info, table.goal, table.rows

    info("job creation via API (jobs/s)", f"{results.create_per_s:,.0f}")
    info(f"gateway callbacks/s ({c} clients)", f"{gateway.per_s:,.0f}")
    info(f"raw ceiling callbacks/s ({c} clients)", f"{raw.per_s:,.0f}")
    goal(
        "ratio gateway/raw", f"{results.ratio:.2f}", f">= {GOAL_RATIO}", results.ratio >= GOAL_RATIO
    )
    info("gateway p50 latency", f"{gateway.p50_ms:.1f} ms")
    p99 = gateway.p99_ms
    goal(
        f"gateway p99 latency ({c} clients)",
        f"{p99:.1f} ms",
        f"<= {GOAL_P99_MS:.0f} ms",
        p99 <= GOAL_P99_MS,
    )
    info("gateway max latency", f"{gateway.max_ms:.1f} ms")
    info("raw p50 / p99 latency", f"{raw.p50_ms:.1f} / {raw.p99_ms:.1f} ms")
    goal("callback errors (non-200)", str(gateway.errors), "0", gateway.errors == 0)
    cpu = f"{gateway.server_cpu_ms_per_req:.3f} / {raw.server_cpu_ms_per_req:.3f} ms"
    info("server CPU per callback gateway / raw", cpu)
    if results.store == "postgresql":
        cpu = f"{gateway.postgres_cpu_ms_per_req:.3f} / {raw.postgres_cpu_ms_per_req:.3f} ms"
        info("PostgreSQL CPU per callback gateway / raw", cpu)
        per_replica = ", ".join(f"{mb:.1f}" for mb in results.replica_rss_mb)
        info("gateway VmRSS after the hot path, per replica", f"{per_replica} MB")
    else:
        rss, hwm, rss_goal = results.rss_mb, results.hwm_mb, f"<= {GOAL_RSS_MB:.0f} MB"
        goal(f"VmRSS with {parked} parked", f"{rss:.1f} MB", rss_goal, rss <= GOAL_RSS_MB)
        goal(f"VmHWM with {parked} parked", f"{hwm:.1f} MB", rss_goal, hwm <= GOAL_RSS_MB)
    sweep = results.sweep_s
    target = f"<= {GOAL_SWEEP_S:.0f} s"
    goal(f"sweep {SWEEP_JOBS:,} expired deadlines", f"{sweep:.2f} s", target, sweep <= GOAL_SWEEP_S)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, help="callbacks measured (default 20000; quick 2000)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent connections (50)")
    parser.add_argument("--parked", type=int, help="parked jobs for RSS (1M; quick 100k)")
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--db",
        metavar="POSTGRESQL_URL",
        help="measure on PostgreSQL: each run makes (and drops) fresh databases on this server",
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="gateway replicas (1; more need --db)"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="diagnostic: servers (and the sweep) on CPU 0, the load generator on CPU 1",
    )
    args = parser.parse_args(argv)
    if args.db is not None and not is_postgres_url(args.db):
        parser.error("--db takes a postgresql:// URL (SQLite is the default)")
    if args.replicas < 1 or (args.replicas > 1 and args.db is None):
        parser.error("--replicas N > 1 needs --db postgresql://...")
    results = Results(
        store="sqlite" if args.db is None else "postgresql",
        replicas=args.replicas,
        jobs=args.jobs or (2_000 if args.quick else 20_000),
        clients=args.clients,
        parked=args.parked or (100_000 if args.quick else 1_000_000),
        pinned=args.pin,
    )
    print(
        f"bench/callbacks.py: {results.store} x{results.replicas}, {results.jobs} callbacks,"
        f" {results.clients} clients"
        + ("" if args.db else f", {results.parked:,} parked")
        + f"; {run_context()}"
    )
    started = time.perf_counter()
    loadgen_cpus = None
    if args.pin:
        # Servers inherit this process's affinity; the load generator gets the other CPU.
        os.sched_setaffinity(0, {0})
        loadgen_cpus = {1}
        print("pinned: servers and the sweep on CPU 0, the load generator on CPU 1")
    loadgen = LoadGenerator(loadgen_cpus)
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
            work = Path(tmp)
            bench_hot_path(work, loadgen, results, args.db)
            if args.db is None:
                bench_memory(work, loadgen, results)
            bench_sweep(work, results, args.db)
    except (BenchError, HarnessError) as exc:
        print(f"bench/callbacks.py: CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        loadgen.close()
    rows = summary(results)
    print_table(rows)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.json:
        record = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **asdict(results)}
        record["ratio"] = results.ratio
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
