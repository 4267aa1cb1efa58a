"""Soak: one real `gateway serve` with 100k parked jobs under a steady open-loop load for minutes.

Run: `.venv/bin/python bench/soak.py [--minutes 10] [--db postgresql://...] [--parked 100000]
[--callbacks-per-s 200] [--hand-outs-per-s 50] [--runners 8] [--pin] [--json PATH]`;
`--minutes 1` is a quick check.

1. Setup. `gateway serve` migrates a fresh data dir (or, with `--db`, a fresh PostgreSQL
   database made on that server and dropped after), parks one external job through the API
   (the template) and registers a runner; it stops. Copies of the template row are
   bulk-inserted: `--parked` idle parked jobs (fresh id, random token nonce and hash: nobody
   can call them) and one callable parked job per scheduled callback (fresh id, a continue
   token minted with the gateway's own `ContinueTokens` under the bench secret key, so the
   script knows the URL). `gateway serve` starts again on that database.
2. Load, open loop, paced by a schedule (operation i is due at start + i / rate, whatever
   the answers before it; latency counts from that due time, so a stall is not hidden by a
   slower send rate):
   - `--callbacks-per-s` terminal calls `POST /continue/{token}` on distinct parked jobs;
   - `--hand-outs-per-s` script jobs created with `POST /api/v1/jobs`, which R protocol-level
     runners (long polls `POST /api/v1/runner/jobs/request`) take, confirm
     (`PUT {"state": "running"}`) and finish (`PUT {"state": "success"}`).
   Every minute: requests by outcome; p50/p99 latency per kind (callback, create: from the
   due time; hand-out: from the creation's due time to the 201 reaching a runner; claim: from
   the runner's request, long-poll wait included; confirm, exit: per request); the server's
   VmRSS, CPU and run-queue wait (runnable threads with no CPU free: on a shared machine, how
   much of a latency is the neighbours').
3. Audit, after a graceful stop, in the database: every callback answered 200 left its job
   `success`, the idle parked jobs are all still `pending`, every created script job was
   handed out once and is `success`, no job has more than one terminal event.

Goals (the exit code is non-zero when one is missed or the audit fails): no errors (any
unexpected status, transport error, timeout, duplicate hand-out, or an operation not sent
because MAX_IN_FLIGHT were outstanding), and RSS flat: VmRSS at the end within GOAL_RSS_DRIFT
of VmRSS after the warm-up (the first minute; half the run when it is shorter than two
minutes). How late the load generator sent behind its schedule is reported (a starved load
generator shows there, and in the latencies, which count from the due time).

Everything talks to 127.0.0.1 only; every wait is bounded by a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dispatch import Http
from harness import (
    ADMIN_TOKEN,
    ROOT,
    SECRET_KEY,
    BenchError,
    Gateway,
    HarnessError,
    Row,
    Summary,
    database_name,
    describe_checkout,
    fail_if,
    is_postgres_url,
    percentile,
    postgres_database,
    print_table,
    process_cpu_s,
    run_async,
    run_context,
    run_fast,
    running,
    start_gateway,
)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CALLBACK_BODY = {"message": "deployed", "outputs": {"IMAGE_DIGEST": "sha256:0f1e2d3c4b5a6978"}}
TEMPLATE_JOB = {"name": "soak-parked"}
RUNNERS = 8
LONG_POLL_S = 5
REQUEST_TIMEOUT_S = 30.0
IDLE_CONNECTION_S = (
    2.0  # uvicorn closes a keep-alive connection idle for 5 s: never reuse one near that
)
MAX_IN_FLIGHT = 1000  # beyond this the server has stalled: count an error instead of piling up
DRAIN_TIMEOUT_S = 60.0
RSS_SAMPLE_S = 5.0
START_DELAY_S = 0.5

GOAL_RSS_DRIFT = 0.10
WARN_LAG_P99_MS = 50.0

KINDS = ("callback", "create", "hand-out", "claim", "confirm", "exit")
EXPECTED = {
    "callback": 200,
    "create": 201,
    "hand-out": 201,
    "claim": 201,
    "confirm": 200,
    "exit": 200,
}
TERMINAL = ("success", "failed", "canceled", "skipped")


# --------------------------------------------------------------------------------------------
# Setup: a template job, a runner, bulk-inserted parked jobs
# --------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    template_id: str
    runner_token: str
    idle_prefix: str
    callable_prefix: str
    continue_paths: list[str]


def make_template(data_dir: Path, db: str | None) -> tuple[str, str]:
    """Migrate the database through `gateway serve`, park one job through the API and register
    a runner; stop it. Returns (template job id, runner token)."""
    import httpx

    with running(start_gateway(data_dir, db=db)) as gateway:
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(base_url=gateway.url, headers=auth, timeout=10) as http:
            job = http.post("/api/v1/jobs", json=TEMPLATE_JOB)
            fail_if(job.status_code != 201, f"template job: {job.text}")
            fail_if(job.json()["state"] != "pending", f"the template job is {job.text}")
            runner = http.post("/api/v1/runners", json={"description": "soak"})
            fail_if(runner.status_code != 201, f"runner registration: {runner.text}")
    return job.json()["id"], runner.json()["token"]


def job_ids(prefix: str, count: int) -> Iterator[str]:
    """`count` distinct 26-character ids: a 16-character prefix and 10 digits."""
    assert len(prefix) == 16
    for i in range(count):
        yield f"{prefix}{i:010d}"


def parked_rows(
    columns: Sequence[str],
    template: Sequence[Any],
    prefix: str,
    count: int,
    tokens: list[str] | None,
) -> Iterator[list[Any]]:
    """Copies of the template row with fresh ids. With `tokens` (a list to fill), each copy gets
    a continue token minted by the gateway's own code under the bench secret key; else a random
    nonce and hash (a job nobody can call)."""
    from gateway.tokens import ContinueTokens

    minter = ContinueTokens(SECRET_KEY)
    at = {name: i for i, name in enumerate(columns)}
    for job_id in job_ids(prefix, count):
        row = list(template)
        row[at["id"]] = job_id
        if tokens is None:
            row[at["token_nonce"]], row[at["token_hash"]] = os.urandom(16), os.urandom(32)
        else:
            credential = minter.mint(job_id)
            row[at["token_nonce"]], row[at["token_hash"]] = credential.nonce, credential.token_hash
            tokens.append(credential.token)
        yield row


def sqlite_bulk_park(
    db_path: Path, template_id: str, batches: Sequence[tuple[str, int, bool]]
) -> list[str]:
    """Insert each batch (prefix, count, callable) of template copies; the callable ones' tokens."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    tokens: list[str] = []
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
        template = conn.execute("SELECT * FROM jobs WHERE id = ?", (template_id,)).fetchone()
        fail_if(template is None, f"template job {template_id} is missing")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -256000")
        conn.execute("BEGIN")
        insert = f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        for prefix, count, callable_ in batches:
            rows = parked_rows(columns, template, prefix, count, tokens if callable_ else None)
            conn.executemany(insert, rows)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return tokens


