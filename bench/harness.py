"""The one module that starts gateway processes for the benchmarks and the multi-replica tests.

    with Cluster(work, replicas=2, db=dsn) as cluster:     # N `gateway serve` on one database
        cluster.kill(1)                                      # kill -9 one replica
        cluster.restart(1)                                   # start it again on a new port

    with postgres_database(server_dsn) as dsn:               # a fresh database, dropped after
        gateway = start_gateway(work / "gw", db=dsn)

    receiver = Receiver(); url = receiver.start(work / "received.jsonl", fail_rate=0.1)

Everything listens on 127.0.0.1 only, every wait is a poll with a deadline, and a start that
fails raises HarnessError with the tail of the process's log. Importable as `bench.harness` from
the repository root (the tests) and as `harness` from a script in bench/ (the benchmarks).
`python bench/harness.py receive --path P` runs the webhook receiver (what `Receiver` starts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")
S = TypeVar("S", bound="Server")

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

SECRET_KEY = "bench-secret-key-0123456789abcdef0123456789"
ADMIN_TOKEN = "gw_bench-admin-token-0123456789abcdef"
WEBHOOK_SECRET = "whsec_YmVuY2gtd2ViaG9vay1zZWNyZXQtMDEyMzQ1Njc4OWFi"  # base64 of 32 bytes
LOOPBACK_NETS = "127.0.0.0/8"

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 40.0  # graceful: long polls are released at once, open requests finish
KILL_TIMEOUT_S = 10.0
POLL_S = 0.02
LOG_TAIL_CHARS = 4000

_LISTENING = re.compile(r"listening on (http://\S+)")


class HarnessError(Exception):
    """A process did not start (or a database could not be made); the message has its log."""


class BenchError(Exception):
    """A correctness check failed: the figures of this run mean nothing."""


def fail_if(condition: bool, message: str) -> None:
    if condition:
        raise BenchError(message)


Row = tuple[str, str, str, str]
"""A line of a benchmark's summary table: figure, value, goal, met?"""


class Summary:
    """A benchmark's summary table, a row at a time: `info` for a figure with no goal, `goal`
    for one measured against its goal."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def info(self, figure: str, value: str) -> None:
        self.rows.append((figure, value, "-", "-"))

    def goal(self, figure: str, value: str, target: str, met: bool) -> None:
        self.rows.append((figure, value, target, "yes" if met else "NO"))


def print_table(
    rows: Sequence[Sequence[str]], header: Sequence[str] = ("figure", "value", "goal", "met?")
) -> None:
    """A table in aligned columns (a summary's by default), after a blank line."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server that needs it named)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def describe_checkout() -> str:
    """The commit measured, and whether the work tree differs from it (`git describe --dirty`)."""
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "(not a git checkout)"


def run_context() -> str:
    """`N CPUs; <date>; code <commit>`: how a benchmark's first line ends."""
    return (
        f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M %Z')}; code {describe_checkout()}"
    )


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (NaN when it is empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a live process, in kB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


_BACKEND_TITLE = re.compile(r"^postgres: (?:[^:]+: )?\S+ (\S+) (?:\S+\(\d+\)|\[local\])")


def postgres_cpu_s(databases: Collection[str] | None = None) -> float:
    """User + system CPU seconds so far of the processes named `postgres` on this machine: the
    server's own (WAL writer, checkpointer...) and, when `databases` is given, only the client
    backends connected to one of them (their process title names the database), so work on
    other databases (another run, the tests) stays out. A backend that exits between two
    readings takes its share with it, so read this around work done on open pools."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            backend = _BACKEND_TITLE.match(title)
            if databases is not None and backend and backend.group(1) not in databases:
                continue
            total += process_cpu_s(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return total


def database_name(dsn: str) -> str:
    """The database a `postgresql://` URL names."""
    return urlsplit(dsn).path.lstrip("/")


def _log_tail(path: Path, offset: int = 0) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return text[-LOG_TAIL_CHARS:]


def end_process(
    process: subprocess.Popen[bytes], graceful: bool, *, signalled: bool = False
) -> None:
    """SIGTERM (unless `signalled` already: a second one would cut uvicorn's graceful shutdown
    short) and wait with a deadline when `graceful`, then SIGKILL; always reaped on return."""
    if process.poll() is None and graceful:
        if not signalled:
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_TIMEOUT_S)
    if process.poll() is None:
        process.kill()
    process.wait(timeout=KILL_TIMEOUT_S)


def _clean_environ() -> dict[str, str]:
    """This process's environment without `GATEWAY_*` (a developer's settings must not leak
    into a measured gateway; callers pass what they mean)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}


