"""PostgreSQL migrations: the same numbered migrations as SQLite giving the same tables and
columns, `gateway migrate` applying them once, replicas starting together, and a schema newer
than the code refused. Runs when GATEWAY_TEST_POSTGRES_DSN is set."""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import closing
from importlib import resources
from pathlib import Path

import asyncpg
import pytest

from gateway.errors import StoreError
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import configure, migrate
from tests.conftest import POSTGRES_DSN_VARIABLE, POSTGRES_HOWTO

FUTURE_VERSION = 9999


@pytest.fixture
async def schema_url() -> AsyncIterator[tuple[str, str]]:
    """(URL, schema): a new empty schema, dropped afterwards."""
    dsn = os.environ.get(POSTGRES_DSN_VARIABLE)
    if not dsn:
        pytest.skip(POSTGRES_HOWTO)
    schema = f"m_{secrets.token_hex(8)}"
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}", schema
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


def _versions(dialect: str) -> list[int]:
    folder = resources.files("gateway.store") / "migrations" / dialect
    return sorted(int(e.name.split("_", 1)[0]) for e in folder.iterdir() if e.name.endswith(".sql"))


def _sqlite_columns(tmp_path: Path) -> dict[str, list[str]]:
    with closing(sqlite3.connect(tmp_path / "reference.sqlite3", isolation_level=None)) as conn:
        configure(conn)
        migrate(conn)
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {t: sorted(r[1] for r in conn.execute(f"PRAGMA table_info({t})")) for t in tables}


async def _postgres_columns(url: str, schema: str) -> dict[str, list[str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = $1",
            schema,
        )
    finally:
        await conn.close()
    columns: dict[str, list[str]] = {}
    for table, column in rows:
        columns.setdefault(table, []).append(column)
    return {table: sorted(names) for table, names in columns.items()}


async def _applied_versions(url: str) -> list[int]:
    """The versions schema_migrations records, in order."""
    conn = await asyncpg.connect(url)
    try:
        return sorted(row[0] for row in await conn.fetch("SELECT version FROM schema_migrations"))
    finally:
        await conn.close()


def _gateway_migrate(url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "migrate", "--db", url, "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_both_dialects_have_the_same_numbered_migrations() -> None:
    """Every SQLite migration has its PostgreSQL twin, and no more."""
    assert _versions("postgres") == _versions("sqlite")


async def test_gateway_migrate_builds_the_sqlite_schema_once(
    schema_url: tuple[str, str], tmp_path: Path
) -> None:
    """`gateway migrate --db postgresql://...` applies every migration, giving the tables and
    columns SQLite's migrations give; a second run applies nothing and still exits 0."""
    url, schema = schema_url
    first = await asyncio.to_thread(_gateway_migrate, url, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "up to date" in first.stdout
    columns = await _postgres_columns(url, schema)
    applied = columns.pop("schema_migrations")
    assert applied == ["applied_at", "version"]
    expected = _sqlite_columns(tmp_path)
    expected.pop("schema_migrations")
    assert columns == expected
    again = await asyncio.to_thread(_gateway_migrate, url, tmp_path)
    assert again.returncode == 0, again.stderr
    assert await _applied_versions(url) == _versions("postgres")


async def test_replicas_starting_together_migrate_once(schema_url: tuple[str, str]) -> None:
    """Three stores opening at once on an empty schema all open (the advisory lock makes them
    take turns) and each migration is recorded once."""
    url, _ = schema_url
    stores = [PostgresStore(url) for _ in range(3)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        for store in stores:
            await store.ping()
    finally:
        for store in stores:
            await store.close()
    assert await _applied_versions(url) == _versions("postgres")


async def test_a_schema_newer_than_the_code_is_refused(
    schema_url: tuple[str, str], tmp_path: Path
) -> None:
    """A database a newer gateway migrated: the store refuses to open, naming both versions, and
    `gateway migrate` exits 1 saying why."""
    url, _ = schema_url
    store = PostgresStore(url)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", FUTURE_VERSION)
    finally:
        await conn.close()
    refused = PostgresStore(url)
    with pytest.raises(StoreError, match="newer") as error:
        await refused.open()
    assert str(_versions("postgres")[-1]) in str(error.value)
    result = await asyncio.to_thread(_gateway_migrate, url, tmp_path)
    assert result.returncode == 1
    assert str(FUTURE_VERSION) in result.stderr
