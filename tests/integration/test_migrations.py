"""SQLite migrations: step by step equals all at once, re-running is a no-op, and a schema newer
than the code is refused (by the store and by `gateway serve`)."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import StoreError
from gateway.store.sqlite import SQLiteStore, configure, migrate
from tests.conftest import SECRET_KEY

FUTURE_VERSION = 9999

# Realistic values for NOT NULL columns whose meaning a later migration might rely on.
_KNOWN_VALUES: dict[str, Any] = {
    "state": "pending",
    "kind": "script",
    "scope": "admin",
    "spec": "{}",
    "tags": "[]",
    "cause": "created",
    "description": "",
    "is_async": 0,
    "attempt": 1,
    "run_untagged": 1,
    "canceled": 0,
}


def _versions() -> list[int]:
    folder = resources.files("gateway.store") / "migrations" / "sqlite"
    return sorted(
        int(entry.name.split("_", 1)[0])
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    configure(conn)
    return conn


@pytest.fixture
def connect(tmp_path: Path) -> Iterator[Any]:
    """Open SQLite connections configured as the store's are; all closed at the end."""
    opened: list[sqlite3.Connection] = []

    def open_db(name: str) -> sqlite3.Connection:
        conn = _connect(tmp_path / name)
        opened.append(conn)
        return conn

    yield open_db
    for conn in opened:
        conn.close()


def _normalize(sql: str | None) -> str | None:
    return None if sql is None else re.sub(r"\s+", " ", sql).strip()


def _schema(conn: sqlite3.Connection) -> dict[str, Any]:
    """Everything that makes up the schema, in a comparable form."""
    master = sorted(
        (kind, name, table, _normalize(sql))
        for kind, name, table, sql in conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master"
        )
    )
    tables = [row[1] for row in master if row[0] == "table"]
    details = {}
    for table in tables:
        indexes = conn.execute(f"PRAGMA index_list('{table}')").fetchall()
        details[table] = {
            "columns": conn.execute(f"PRAGMA table_xinfo('{table}')").fetchall(),
            "foreign_keys": conn.execute(f"PRAGMA foreign_key_list('{table}')").fetchall(),
            "indexes": sorted(
                (
                    name,
                    unique,
                    origin,
                    partial,
                    conn.execute(f"PRAGMA index_xinfo('{name}')").fetchall(),
                )
                for _, name, unique, origin, partial in indexes
            ),
        }
    return {"master": master, "tables": details}


def _applied(conn: sqlite3.Connection) -> list[int]:
    return [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def _user_tables(conn: sqlite3.Connection) -> list[str]:
    return [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " AND name != 'schema_migrations' ORDER BY rowid"
        )
    ]


def _value(table: str, column: str, declared: str, step: int) -> Any:
    if column in _KNOWN_VALUES:
        return _KNOWN_VALUES[column]
    affinity = declared.upper()
    if "INT" in affinity:
        return step
    if any(word in affinity for word in ("REAL", "FLOA", "DOUB")):
        return 1_800_000_000.0 + step
    if "BLOB" in affinity or not affinity:
        return f"{table}.{column}.{step}".encode()
    return f"{table}.{column}.{step}"


def _insert_rows(conn: sqlite3.Connection, step: int) -> dict[str, int]:
    """Insert one row into every table where a plausible row can be made (required columns
    filled, foreign keys pointing at rows inserted before); return the tables written."""
    written: dict[str, int] = {}
    for table in _user_tables(conn):
        references = {
            fk[3]: (fk[2], fk[4]) for fk in conn.execute(f"PRAGMA foreign_key_list('{table}')")
        }
        row: dict[str, Any] = {}
        possible = True
        for _, column, declared, notnull, default, pk in conn.execute(
            f"PRAGMA table_info('{table}')"
        ):
            if column in references:
                if not notnull:
                    continue
                target, target_column = references[column]
                found = conn.execute(
                    f'SELECT "{target_column or "rowid"}" FROM "{target}" LIMIT 1'
                ).fetchone()
                if found is None:
                    possible = False
                else:
                    row[column] = found[0]
            elif pk and "INT" in declared.upper() and table_autoincrements(conn, table):
                continue
            elif notnull or pk:
                if default is not None and not pk:
                    continue
                row[column] = _value(table, column, declared, step)
        if not possible:
            continue
        names = ", ".join(f'"{name}"' for name in row)
        marks = ", ".join("?" for _ in row)
        try:
            conn.execute(f'INSERT INTO "{table}" ({names}) VALUES ({marks})', list(row.values()))
        except sqlite3.IntegrityError:
            continue
        written[table] = 1
    return written