def start_process(
    command: Sequence[str],
    log_path: Path,
    env: dict[str, str],
    *,
    ready_path: str | None = "/readyz",
    timeout_s: float = START_TIMEOUT_S,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server whose output (appended to `log_path`) says `listening on URL`; poll for
    that line, then for `ready_path` answering 200, both within `timeout_s`. Returns the process
    and its URL; on failure kills it and raises HarnessError with the log since this start."""
    import httpx

    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
    deadline = time.monotonic() + timeout_s

    name = " ".join(Path(part).name for part in command[1:4])

    def fail(why: str) -> HarnessError:
        end_process(process, graceful=False)
        return HarnessError(f"{why}; its log:\n{_log_tail(log_path, offset)}")

    url = None
    while url is None:
        match = _LISTENING.search(_log_tail(log_path, offset))
        if match:
            url = match.group(1)
        elif process.poll() is not None:
            raise fail(f"{name} exited with {process.returncode} before listening")
        elif time.monotonic() > deadline:
            raise fail(f"{name} did not say where it listens within {timeout_s:g} s")
        else:
            time.sleep(POLL_S)  # polling with a deadline
    if ready_path is None:
        return process, url
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                return process, url
        if process.poll() is not None:
            raise fail(f"{url} exited with {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise fail(f"{url}{ready_path} did not answer 200 within {timeout_s:g} s")
        time.sleep(POLL_S)  # polling with a deadline


# --------------------------------------------------------------------------------------------
# One gateway
# --------------------------------------------------------------------------------------------


@dataclass
class Server:
    """One server subprocess on loopback (a gateway, a raw ceiling app). A context manager:
    `stop()` on exit."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    start_s: float = 0.0
    """Seconds from the start of the process until it was ready."""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    @property
    def host_header(self) -> str:
        return urlsplit(self.url).netloc

    def alive(self) -> bool:
        return self.process.poll() is None

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process (all its threads) so far."""
        return process_cpu_s(self.process.pid)

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM, in kB."""
        return process_memory_kb(self.process.pid)

    def log(self) -> str:
        return _log_tail(self.log_path)

    def kill(self) -> None:
        """SIGKILL (no shutdown at all: a crash) and reap."""
        end_process(self.process, graceful=False)

    def stop(self) -> None:
        """SIGTERM and wait for the graceful shutdown; SIGKILL after a deadline."""
        end_process(self.process, graceful=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class Gateway(Server):
    """One `gateway serve` subprocess."""

    data_dir: Path | None = None


def start_server(
    command: Sequence[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    *,
    ready_path: str | None = "/readyz",
    timeout_s: float = START_TIMEOUT_S,
) -> Server:
    """`start_process` as a Server (env: this environment without `GATEWAY_*` by default)."""
    started = time.perf_counter()
    process, url = start_process(
        command,
        log_path,
        _clean_environ() if env is None else env,
        ready_path=ready_path,
        timeout_s=timeout_s,
    )
    return Server(url, process, log_path, time.perf_counter() - started)


def gateway_environ(
    data_dir: Path,
    *,
    db: str | None = None,
    env: dict[str, str] | None = None,
    secret_key: str = SECRET_KEY,
    admin_token: str = ADMIN_TOKEN,
    webhook_secret: str = WEBHOOK_SECRET,
    public_url: str | None = None,
    allow_loopback_webhooks: bool = True,
) -> dict[str, str]:
    """The environment `start_gateway` gives `gateway serve`."""
    environ = _clean_environ()
    environ.update(
        GATEWAY_DATA_DIR=str(data_dir),
        GATEWAY_SECRET_KEY=secret_key,
        GATEWAY_ADMIN_TOKEN=admin_token,
        GATEWAY_WEBHOOK_SECRET=webhook_secret,
    )
    if db is not None:
        environ["GATEWAY_DB"] = db
    if public_url is not None:
        environ["GATEWAY_PUBLIC_URL"] = public_url
    if allow_loopback_webhooks:
        environ["GATEWAY_WEBHOOK_ALLOW_NETS"] = LOOPBACK_NETS
    environ.update(env or {})
    return environ


def start_gateway(
    data_dir: Path,
    *,
    db: str | None = None,
    env: dict[str, str] | None = None,
    secret_key: str = SECRET_KEY,
    admin_token: str = ADMIN_TOKEN,
    webhook_secret: str = WEBHOOK_SECRET,
    public_url: str | None = None,
    allow_loopback_webhooks: bool = True,
    log_path: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Gateway:
    """`python -m gateway serve --port 0` on 127.0.0.1 with `data_dir` (and `db`, a
    `postgresql://` or `sqlite:///` URL, when given); returns once /readyz answers 200. Its
    output is appended to `log_path` (default: `<data_dir>-serve.log` beside the data dir, so a
    restart on the same data dir adds to the same log). Raises HarnessError with the log."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or data_dir.parent / f"{data_dir.name}-serve.log"
    environ = gateway_environ(
        data_dir,
        db=db,
        env=env,
        secret_key=secret_key,
        admin_token=admin_token,
        webhook_secret=webhook_secret,
        public_url=public_url,
        allow_loopback_webhooks=allow_loopback_webhooks,
    )
    command = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", "0"]
    started = time.perf_counter()
    process, url = start_process(command, log_path, environ, timeout_s=timeout_s)
    return Gateway(url, process, log_path, time.perf_counter() - started, data_dir)


@contextlib.contextmanager
def running(server: S) -> Iterator[S]:
    """`with running(start_gateway(...)) as gateway:` stops it on the way out."""
    try:
        yield server
    finally:
        server.stop()


def with_host(url: str, base_url: str) -> str:
    """`url` (a continue URL, say) with the scheme and host:port of `base_url` (a replica)."""
    parts, base = urlsplit(url), urlsplit(base_url)
    return urlunsplit((base.scheme, base.netloc, parts.path, parts.query, parts.fragment))


# --------------------------------------------------------------------------------------------
# N replicas on one database
# --------------------------------------------------------------------------------------------


class Cluster:
    """N `gateway serve` replicas of one gateway on one database. Every replica shares the
    secret key, webhook secret, admin token, database and `GATEWAY_PUBLIC_URL` (replica 0's URL
    at the first start: a continue URL works on every replica, so callers swap the host with
    `with_host` for the replica they want to hit). Several replicas need a PostgreSQL `db`;
    one replica may run on the embedded SQLite store. A context manager: `start()` on entry,
    `stop()` on exit."""

    def __init__(
        self,
        work: Path,
        *,
        replicas: int,
        db: str | None = None,
        env: dict[str, str] | None = None,
        secret_key: str = SECRET_KEY,
        admin_token: str = ADMIN_TOKEN,
        webhook_secret: str = WEBHOOK_SECRET,
        allow_loopback_webhooks: bool = True,
    ) -> None:
        if replicas < 1:
            raise ValueError("a cluster has one replica at least")
        if replicas > 1 and not is_postgres_url(db):
            raise HarnessError("several replicas need a PostgreSQL database (db=postgresql://...)")
        self.work = work
        self.replicas = replicas
        self.db = db
        self.env = dict(env or {})
        self.secret_key = secret_key
        self.admin_token = admin_token
        self.webhook_secret = webhook_secret
        self.allow_loopback_webhooks = allow_loopback_webhooks
        self.public_url: str | None = None
        self.gateways: list[Gateway] = []

    @property
    def urls(self) -> list[str]:
        return [gateway.url for gateway in self.gateways]

    def data_dir(self, index: int) -> Path:
        return self.work / f"replica-{index}"

    def _start_one(self, index: int) -> Gateway:
        gateway = start_gateway(
            self.data_dir(index),
            db=self.db,
            env=self.env,
            secret_key=self.secret_key,
            admin_token=self.admin_token,
            webhook_secret=self.webhook_secret,
            public_url=self.public_url,
            allow_loopback_webhooks=self.allow_loopback_webhooks,
        )
        if self.public_url is None:
            self.public_url = gateway.url
        return gateway

    def start(self) -> None:
        """Start every replica, one after the other (the first one migrates the database)."""
        if self.gateways:
            raise HarnessError("the cluster is started already")
        try:
            for index in range(self.replicas):
                self.gateways.append(self._start_one(index))
        except BaseException:
            self.stop()
            raise

    def kill(self, index: int) -> None:
        """kill -9 replica `index` (it is left dead until `restart`)."""
        self.gateways[index].kill()

    def restart(self, index: int) -> Gateway:
        """Start replica `index` again (same data dir and database, a new port); kills it first
        if it is still running."""
        self.gateways[index].kill()
        self.gateways[index] = self._start_one(index)
        return self.gateways[index]

    def stop(self) -> None:
        """SIGTERM every replica at once, then wait for each (SIGKILL after a deadline)."""
        for gateway in self.gateways:
            if gateway.alive():
                gateway.process.send_signal(signal.SIGTERM)
        for gateway in self.gateways:
            end_process(gateway.process, graceful=True, signalled=True)

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


def is_postgres_url(url: str | None) -> bool:
    return url is not None and url.startswith(("postgresql://", "postgres://"))


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a fresh event loop in a thread of its own, so it works
    whether or not the caller is inside an event loop."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        async def main() -> T:
            return await make()

        try:
            outcome["value"] = asyncio.run(main())
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="harness-async")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a new event loop: uvloop's when it is installed (the load
    generators and receivers run on it), asyncio's own else."""
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)


def database_dsn(dsn: str, database: str) -> str:
    """`dsn` naming `database` instead (same server, user and options)."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


@contextlib.contextmanager
def postgres_database(dsn: str) -> Iterator[str]:
    """CREATE DATABASE gw_<random> on the server of `dsn` (connecting as `dsn` says), yield its
    DSN, and DROP it (WITH (FORCE): a killed replica's connections must not keep it) after."""
    import asyncpg

    name = f"gw_{secrets.token_hex(6)}"

    async def execute(statement: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    try:
        run_async(lambda: execute(f"CREATE DATABASE {name}"))
    except (OSError, asyncpg.PostgresError) as exc:
        raise HarnessError(f"could not create a database on {urlsplit(dsn).netloc}: {exc}") from exc
    try:
        yield database_dsn(dsn, name)
    finally:
        run_async(lambda: execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# --------------------------------------------------------------------------------------------
# A webhook receiver in its own process
# --------------------------------------------------------------------------------------------


class Receiver:
    """A loopback webhook receiver in its own process (so it outlives any gateway kill). It
    records every request as one JSON line in a file (`path`, `status`, `at` (epoch seconds),
    `webhook-id`, `webhook-timestamp`, `webhook-signature`, `body` as text), written and
    flushed before it answers; answers 200, or 500 with probability `fail_rate` (a seeded
    random sequence)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.path: Path | None = None
        self.url = ""

    def start(self, path: Path, *, fail_rate: float = 0.0, seed: int = 0) -> str:
        """Start it recording into `path` (created or appended to); its URL."""
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError("fail_rate is a probability")
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        command = [sys.executable, str(Path(__file__).resolve()), "receive", "--path", str(path)]
        command += ["--fail-rate", repr(fail_rate), "--seed", str(seed)]
        log_path = path.with_name(path.name + ".log")
        self.process, self.url = start_process(
            command, log_path, _clean_environ(), ready_path=None, timeout_s=30
        )
        return self.url

    def records(self) -> list[dict[str, Any]]:
        """Every request recorded so far, in arrival order."""
        if self.path is None or not self.path.exists():
            return []
        found = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line being written right now
                found.append(json.loads(line))
        return found

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process, graceful=True)

    def __enter__(self) -> Receiver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_RECORDED_HEADERS = (b"webhook-id", b"webhook-timestamp", b"webhook-signature")


def _receiver_app(path: Path, fail_rate: float, seed: int) -> Any:
    """The receiver's ASGI app: record, flush, answer."""
    rng = random.Random(seed)
    sink = path.open("a", encoding="utf-8")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        status = 500 if rng.random() < fail_rate else 200
        headers = dict(scope["headers"])
        record: dict[str, Any] = {"path": scope["path"], "status": status, "at": time.time()}
        for name in _RECORDED_HEADERS:
            value = headers.get(name)
            record[name.decode()] = None if value is None else value.decode("latin-1")
        record["body"] = b"".join(chunks).decode("utf-8", errors="replace")
        sink.write(json.dumps(record) + "\n")
        sink.flush()
        answer = b"ok" if status == 200 else b"planned failure"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", b"%d" % len(answer)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    return app


def _receive_main(argv: Sequence[str]) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description="the harness's webhook receiver")
    parser.add_argument("--path", type=Path, required=True)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    app = _receiver_app(args.path, args.fail_rate, args.seed)
    print(f"receiver listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["receive"]:
        sys.exit(_receive_main(sys.argv[2:]))
    sys.exit("usage: python bench/harness.py receive --path FILE [--fail-rate P] [--seed N]")