async def postgres_bulk_park(
    dsn: str, template_id: str, batches: Sequence[tuple[str, int, bool]]
) -> list[str]:
    """`sqlite_bulk_park` on PostgreSQL (COPY of the rows made in Python)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    tokens: list[str] = []
    try:
        template = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1", template_id)
        fail_if(template is None, f"template job {template_id} is missing")
        columns = list(template.keys())
        for prefix, count, callable_ in batches:
            rows = parked_rows(
                columns, list(template.values()), prefix, count, tokens if callable_ else None
            )
            await conn.copy_records_to_table(
                "jobs", records=[tuple(r) for r in rows], columns=columns
            )
        await conn.execute("ANALYZE jobs")
    finally:
        await conn.close()
    return tokens


def prepare(data_dir: Path, db: str | None, parked: int, callbacks: int) -> Prepared:
    template_id, runner_token = make_template(data_dir, db)
    idle, callable_ = template_id[:10] + "SOAKID", template_id[:10] + "SOAKCB"
    batches = [(idle, parked, False), (callable_, callbacks, True)]
    if db is None:
        tokens = sqlite_bulk_park(data_dir / "gateway.sqlite3", template_id, batches)
    else:
        tokens = run_async(lambda: postgres_bulk_park(db, template_id, batches))
    paths = [f"/continue/{token}" for token in tokens]
    return Prepared(template_id, runner_token, idle, callable_, paths)


# --------------------------------------------------------------------------------------------
# Load: open loop on a schedule, protocol-level runners
# --------------------------------------------------------------------------------------------


def outcome(status: int, body: bytes, state: str) -> str:
    """The status, or what is wrong with a 200 that does not report `state`."""
    if status != 200:
        return str(status)
    try:
        said = json.loads(body).get("state")
    except ValueError:
        return "200 without JSON"
    return "200" if said == state else f"200 with state {said}"


def backends_cpu_s(database: str) -> float:
    """CPU seconds so far of the PostgreSQL backends serving `database` (their process title
    names it), so other work on the same server is left out. The gateway's pool keeps its
    connections, so its backends live through the run."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if title.startswith("postgres:") and f" {database} " in title:
                total += process_cpu_s(int(entry.name))
    return total


