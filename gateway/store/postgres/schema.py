"""The PostgreSQL schema: the numbered migrations in `migrations/postgres/` (the same numbers as
SQLite's, in PostgreSQL's dialect), applied under an advisory lock so replicas starting
together take turns."""

from __future__ import annotations

from importlib import resources

import asyncpg

from gateway.errors import StoreError

# Per schema: tests (and tenants) with their own `search_path` migrate independently.
_LOCK = "SELECT pg_advisory_lock(hashtext('gateway.migrate:' || current_schema()))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtext('gateway.migrate:' || current_schema()))"


def migrations() -> list[tuple[int, str]]:
    """(version, SQL) of every migration file, in order."""
    folder = resources.files("gateway.store") / "migrations" / "postgres"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection, upto: int | None = None) -> int:
    """Apply the numbered migrations not yet applied (up to `upto`), each in its own
    transaction, holding the advisory lock throughout; return the version reached.

    Raises StoreError when the database is newer than every migration this code knows, or when
    the connection's `search_path` names no existing schema."""
    if await conn.fetchval("SELECT current_schema()") is None:
        raise StoreError("the search_path names no existing schema; create it first")
    await conn.execute(_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        known = migrations()
        newest = known[-1][0] if known else 0
        if current > newest:
            raise StoreError(
                f"the database schema is version {current}, newer than this gateway knows"
                f" ({newest}); upgrade the gateway"
            )
        for version, sql in known:
            if version <= current or (upto is not None and version > upto):
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            current = version
        return int(current)
    finally:
        await conn.execute(_UNLOCK)
