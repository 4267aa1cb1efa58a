"""The SQLite schema: connection pragmas and the numbered migrations in `migrations/sqlite/`."""

from __future__ import annotations

import sqlite3
from importlib import resources

from gateway.errors import StoreError


def configure(conn: sqlite3.Connection) -> None:
    """The pragmas every connection of ours uses (WAL: readers never block the writer)."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")


def migrations() -> list[tuple[int, str]]:
    """(version, SQL) of every migration file, in order."""
    folder = resources.files("gateway.store") / "migrations" / "sqlite"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text()))
    return sorted(found)


def migrate(conn: sqlite3.Connection, upto: int | None = None) -> int:
    """Apply the numbered migrations not yet applied (up to `upto`); return the version reached.

    Raises StoreError when the database is newer than every migration this code knows."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
        " applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
    )
    current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
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
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in sql.split(";\n"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        current = version
    return int(current)
