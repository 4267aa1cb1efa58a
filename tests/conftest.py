"""Fixtures shared by every tier: a manual clock, settings in a temp dir, the real app over
httpx's ASGI transport with its lifespan running, and a real `gateway serve` process.

`settings` (and so `app`, `client`, `anon`) is parametrized over both stores: SQLite, and
PostgreSQL when GATEWAY_TEST_POSTGRES_DSN is set (each test on an empty schema of its own)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.clock import ManualClock
from gateway.config import Settings
from gateway.store.postgres.bridge import to_postgres

ADMIN_TOKEN = "gw_test-admin-token-0123456789abcdef"
SECRET_KEY = "test-secret-key-0123456789abcdef"
BASE_URL = "http://gateway.test"
POSTGRES_DSN_VARIABLE = "GATEWAY_TEST_POSTGRES_DSN"
POSTGRES_HOWTO = (
    f"PostgreSQL tests are off; enable them with"
    f" {POSTGRES_DSN_VARIABLE}=postgresql://postgres@127.0.0.1:5432/test"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sqlite_only: reads the SQLite file itself; not run against PostgreSQL"
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@dataclass
class Schemas:
    """PostgreSQL schemas made for tests: all of them, and those free for the next test."""

    made: list[str]
    spare: list[str]


@pytest.fixture(scope="session")
def postgres_schemas() -> Iterator[Schemas]:
    """Each test's schema is migrated by its app, then emptied and handed to the next test
    (far quicker than migrating a new one per test); all are dropped when the session ends."""
    schemas = Schemas(made=[], spare=[])
    yield schemas
    dsn = os.environ.get(POSTGRES_DSN_VARIABLE)
    made = schemas.made
    if dsn and made:

        async def drop() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                for schema in made:
                    await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            finally:
                await conn.close()

        asyncio.run(drop())


async def _empty_schema(conn: asyncpg.Connection, schema: str) -> None:
    """Delete every row (children before the tables they reference) and restart the identities:
    the schema is as a fresh migration leaves it."""
    tables = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = $1"
        " AND tablename <> 'schema_migrations'",
        schema,
    )
    references = await conn.fetch(
        "SELECT child.relname, parent.relname FROM pg_constraint AS k"
        " JOIN pg_class AS child ON child.oid = k.conrelid"
        " JOIN pg_class AS parent ON parent.oid = k.confrelid"
        " WHERE k.contype = 'f' AND k.connamespace = $1::regnamespace",
        schema,
    )
    order: TopologicalSorter[str] = TopologicalSorter({row[0]: set() for row in tables})
    for child, parent in references:
        if child != parent:
            order.add(parent, child)
    sequences = await conn.fetch(
        "SELECT sequencename FROM pg_sequences WHERE schemaname = $1", schema
    )
    statements = [f'DELETE FROM {schema}."{table}"' for table in order.static_order()]
    statements += [f'ALTER SEQUENCE {schema}."{row[0]}" RESTART' for row in sequences]
    if statements:
        await conn.execute("; ".join(statements))


@pytest.fixture(params=["sqlite", "postgres"])
async def database(
    request: pytest.FixtureRequest, postgres_schemas: Schemas
) -> AsyncIterator[str | None]:
    """The `db` URL of the store under test: None (SQLite in the data dir), or a PostgreSQL
    URL whose `search_path` is a schema no other test uses meanwhile, empty at the start."""
    if request.param == "sqlite":
        yield None
        return
    dsn = os.environ.get(POSTGRES_DSN_VARIABLE)
    if not dsn:
        pytest.skip(POSTGRES_HOWTO)
    if request.node.get_closest_marker("sqlite_only"):
        pytest.skip("reads the SQLite file itself")
    if postgres_schemas.spare:
        schema = postgres_schemas.spare.pop()
    else:
        schema = f"t_{secrets.token_hex(8)}"
        postgres_schemas.made.append(schema)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"CREATE SCHEMA {schema}")
        finally:
            await conn.close()
    # asyncpg passes unknown URL parameters on as session settings
    yield f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"
    conn = await asyncpg.connect(dsn)
    try:
        await _empty_schema(conn, schema)
    finally:
        await conn.close()
    postgres_schemas.spare.append(schema)


@pytest.fixture
def settings(tmp_path: Path, database: str | None) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        db=database,
        admin_token=ADMIN_TOKEN,
        secret_key=SECRET_KEY,
        public_url=BASE_URL,
    )


@pytest.fixture
async def app(settings: Settings, clock: ManualClock) -> AsyncIterator[Starlette]:
    """The real app on a real store (see `database`); the sweeper is driven by hand (`sweep`)."""
    application = create_app(settings, clock=clock, run_sweeper=False)
    async with application.router.lifespan_context(application):
        yield application


def api_client(app: Starlette, token: str = ADMIN_TOKEN) -> httpx.AsyncClient:
    """A client of `app` (its lifespan run elsewhere) sending `token`, the admin's by default."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url=BASE_URL,
        headers={"Authorization": f"Bearer {token}"},
    )


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """An admin-authenticated client of the app."""
    async with api_client(app) as http:
        yield http