def runqueue_wait_s(pid: int) -> float:
    """Seconds the threads of a process were runnable but waited for a CPU (the second field
    of /proc/<pid>/task/<tid>/schedstat), summed over its live threads: how short of CPU a
    server on a shared machine was."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


@dataclass(frozen=True)
class CpuReading:
    at: float
    server_cpu_s: float
    server_wait_s: float
    postgres_cpu_s: float

    def since(self, before: CpuReading) -> tuple[float, float, float]:
        """Shares of a core since `before`: server CPU, server run-queue wait, PostgreSQL CPU."""
        wall = self.at - before.at
        return (
            (self.server_cpu_s - before.server_cpu_s) / wall,
            (self.server_wait_s - before.server_wait_s) / wall,
            (self.postgres_cpu_s - before.postgres_cpu_s) / wall,
        )


class Pool:
    """Keep-alive connections for the open-loop operations: the most recently used first, a
    new one when none is idle, none reused after IDLE_CONNECTION_S (the server may be closing
    it)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[float, Http]] = []
        self.opened = 0

    def acquire(self) -> Http:
        now = time.monotonic()
        while self.idle:
            used_at, http = self.idle.pop()
            if now - used_at < IDLE_CONNECTION_S:
                return http
            http.close()
        self.opened += 1
        return Http(self.host, self.port)

    def release(self, http: Http) -> None:
        self.idle.append((time.monotonic(), http))

    def close(self) -> None:
        for _, http in self.idle:
            http.close()
        self.idle.clear()


@dataclass
class Minute:
    """What completed during one minute of the run."""

    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: int = 0
    rss_mb: float = 0.0
    server_cpu_share: float = 0.0
    server_wait_share: float = 0.0
    postgres_cpu_share: float = 0.0


@dataclass
class Figures:
    store: str
    minutes: int
    parked: int
    callbacks_per_s: float
    hand_outs_per_s: float
    runners: int = RUNNERS
    pinned: bool = False
    per_minute: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    p50_ms: dict[str, float] = field(default_factory=dict)
    p99_ms: dict[str, float] = field(default_factory=dict)
    max_ms: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    lag_p99_ms: float = 0.0
    lag_max_ms: float = 0.0
    rss_idle_mb: float = 0.0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_max_mb: float = 0.0
    hwm_mb: float = 0.0
    rss_drift: float = 0.0
    server_cpu_share: float = 0.0
    server_wait_share: float = 0.0
    server_cpu_ms_per_request: float = 0.0
    postgres_cpu_share: float = 0.0
    client_cpu_share: float = 0.0
    connections_opened: int = 0
    setup_s: float = 0.0
    start_s: float = 0.0
    audit: dict[str, int] = field(default_factory=dict)