def table_autoincrements(conn: sqlite3.Connection, table: str) -> bool:
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    return "AUTOINCREMENT" in sql.upper()


def _row_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {
        table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        for table in _user_tables(conn)
    }


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    """Migration files are 0001_..., 0002_...: one per version, none missing."""
    versions = _versions()
    assert versions, "no SQLite migrations found"
    assert versions == list(range(1, len(versions) + 1))


def test_step_by_step_with_data_equals_all_at_once(connect: Any) -> None:
    """Migrating one version at a time, with rows written between steps, gives exactly the
    schema of a database migrated in one go, and the rows survive."""
    versions = _versions()
    stepwise = connect("stepwise.sqlite3")
    inserted: dict[str, int] = {}
    for version in versions:
        assert migrate(stepwise, upto=version) == version
        assert _applied(stepwise) == list(range(1, version + 1))
        for table, count in _insert_rows(stepwise, step=version).items():
            inserted[table] = inserted.get(table, 0) + count
    assert inserted.get("jobs", 0) == len(versions), "the jobs table got no row at some step"

    at_once = connect("at_once.sqlite3")
    assert migrate(at_once) == versions[-1]

    assert _schema(stepwise) == _schema(at_once)
    assert _applied(stepwise) == _applied(at_once) == versions
    counts = _row_counts(stepwise)
    for table, count in inserted.items():
        if table in counts:
            assert counts[table] == count, table


def test_migrating_up_to_an_older_version_than_applied_changes_nothing(connect: Any) -> None:
    """`upto` below the current version neither fails nor goes back."""
    conn = connect("db.sqlite3")
    newest = migrate(conn)
    before = _schema(conn)
    assert migrate(conn, upto=1) == newest
    assert _schema(conn) == before


def test_migrating_twice_is_a_no_op(connect: Any) -> None:
    """A second migrate writes nothing: same version, schema, bookkeeping and data."""
    conn = connect("db.sqlite3")
    newest = migrate(conn)
    _insert_rows(conn, step=1)
    schema = _schema(conn)
    bookkeeping = conn.execute("SELECT * FROM schema_migrations ORDER BY version").fetchall()
    rows = _row_counts(conn)
    changes = conn.total_changes

    assert migrate(conn) == newest
    assert conn.total_changes == changes
    assert _schema(conn) == schema
    assert (
        conn.execute("SELECT * FROM schema_migrations ORDER BY version").fetchall() == bookkeeping
    )
    assert _row_counts(conn) == rows


def _future_database(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(path)
    try:
        migrate(conn)
        conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (FUTURE_VERSION,))
    finally:
        conn.close()


def test_migrate_refuses_a_schema_newer_than_the_code(tmp_path: Path) -> None:
    """A database from a newer gateway raises StoreError naming both versions, untouched."""
    path = tmp_path / "db.sqlite3"
    _future_database(path)
    conn = _connect(path)
    try:
        schema = _schema(conn)
        with pytest.raises(StoreError) as error:
            migrate(conn)
        assert str(FUTURE_VERSION) in str(error.value)
        assert str(_versions()[-1]) in str(error.value)
        assert _schema(conn) == schema
        assert _applied(conn)[-1] == FUTURE_VERSION
    finally:
        conn.close()


async def test_store_open_refuses_a_schema_newer_than_the_code(tmp_path: Path) -> None:
    """SQLiteStore.open() raises StoreError on a database from a newer gateway."""
    path = tmp_path / "db.sqlite3"
    _future_database(path)
    store = SQLiteStore(path)
    try:
        with pytest.raises(StoreError, match="newer"):
            await store.open()
    finally:
        await store.close()


def test_serve_exits_non_zero_on_a_schema_newer_than_the_code(tmp_path: Path) -> None:
    """`gateway serve` on a database from a newer gateway stops at once, non-zero, saying why,
    and leaves the database as it found it."""
    data_dir = tmp_path / "data"
    database = data_dir / "gateway.sqlite3"
    _future_database(database)
    env = {**os.environ, "GATEWAY_SECRET_KEY": SECRET_KEY}
    env.pop("GATEWAY_ADMIN_TOKEN", None)
    env.pop("GATEWAY_DB", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "newer than this gateway knows" in output, output
    assert str(FUTURE_VERSION) in output
    conn = sqlite3.connect(database)
    try:
        assert _applied(conn)[-1] == FUTURE_VERSION
    finally:
        conn.close()