@pytest.fixture
async def anon(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A client without credentials (what an external system calling a continue URL is)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        yield http


def read_db(settings: Settings, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of `sql` (`?` placeholders) read straight from the test's database, whichever store
    it is: for assertions on what is stored, beside what the API shows."""
    dsn = settings.postgres_dsn
    if dsn is None:
        with closing(sqlite3.connect(settings.sqlite_path)) as conn:
            return conn.execute(sql, params).fetchall()

    async def fetch() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [tuple(row) for row in await conn.fetch(to_postgres(sql), *params)]
        finally:
            await conn.close()

    # The test's own loop is running in this thread: the query gets a loop of its own.
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, fetch()).result()


async def sweep(app: Starlette) -> int:
    """Run one sweep now (at the manual clock's time); returns how many jobs it failed."""
    count: int = await app.state.sweeper.sweep_once()
    return count


async def create_job(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    """Create a job (external by default) and return its JSON, asserting 201."""
    body = {"name": "deploy", **fields}
    response = await client.post("/api/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def continue_path(job: dict[str, Any]) -> str:
    """The path part of a job's continue URL (for clients with BASE_URL)."""
    url: str = job["continue_url"]
    return url.removeprefix(BASE_URL)


@dataclass
class ServerProcess:
    """A real `gateway serve` subprocess."""

    proc: subprocess.Popen[str]
    url: str
    data_dir: Path
    token: str
    output: list[str]

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )


def start_server(data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `gateway serve` on a free loopback port and wait (with a deadline) until it
    answers /readyz. The admin token is whatever the data dir holds (generated on first start)."""
    full_env = {**os.environ, "GATEWAY_SECRET_KEY": SECRET_KEY, **(env or {})}
    full_env.pop("GATEWAY_ADMIN_TOKEN", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
    )
    assert proc.stdout is not None
    output: list[str] = []
    url = None
    deadline = time.monotonic() + 20
    while url is None:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("gateway serve exited early:\n" + "".join(output))
        output.append(line)
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            url = match.group(1)
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("gateway serve did not start:\n" + "".join(output))
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # polling with a deadline, not synchronisation by sleep
    else:
        proc.kill()
        raise RuntimeError("gateway serve never became ready")
    token = (data_dir / "admin-token").read_text().strip()
    return ServerProcess(proc=proc, url=url, data_dir=data_dir, token=token, output=output)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    """Start servers on demand (same data dir by default); all are killed at the end."""
    started: list[ServerProcess] = []

    def start(
        *extra: str, data_dir: Path | None = None, env: dict[str, str] | None = None
    ) -> ServerProcess:
        server = start_server(data_dir or tmp_path / "data", *extra, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=10)
        if server.proc.stdout:
            server.proc.stdout.close()