class Soak:
    """The load and its bookkeeping; one asyncio loop drives everything."""

    def __init__(
        self, gateway: Gateway, prepared: Prepared, figures: Figures, database: str | None
    ) -> None:
        parts = urlsplit(gateway.url)
        assert parts.hostname == "127.0.0.1" and parts.port is not None, "loopback only"
        self.host, self.port = parts.hostname, parts.port
        self.gateway = gateway
        self.prepared = prepared
        self.figures = figures
        self.database = database
        """The PostgreSQL database's name (None on SQLite)."""
        self.postgres = database is not None
        self.duration_s = figures.minutes * 60.0
        self.pool = Pool(self.host, self.port)
        self.minutes = [Minute() for _ in range(figures.minutes)]
        self.lags: list[float] = []
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.created_sent: dict[str, float] = {}  # job name -> due time of its creation
        self.created: set[str] = set()  # names answered 201
        self.handed_out: set[str] = set()
        self.finished: set[str] = set()
        self.sent: Counter[str] = Counter()  # requests written, answered or not
        self.schedules_done = False
        self.rss_samples: list[tuple[float, float]] = []
        self.t0 = 0.0
        self.minute_cpu = CpuReading(0.0, 0.0, 0.0, 0.0)

    # -- bookkeeping ----------------------------------------------------------------------

    def minute_of(self, at: float) -> Minute:
        index = int((at - self.t0) // 60)
        return self.minutes[max(0, min(index, len(self.minutes) - 1))]

    def record(self, kind: str, outcome: str, started: float, *, ok: bool) -> None:
        now = time.monotonic()
        minute = self.minute_of(now)
        minute.outcomes[f"{kind} {outcome}"] += 1
        if ok:
            minute.latencies[kind].append(now - started)
        else:
            minute.errors += 1
            if len(self.figures.error_samples) < 20:
                self.figures.error_samples.append(f"{kind}: {outcome}")

    async def call(
        self,
        http: Http,
        kind: str,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str],
        started: float,
        *,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> tuple[int, bytes] | None:
        """One request; a transport error or timeout is recorded as an error (None)."""
        self.sent[kind] += 1
        try:
            return await http.request(method, path, body, headers, timeout_s=timeout_s)
        except TimeoutError:
            http.close()
            self.record(kind, "timeout", started, ok=False)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            http.close()
            self.record(kind, f"transport error {type(exc).__name__}", started, ok=False)
        return None

    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- open-loop operations ---------------------------------------------------------------

    async def callback(self, index: int, due: float) -> None:
        path = self.prepared.continue_paths[index]
        http = self.pool.acquire()
        answer = await self.call(http, "callback", "POST", path, CALLBACK_BODY, {}, due)
        if answer is None:
            return
        self.pool.release(http)
        status, body = answer
        said = outcome(status, body, "success")
        self.record("callback", said, due, ok=said == "200")

    async def create(self, index: int, due: float) -> None:
        name = f"soak-{index}"
        self.created_sent[name] = due
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        job = {"name": name, "kind": "script", "script": ["true"]}
        http = self.pool.acquire()
        answer = await self.call(http, "create", "POST", "/api/v1/jobs", job, auth, due)
        if answer is None:
            return
        self.pool.release(http)
        status, _ = answer
        self.record("create", str(status), due, ok=status == 201)
        if status == 201:
            self.created.add(name)

    async def paced(self, rate: float, operation: Callable[[int, float], Awaitable[None]]) -> None:
        """Start operation i at t0 + i / rate, whatever became of the earlier ones."""
        for index in range(int(self.duration_s * rate)):
            due = self.t0 + index / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing a schedule, not waiting for a result
            self.lags.append(time.monotonic() - due)
            if self.in_flight >= MAX_IN_FLIGHT:
                self.record(operation.__name__, "not sent: too many in flight", due, ok=False)
                continue
            self.spawn(self.tracked(operation(index, due)))

    async def tracked(self, work: Awaitable[None]) -> None:
        self.in_flight += 1
        try:
            await work
        finally:
            self.in_flight -= 1

    # -- runners ------------------------------------------------------------------------------

    def runners_done(self) -> bool:
        return self.schedules_done and self.in_flight == 0 and self.finished >= self.created

    async def runner(self) -> None:
        """Long-poll for a job, confirm it, report exit 0; until every created job finished."""
        auth = {"Authorization": f"Bearer {self.prepared.runner_token}"}
        http = Http(self.host, self.port)
        try:
            while not self.runners_done():
                polled = time.monotonic()
                answer = await self.call(
                    http,
                    "request",
                    "POST",
                    "/api/v1/runner/jobs/request",
                    {"wait_s": LONG_POLL_S},
                    auth,
                    polled,
                    timeout_s=LONG_POLL_S + REQUEST_TIMEOUT_S,
                )
                if answer is None:
                    continue
                status, body = answer
                if status == 204:
                    self.record("request", "204", polled, ok=True)
                    continue
                if status != 201:
                    self.record("hand-out", str(status), polled, ok=False)
                    continue
                now = time.monotonic()
                self.minute_of(now).latencies["claim"].append(now - polled)
                await self.run_job(http, json.loads(body))
        finally:
            http.close()

    async def run_job(self, http: Http, job: dict[str, Any]) -> None:
        name = job["name"]
        due = self.created_sent.get(name, time.monotonic())
        if name in self.handed_out:
            self.record("hand-out", "duplicate hand-out", due, ok=False)
            return
        self.handed_out.add(name)
        self.record("hand-out", "201", due, ok=True)
        path = f"/api/v1/runner/jobs/{job['id']}"
        job_token = {"Job-Token": job["token"]}
        for kind, state in (("confirm", "running"), ("exit", "success")):
            started = time.monotonic()
            answer = await self.call(http, kind, "PUT", path, {"state": state}, job_token, started)
            if answer is None:
                return
            status, body = answer
            said = outcome(status, body, state)
            self.record(kind, said, started, ok=said == "200")
            if said != "200":
                return
        self.finished.add(name)

    # -- the run --------------------------------------------------------------------------------

    def sample_rss(self) -> float:
        rss = self.gateway.memory_kb()["VmRSS"] / 1024
        self.rss_samples.append((time.monotonic() - self.t0, rss))
        return rss

    async def sampler(self) -> None:
        while True:
            await asyncio.sleep(RSS_SAMPLE_S)  # a sampling period, not synchronization
            self.sample_rss()

    async def reporter(self) -> None:
        """Print each minute once it is over (the last one after the drain, in `run`)."""
        for index in range(len(self.minutes) - 1):
            await asyncio.sleep(max(0.0, self.t0 + 60 * (index + 1) - time.monotonic()))
            self.close_minute(index)

    def cpu(self) -> CpuReading:
        return CpuReading(
            time.monotonic(),
            self.gateway.cpu_s(),
            runqueue_wait_s(self.gateway.pid),
            backends_cpu_s(self.database) if self.database else 0.0,
        )

    def close_minute(self, index: int) -> None:
        """Sample RSS and CPU (since the previous minute closed) and print the minute."""
        minute = self.minutes[index]
        minute.rss_mb = self.sample_rss()
        now, before = self.cpu(), self.minute_cpu
        minute.server_cpu_share, minute.server_wait_share, minute.postgres_cpu_share = now.since(
            before
        )
        self.minute_cpu = now
        print(minute_line(index, minute, self.postgres), flush=True)

    async def run(self) -> None:
        figures = self.figures
        print(minute_header(self.postgres), flush=True)
        figures.rss_idle_mb = self.gateway.memory_kb()["VmRSS"] / 1024
        client_cpu = time.process_time()
        self.t0 = time.monotonic() + START_DELAY_S
        background = [
            asyncio.ensure_future(self.sampler()),
            asyncio.ensure_future(self.reporter()),
        ]
        runners = [asyncio.ensure_future(self.runner()) for _ in range(figures.runners)]
        server_cpu = self.minute_cpu = self.cpu()
        await asyncio.gather(
            self.paced(figures.callbacks_per_s, self.callback),
            self.paced(figures.hand_outs_per_s, self.create),
        )
        self.schedules_done = True
        # runners return once every created job is finished (at most a long poll later)
        await asyncio.wait([*runners, *self.tasks], timeout=DRAIN_TIMEOUT_S)
        stuck = len(self.created - self.finished)
        if stuck:
            self.record(
                "hand-out",
                f"{stuck} created jobs not finished after the drain",
                time.monotonic(),
                ok=False,
            )
        for task in [*background, *runners, *self.tasks]:
            task.cancel()
        await asyncio.gather(*background, *runners, *self.tasks, return_exceptions=True)
        self.pool.close()
        self.close_minute(len(self.minutes) - 1)  # its own 60 s plus the drain
        end = self.cpu()
        wall = end.at - server_cpu.at
        figures.client_cpu_share = (time.process_time() - client_cpu) / wall
        figures.server_cpu_share, figures.server_wait_share, figures.postgres_cpu_share = end.since(
            server_cpu
        )
        memory = self.gateway.memory_kb()
        figures.rss_end_mb = memory["VmRSS"] / 1024
        figures.hwm_mb = memory["VmHWM"] / 1024
        figures.connections_opened = self.pool.opened
        self.summarise(end.server_cpu_s - server_cpu.server_cpu_s)

    def summarise(self, server_cpu_s: float) -> None:
        figures = self.figures
        outcomes: Counter[str] = Counter()
        latencies: dict[str, list[float]] = defaultdict(list)
        for minute in self.minutes:
            outcomes.update(minute.outcomes)
            for kind, values in minute.latencies.items():
                latencies[kind].extend(values)
            figures.errors += minute.errors
            figures.per_minute.append(minute_record(minute))
        figures.outcomes = dict(sorted(outcomes.items()))
        for kind in KINDS:
            ordered = sorted(latencies[kind])
            figures.p50_ms[kind] = percentile(ordered, 0.50) * 1000
            figures.p99_ms[kind] = percentile(ordered, 0.99) * 1000
            figures.max_ms[kind] = (ordered[-1] if ordered else math.nan) * 1000
        lags = sorted(self.lags)
        figures.lag_p99_ms = percentile(lags, 0.99) * 1000
        figures.lag_max_ms = lags[-1] * 1000 if lags else math.nan
        requests = sum(n for key, n in outcomes.items() if not key.startswith("request"))
        requests += outcomes.get("request 204", 0)
        figures.server_cpu_ms_per_request = server_cpu_s * 1000 / max(1, requests)
        warm_at = 60.0 if figures.minutes >= 2 else self.duration_s / 2
        warm = [rss for at, rss in self.rss_samples if at >= warm_at]
        figures.rss_start_mb = warm[0] if warm else figures.rss_idle_mb
        figures.rss_max_mb = max((rss for _, rss in self.rss_samples), default=0.0)
        figures.rss_drift = figures.rss_end_mb / figures.rss_start_mb - 1


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _pair(values: list[float]) -> str:
    ordered = sorted(values)
    if not ordered:
        return "-"
    return f"{percentile(ordered, 0.5) * 1000:.1f}/{percentile(ordered, 0.99) * 1000:.1f}"


def minute_cells(minute: Minute, postgres: bool) -> list[tuple[str, str]]:
    """(column, value) of one minute's line: counts by expected outcome, p50/p99 from the due
    time per kind, errors, the server's VmRSS and CPU (and how long it waited for a CPU)."""
    o, lat = minute.outcomes, minute.latencies
    cells = [
        ("callbacks", f"{o['callback 200']:,}"),
        ("p50/p99", _pair(lat["callback"])),
        ("creates", f"{o['create 201']:,}"),
        ("p50/p99", _pair(lat["create"])),
        ("hand-outs", f"{o['hand-out 201']:,}"),
        ("p50/p99", _pair(lat["hand-out"])),
        ("claim p50/p99", _pair(lat["claim"])),
        ("confirm p50/p99", _pair(lat["confirm"])),
        ("exit p50/p99", _pair(lat["exit"])),
        ("204s", f"{o['request 204']:,}"),
        ("errors", str(minute.errors)),
        ("VmRSS MB", f"{minute.rss_mb:.1f}"),
        ("server CPU", f"{minute.server_cpu_share:.0%}"),
        ("CPU wait", f"{minute.server_wait_share:.0%}"),
    ]
    if postgres:
        cells.append(("PostgreSQL CPU", f"{minute.postgres_cpu_share:.0%}"))
    return cells


COLUMN_WIDTH = 15


def minute_header(postgres: bool) -> str:
    names = [name for name, _ in minute_cells(Minute(), postgres)]
    return (
        "min "
        + "".join(name.rjust(max(COLUMN_WIDTH, len(name) + 2)) for name in names)
        + "\n    (latencies in ms from the due time; CPU and CPU wait (runnable, no CPU free) in"
        " shares of a core)"
    )


def minute_line(index: int, minute: Minute, postgres: bool) -> str:
    cells = minute_cells(minute, postgres)
    line = f"{index + 1:>3} " + "".join(
        value.rjust(max(COLUMN_WIDTH, len(name) + 2)) for name, value in cells
    )
    unexpected = {
        key: count
        for key, count in minute.outcomes.items()
        if key.split(" ", 1)[1] != str(EXPECTED.get(key.split(" ", 1)[0], 204))
    }
    if unexpected:
        line += f"\n     unexpected outcomes: {unexpected}"
    return line


def minute_record(minute: Minute) -> dict[str, Any]:
    record: dict[str, Any] = {"outcomes": dict(minute.outcomes), "errors": minute.errors}
    for kind in KINDS:
        ordered = sorted(minute.latencies[kind])
        record[f"{kind}_p50_ms"] = percentile(ordered, 0.5) * 1000
        record[f"{kind}_p99_ms"] = percentile(ordered, 0.99) * 1000
    record["rss_mb"] = minute.rss_mb
    record["server_cpu_share"] = minute.server_cpu_share
    record["server_wait_share"] = minute.server_wait_share
    return record


# --------------------------------------------------------------------------------------------
# Audit
# --------------------------------------------------------------------------------------------


def audit_queries(prepared: Prepared) -> dict[str, str]:
    terminal = ", ".join(f"'{state}'" for state in TERMINAL)
    return {
        "callable_success": f"SELECT count(*) FROM jobs WHERE id LIKE '{prepared.callable_prefix}%'"
        " AND state = 'success'",
        "callable_pending": f"SELECT count(*) FROM jobs WHERE id LIKE '{prepared.callable_prefix}%'"
        " AND state = 'pending'",
        "idle_pending": f"SELECT count(*) FROM jobs WHERE id LIKE '{prepared.idle_prefix}%'"
        " AND state = 'pending'",
        "script_jobs": "SELECT count(*) FROM jobs WHERE kind = 'script'",
        "script_success": "SELECT count(*) FROM jobs WHERE kind = 'script' AND state = 'success'",
        "terminal_jobs": f"SELECT count(*) FROM jobs WHERE state IN ({terminal})",
        "terminal_events": f"SELECT count(*) FROM job_events WHERE state IN ({terminal})",
        "jobs_with_two_terminal_events": "SELECT count(*) FROM (SELECT job_id FROM job_events"
        f" WHERE state IN ({terminal}) GROUP BY job_id HAVING count(*) > 1) twice",
    }


def run_audit(db: str | None, data_dir: Path, prepared: Prepared) -> dict[str, int]:
    queries = audit_queries(prepared)
    if db is not None:

        async def counts() -> dict[str, int]:
            import asyncpg

            conn = await asyncpg.connect(db)
            try:
                return {name: int(await conn.fetchval(sql)) for name, sql in queries.items()}
            finally:
                await conn.close()

        return run_async(counts)
    conn = sqlite3.connect(data_dir / "gateway.sqlite3")
    try:
        return {name: int(conn.execute(sql).fetchone()[0]) for name, sql in queries.items()}
    finally:
        conn.close()


def check_audit(audit: dict[str, int], figures: Figures, soak: Soak) -> None:
    """Every accepted call is reflected in the database, and nothing else changed. A call sent
    but not answered (an error already) may or may not have been applied."""

    def between(name: str, low: int, high: int, what: str) -> None:
        fail_if(
            not low <= audit[name] <= high,
            f"{audit[name]} {what}, expected {low} (answered) to {high} (sent)",
        )

    accepted = figures.outcomes.get("callback 200", 0)
    between("callable_success", accepted, soak.sent["callback"], "callable jobs are success")
    fail_if(
        audit["callable_success"] + audit["callable_pending"] != len(soak.prepared.continue_paths),
        "a callable parked job is neither success nor still pending",
    )
    fail_if(
        audit["idle_pending"] != figures.parked,
        f"{figures.parked - audit['idle_pending']} idle parked jobs are no longer pending",
    )
    between("script_jobs", len(soak.created), soak.sent["create"], "script jobs exist")
    between("script_success", len(soak.finished), soak.sent["exit"], "script jobs are success")
    fail_if(audit["jobs_with_two_terminal_events"] != 0, "a job has two terminal events")
    fail_if(
        audit["terminal_events"] != audit["terminal_jobs"],
        f"{audit['terminal_jobs']} terminal jobs but {audit['terminal_events']} terminal events",
    )


# --------------------------------------------------------------------------------------------
# Summary and main
# --------------------------------------------------------------------------------------------


def summary(figures: Figures) -> list[Row]:
    """The table's rows: figure, value, goal, met?"""
    table = Summary()
    info, goal, rows = table.info, table.goal, table.rows

    o = figures.outcomes
    info("callbacks answered 200", f"{o.get('callback 200', 0):,}")
    info(
        "script jobs created / handed out / finished",
        f"{o.get('create 201', 0):,} / {o.get('hand-out 201', 0):,} / {o.get('exit 200', 0):,}",
    )
    info("empty long polls (204)", f"{o.get('request 204', 0):,}")
    goal("errors", str(figures.errors), "0", figures.errors == 0)
    for kind in KINDS:
        info(
            f"{kind} p50 / p99 / max",
            f"{figures.p50_ms[kind]:.1f} / {figures.p99_ms[kind]:.1f}"
            f" / {figures.max_ms[kind]:.1f} ms",
        )
    info(
        "send lag behind the schedule p99 (max)",
        f"{figures.lag_p99_ms:.1f} ms ({figures.lag_max_ms:.0f} ms)",
    )
    info("VmRSS idle before the load", f"{figures.rss_idle_mb:.1f} MB")
    info("VmRSS max sampled / VmHWM", f"{figures.rss_max_mb:.1f} / {figures.hwm_mb:.1f} MB")
    goal(
        "VmRSS after warm-up -> end",
        f"{figures.rss_start_mb:.1f} -> {figures.rss_end_mb:.1f} MB ({figures.rss_drift:+.1%})",
        f"drift <= {GOAL_RSS_DRIFT:.0%}",
        abs(figures.rss_drift) <= GOAL_RSS_DRIFT,
    )
    info(
        "server CPU (share of a core; per request)",
        f"{figures.server_cpu_share:.0%}; {figures.server_cpu_ms_per_request:.2f} ms",
    )
    info(
        "server runnable but waiting for a CPU (share of a core)",
        f"{figures.server_wait_share:.0%}",
    )
    if figures.store == "postgresql":
        info(
            "PostgreSQL CPU, this database's backends (share of a core)",
            f"{figures.postgres_cpu_share:.0%}",
        )
    info("load generator CPU (share of a core)", f"{figures.client_cpu_share:.0%}")
    info("connections opened by the load generator", f"{figures.connections_opened:,}")
    return rows


def goals_met(figures: Figures) -> bool:
    return figures.errors == 0 and abs(figures.rss_drift) <= GOAL_RSS_DRIFT


def run_load(soak: Soak) -> None:
    run_fast(soak.run())


def soak_once(work: Path, db: str | None, figures: Figures) -> tuple[Soak, dict[str, int]]:
    data_dir = work / "gw"
    callbacks = int(figures.minutes * 60 * figures.callbacks_per_s)
    print(
        f"setup: {figures.parked:,} idle parked jobs and {callbacks:,} callable ones ...",
        flush=True,
    )
    started = time.perf_counter()
    prepared = prepare(data_dir, db, figures.parked, callbacks)
    figures.setup_s = time.perf_counter() - started
    everywhere = os.sched_getaffinity(0)
    if figures.pinned:
        os.sched_setaffinity(0, {0})  # the server inherits CPU 0; this process then takes CPU 1
    with running(start_gateway(data_dir, db=db)) as gateway:
        if figures.pinned:
            os.sched_setaffinity(0, {1})
        figures.start_s = gateway.start_s
        print(
            f"  bulk-inserted in {figures.setup_s:.1f} s; gateway serve ready in"
            f" {gateway.start_s:.1f} s at {gateway.url}, VmRSS"
            f" {gateway.memory_kb()['VmRSS'] / 1024:.1f} MB",
            flush=True,
        )
        print(
            f"load: {figures.callbacks_per_s:g} callbacks/s and {figures.hand_outs_per_s:g}"
            f" hand-outs/s ({figures.runners} runners) for {figures.minutes} min, open loop",
            flush=True,
        )
        database = None if db is None else database_name(db)
        soak = Soak(gateway, prepared, figures, database)
        run_load(soak)
    os.sched_setaffinity(0, everywhere)
    audit = run_audit(db, data_dir, prepared)
    return soak, audit


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=10, help="length of the load (10)")
    parser.add_argument("--parked", type=int, default=100_000, help="idle parked jobs (100000)")
    parser.add_argument("--callbacks-per-s", type=float, default=200.0, help="(200)")
    parser.add_argument("--hand-outs-per-s", type=float, default=50.0, help="(50)")
    parser.add_argument(
        "--runners", type=int, default=RUNNERS, help=f"runners in long polls ({RUNNERS})"
    )
    parser.add_argument(
        "--db",
        metavar="POSTGRESQL_URL",
        help="soak on PostgreSQL: a fresh database is made (and dropped) on this server",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="diagnostic: the server on CPU 0, the load generator on CPU 1 (bench/callbacks.py)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.minutes < 1 or args.runners < 1:
        parser.error("--minutes and --runners are 1 at least")
    if args.db is not None and not is_postgres_url(args.db):
        parser.error("--db takes a postgresql:// URL (SQLite is the default)")
    figures = Figures(
        store="sqlite" if args.db is None else "postgresql",
        minutes=args.minutes,
        parked=args.parked,
        callbacks_per_s=args.callbacks_per_s,
        hand_outs_per_s=args.hand_outs_per_s,
        runners=args.runners,
        pinned=args.pin,
    )
    print(
        f"bench/soak.py: {figures.store}, {figures.parked:,} parked, {figures.minutes} min of"
        f" {figures.callbacks_per_s:g} callbacks/s + {figures.hand_outs_per_s:g} hand-outs/s;"
        f" {run_context()}",
        flush=True,
    )
    started = time.perf_counter()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp,
            contextlib.ExitStack() as stack,
        ):
            db = None if args.db is None else stack.enter_context(postgres_database(args.db))
            soak, audit = soak_once(Path(tmp), db, figures)
        figures.audit = audit
        print(f"audit: {audit}")
        check_audit(audit, figures, soak)
    except (BenchError, HarnessError) as exc:
        print(f"bench/soak.py: CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    print_table(summary(figures))
    if figures.lag_p99_ms > WARN_LAG_P99_MS:
        print(
            f"\nnote: the load generator sent late (p99 {figures.lag_p99_ms:.0f} ms behind its"
            " schedule: it was short of CPU); latencies count from the due time, so they include"
            " that lag"
        )
    if figures.error_samples:
        print(f"\nfirst errors: {figures.error_samples}")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.json:
        record = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": describe_checkout()}
        args.json.write_text(json.dumps({**record, **asdict(figures)}, indent=2))
    if not goals_met(figures):
        print("bench/soak.py: a goal was missed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
