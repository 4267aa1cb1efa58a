"""`gateway export` and `gateway import`: a whole gateway database as one JSON Lines file, from
and to either store. It is a logical backup, and the way from SQLite to PostgreSQL.

The file, one JSON object per line:

    {"format": "gateway-export", "format_version": 1, "schema_version": 6, "store": "sqlite", ...}
    {"table": "meta", "row": {"key": "secret_key_fingerprint", "value": "..."}}
    ...                                    one line per row, table by table in `TABLES` order
    {"identity": "job_events", "column": "id", "last": 1234}    where each id counter stood
    {"end": true, "rows": 5678}

A row maps column names to values; bytes are `{"base64": "..."}` (no other value is an object).
Tables come parents first, and rows within a table in an order that puts a retry after the attempt
it retries, so every foreign key points at a row already imported. The export streams one
snapshot (a read transaction); the import runs in one transaction, into an empty database at the
file's schema version, so it lands whole or not at all. Secret key fingerprints travel with the
rows: the target gateway must run with the same `GATEWAY_SECRET_KEY`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import os
import sqlite3
import sys
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import aiosqlite

from gateway.config import Settings
from gateway.errors import StoreError, TransferRefused

FORMAT = "gateway-export"
FORMAT_VERSION = 1
FETCH_ROWS = 500  # rows read from the source per round trip
BATCH_ROWS = 500  # rows written to the target per statement batch...
BATCH_BYTES = 4 * 1024 * 1024  # ...or fewer, when they are large (artifacts)
STDIO = "-"


@dataclass(frozen=True)
class Table:
    """One exported table: `order_by` keeps referenced rows first within the table too;
    `identity` names its generated id column, whose counter must continue after the import."""

    name: str
    order_by: str
    identity: str | None = None


# Parents before children (every FOREIGN KEY of the migrations points up this list).
# `schema_migrations` is not a table of data: the header carries the version.
TABLES = (
    Table("meta", "key"),
    Table("api_tokens", "id"),
    Table("runners", "id"),
    Table("pipelines", "id"),
    Table("pipeline_events", "id", identity="id"),
    Table("jobs", "attempt, id"),  # `retry_of` points at the previous attempt
    Table("job_events", "id", identity="id"),
    Table("job_trace", 'job_id, "offset"'),
    Table("artifacts", "job_id, name"),
    Table("webhook_endpoints", "id"),
    Table("webhook_messages", "id"),
    Table("webhook_deliveries", "id"),
    Table("webhook_attempts", "delivery_id, number"),
    Table("event_log", "seq", identity="seq"),
)
TABLE_BY_NAME = {table.name: table for table in TABLES}


@dataclass
class Summary:
    """What an export wrote or an import read."""

    schema_version: int
    store: str
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.rows.values())


# -- the two stores --------------------------------------------------------------------------


class Database(ABC):
    """One end of a transfer: a gateway database, read as one snapshot or written in one
    transaction."""

    store: str

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def schema_version(self) -> int:
        """The migrations applied (0: none, not a gateway database yet)."""

    @abstractmethod
    def newest_known(self) -> int:
        """The newest migration this code has for this store."""

    @abstractmethod
    def snapshot(self) -> contextlib.AbstractAsyncContextManager[None]:
        """A read transaction: every read inside it sees one moment of the database."""

    @abstractmethod
    def rows(self, table: Table) -> AsyncIterator[dict[str, Any]]:
        """The table's rows in `table.order_by` order, fetched a batch at a time."""

    @abstractmethod
    async def identity_last(self, table: Table) -> int:
        """The last id the table's counter handed out (0 if none)."""

    @abstractmethod
    async def migrate(self, upto: int) -> None:
        """Apply the migrations up to `upto` to a database that has none."""

    @abstractmethod
    def writing(self) -> contextlib.AbstractAsyncContextManager[None]:
        """One write transaction that no other writer can interleave with; rolled back when
        the block raises."""

    @abstractmethod
    async def has_rows(self, table: Table) -> bool: ...

    @abstractmethod
    async def columns(self, table: Table) -> set[str]: ...

    @abstractmethod
    async def insert(
        self, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> None:
        """Insert `rows` (values in `columns` order), given ids included."""

    @abstractmethod
    async def continue_identity(self, table: Table, last: int) -> None:
        """Make the table's counter hand out ids above `last` and above every stored id."""


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _insert_sql(table: Table, columns: tuple[str, ...], placeholders: list[str]) -> str:
    names = ", ".join(_quote(column) for column in columns)
    return f"INSERT INTO {_quote(table.name)} ({names}) VALUES ({', '.join(placeholders)})"


class SQLiteDatabase(Database):
    store = "sqlite"

    def __init__(self, path: Path, db: aiosqlite.Connection) -> None:
        self._path = path
        self._db = db

    @classmethod
    async def connect(cls, path: Path, *, create: bool) -> SQLiteDatabase:
        await asyncio.to_thread(_prepare_path, path, create)
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA busy_timeout = 5000")
        await db.execute("PRAGMA foreign_keys = ON")
        return cls(path, db)

    async def close(self) -> None:
        await self._db.close()

    async def schema_version(self) -> int:
        async with self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        ) as cursor:
            if await cursor.fetchone() is None:
                return 0
        async with self._db.execute(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    def newest_known(self) -> int:
        from gateway.store.sqlite.schema import migrations

        return migrations()[-1][0]

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[None]:
        # WAL: a read transaction sees the database as of its first read, whatever commits later.
        await self._db.execute("BEGIN")
        try:
            yield
        finally:
            await self._db.execute("COMMIT")

    async def rows(self, table: Table) -> AsyncIterator[dict[str, Any]]:
        sql = f"SELECT * FROM {_quote(table.name)} ORDER BY {table.order_by}"
        async with self._db.execute(sql) as cursor:
            names = [column[0] for column in cursor.description]
            while batch := await cursor.fetchmany(FETCH_ROWS):
                for row in batch:
                    yield dict(zip(names, row, strict=True))

    async def identity_last(self, table: Table) -> int:
        async with self._db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = ?", (table.name,)
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def migrate(self, upto: int) -> None:
        await asyncio.to_thread(_migrate_sqlite_file, self._path, upto)

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        await self._db.execute("BEGIN IMMEDIATE")  # the write lock: other writers wait
        try:
            yield
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        await self._db.execute("COMMIT")

    async def has_rows(self, table: Table) -> bool:
        async with self._db.execute(f"SELECT 1 FROM {_quote(table.name)} LIMIT 1") as cursor:
            return await cursor.fetchone() is not None

    async def columns(self, table: Table) -> set[str]:
        async with self._db.execute(f"PRAGMA table_info({_quote(table.name)})") as cursor:
            return {row[1] for row in await cursor.fetchall()}

    async def insert(
        self, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> None:
        await self._db.executemany(_insert_sql(table, columns, ["?"] * len(columns)), rows)

    async def continue_identity(self, table: Table, last: int) -> None:
        # Explicit ids already moved AUTOINCREMENT's counter to the largest one inserted; a
        # larger `last` (the newest rows were pruned at the source) moves it further.
        if last <= 0:
            return
        await self._db.execute(
            "UPDATE sqlite_sequence SET seq = ? WHERE name = ? AND seq < ?",
            (last, table.name, last),
        )
        await self._db.execute(
            "INSERT INTO sqlite_sequence (name, seq) SELECT ?, ?"
            " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = ?)",
            (table.name, last, table.name),
        )


def _prepare_path(path: Path, create: bool) -> None:
    if not create and not path.exists():
        raise TransferRefused(f"no gateway database at {path}")
    path.parent.mkdir(parents=True, exist_ok=True)


def _migrate_sqlite_file(path: Path, upto: int) -> None:
    from gateway.store.sqlite.schema import configure, migrate

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        configure(conn)
        migrate(conn, upto=upto)
    finally:
        conn.close()


class PostgresDatabase(Database):
    store = "postgres"

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, dsn: str) -> PostgresDatabase:
        import asyncpg

        try:
            conn = await asyncpg.connect(dsn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot connect to the PostgreSQL database: {exc}") from None
        if await conn.fetchval("SELECT current_schema()") is None:
            await conn.close()
            raise StoreError("the search_path names no existing schema; create it first")
        return cls(conn)

    async def close(self) -> None:
        await self._conn.close()

    async def schema_version(self) -> int:
        if await self._conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
            return 0
        return int(
            await self._conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        )

    def newest_known(self) -> int:
        from gateway.store.postgres.schema import migrations

        return migrations()[-1][0]

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[None]:
        async with self._conn.transaction(isolation="repeatable_read", readonly=True):
            yield

    async def rows(self, table: Table) -> AsyncIterator[dict[str, Any]]:
        sql = f"SELECT * FROM {_quote(table.name)} ORDER BY {table.order_by}"
        async for record in self._conn.cursor(sql, prefetch=FETCH_ROWS):
            yield dict(record.items())

    async def _sequence(self, table: Table) -> str:
        name: str | None = await self._conn.fetchval(
            "SELECT pg_get_serial_sequence($1, $2)", _quote(table.name), table.identity
        )
        if name is None:
            raise StoreError(f"{table.name}.{table.identity} has no id counter")
        return name

    async def identity_last(self, table: Table) -> int:
        # The sequence's name comes from the database itself, already quoted.
        row = await self._conn.fetchrow(
            f"SELECT last_value, is_called FROM {await self._sequence(table)}"
        )
        return int(row["last_value"]) if row["is_called"] else 0

    async def migrate(self, upto: int) -> None:
        from gateway.store.postgres.schema import migrate

        await migrate(self._conn, upto=upto)

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        async with self._conn.transaction():
            # A gateway started by mistake waits for the import instead of writing beside it.
            names = ", ".join(_quote(table.name) for table in TABLES)
            await self._conn.execute(f"LOCK TABLE {names} IN SHARE ROW EXCLUSIVE MODE")
            yield

    async def has_rows(self, table: Table) -> bool:
        return bool(
            await self._conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {_quote(table.name)})")
        )

    async def columns(self, table: Table) -> set[str]:
        rows = await self._conn.fetch(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = $1",
            table.name,
        )
        return {row[0] for row in rows}

    async def insert(
        self, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> None:
        placeholders = [f"${n}" for n in range(1, len(columns) + 1)]
        await self._conn.executemany(_insert_sql(table, columns, placeholders), rows)

    async def continue_identity(self, table: Table, last: int) -> None:
        assert table.identity is not None
        stored = await self._conn.fetchval(
            f"SELECT COALESCE(MAX({_quote(table.identity)}), 0) FROM {_quote(table.name)}"
        )
        last = max(last, int(stored))
        sequence = await self._sequence(table)
        if last > 0:
            await self._conn.execute("SELECT setval($1::regclass, $2, true)", sequence, last)
        else:
            await self._conn.execute("SELECT setval($1::regclass, 1, false)", sequence)


async def open_database(settings: Settings, *, create: bool) -> Database:
    """The database `settings` names (`GATEWAY_DB` / `--db`, else SQLite in the data dir)."""
    if settings.postgres_dsn is not None:
        return await PostgresDatabase.connect(settings.postgres_dsn)
    return await SQLiteDatabase.connect(settings.sqlite_path, create=create)


# -- export ----------------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    return value


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


async def export_database(db: Database, out: IO[str]) -> Summary:
    """Write the whole database to `out` from one snapshot; see the module docstring."""
    async with db.snapshot():
        version = await db.schema_version()
        if version == 0:
            raise TransferRefused("the database holds no gateway schema: nothing to export")
        if version > db.newest_known():
            raise TransferRefused(
                f"the database schema is version {version}, newer than this gateway knows"
                f" ({db.newest_known()}); export it with the gateway that uses it"
            )
        summary = Summary(schema_version=version, store=db.store)
        exported_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        out.write(
            _line(
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "schema_version": version,
                    "store": db.store,
                    "exported_at": exported_at,
                }
            )
        )
        for table in TABLES:
            count = 0
            async for row in db.rows(table):
                encoded = {name: _encode(value) for name, value in row.items()}
                out.write(_line({"table": table.name, "row": encoded}))
                count += 1
            summary.rows[table.name] = count
        for table in TABLES:
            if table.identity is not None:
                last = await db.identity_last(table)
                out.write(_line({"identity": table.name, "column": table.identity, "last": last}))
        out.write(_line({"end": True, "rows": summary.total}))
    return summary


# -- import ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    schema_version: int
    store: str


def _parse(line: str, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise TransferRefused(f"line {number} is not a JSON object: not a gateway export")
    return record


def read_header(line: str | None) -> Header:
    """The first line's facts; refuses anything but a gateway export this code can read."""
    if not line:
        raise TransferRefused("the file is empty: not a gateway export")
    record = _parse(line, 1)
    if record.get("format") != FORMAT:
        raise TransferRefused("the first line is not a gateway export header")
    if record.get("format_version") != FORMAT_VERSION:
        raise TransferRefused(
            f"the export's format version is {record.get('format_version')!r}; this gateway"
            f" reads version {FORMAT_VERSION}"
        )
    version = record.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TransferRefused("the export header has no valid schema_version")
    return Header(schema_version=version, store=str(record.get("store", "")))


def _decode(value: Any, number: int) -> Any:
    if isinstance(value, dict):
        encoded = value.get("base64")
        if len(value) != 1 or not isinstance(encoded, str):
            raise TransferRefused(f'line {number}: an object value must be {{"base64": ...}}')
        try:
            return base64.b64decode(encoded, validate=True)
        except ValueError:
            raise TransferRefused(f"line {number}: invalid base64") from None
    if isinstance(value, list):
        raise TransferRefused(f"line {number}: a column value cannot be a list")
    return value


class _Batch:
    """Rows of one table with one column list, written together."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.key: tuple[Table, tuple[str, ...]] | None = None
        self.rows: list[tuple[Any, ...]] = []
        self.size = 0
        self.first_line = 0

    async def add(
        self, table: Table, columns: tuple[str, ...], values: tuple[Any, ...], line: int, size: int
    ) -> None:
        if self.key != (table, columns):
            await self.flush()
            self.key = (table, columns)
            self.first_line = line
        self.rows.append(values)
        self.size += size
        if len(self.rows) >= BATCH_ROWS or self.size >= BATCH_BYTES:
            await self.flush()
            self.key = None

    async def flush(self) -> None:
        if self.key is None or not self.rows:
            return
        table, columns = self.key
        try:
            await self._db.insert(table, columns, self.rows)
        except Exception as exc:
            if not _is_database_error(exc):
                raise
            raise TransferRefused(
                f"the rows of {table.name} from line {self.first_line} do not fit the database:"
                f" {exc}"
            ) from None
        self.rows = []
        self.size = 0


def _is_database_error(exc: Exception) -> bool:
    if isinstance(exc, sqlite3.Error):
        return True
    asyncpg = sys.modules.get("asyncpg")
    return asyncpg is not None and isinstance(exc, asyncpg.PostgresError | asyncpg.DataError)


async def import_database(db: Database, header: Header, lines: Iterator[str]) -> Summary:
    """Import the lines after the header into `db`, in one transaction. `db` must be empty: a
    fresh database is migrated to the file's schema version first, a migrated one must already
    be at it. Raises TransferRefused (nothing imported) on any refusal."""
    newest = db.newest_known()
    if header.schema_version > newest:
        raise TransferRefused(
            f"the export is schema version {header.schema_version}, newer than this gateway"
            f" knows ({newest}); import it with a gateway at least as new as the one that"
            " exported it"
        )
    current = await db.schema_version()
    if current == 0:
        await db.migrate(header.schema_version)
    elif current != header.schema_version:
        raise TransferRefused(
            f"the target database is at schema version {current}, the export at"
            f" {header.schema_version}: import into a new, empty database (`gateway import`"
            " migrates it to the export's version), then start the gateway to migrate further"
        )
    summary = Summary(schema_version=header.schema_version, store=db.store)
    async with db.writing():
        filled = [table.name for table in TABLES if await db.has_rows(table)]
        if filled:
            raise TransferRefused(
                "the target database is not empty (rows in " + ", ".join(filled) + "):"
                " import only into a new database, or one `gateway migrate` just created"
            )
        await _import_rows(db, lines, summary)
    return summary


async def _import_rows(db: Database, lines: Iterator[str], summary: Summary) -> None:
    known_columns: dict[str, set[str]] = {}
    identities: dict[str, int] = {}
    batch = _Batch(db)
    ended = False
    for number, line in enumerate(lines, start=2):
        if ended:
            raise TransferRefused(f"line {number} follows the end of the export")
        record = _parse(line, number)
        if "table" in record:
            table = TABLE_BY_NAME.get(record["table"])
            row = record.get("row")
            if table is None or not isinstance(row, dict):
                raise TransferRefused(f"line {number}: unknown table {record['table']!r}")
            if table.name not in known_columns:
                known_columns[table.name] = await db.columns(table)
            unknown = set(row) - known_columns[table.name]
            if unknown:
                raise TransferRefused(
                    f"line {number}: {table.name} has no column {sorted(unknown)[0]!r} here"
                )
            values = tuple(_decode(value, number) for value in row.values())
            await batch.add(table, tuple(row), values, number, len(line))
            summary.rows[table.name] = summary.rows.get(table.name, 0) + 1
        elif "identity" in record:
            table = TABLE_BY_NAME.get(record["identity"])
            last = record.get("last")
            if table is None or table.identity is None or not isinstance(last, int):
                raise TransferRefused(f"line {number}: not a valid id counter")
            identities[table.name] = last
        elif record.get("end") is True:
            await batch.flush()
            if record.get("rows") != summary.total:
                raise TransferRefused(
                    f"the export says {record.get('rows')} rows but holds {summary.total}"
                )
            ended = True
        else:
            raise TransferRefused(f"line {number} is neither a row, an id counter nor the end")
    if not ended:
        raise TransferRefused("the export ends before its last line: the file is cut short")
    for table in TABLES:
        if table.identity is not None:
            await db.continue_identity(table, identities.get(table.name, 0))


# -- files -----------------------------------------------------------------------------------


def _open_text(path: str, mode: str, *, compressed: bool) -> IO[str]:
    if compressed:
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8")


def export_file(settings: Settings, path: str) -> Summary:
    """Export the database `settings` names to `path` (`-`: stdout; `.gz`: compressed). The
    file appears only once complete (written beside it, then renamed)."""

    async def run(out: IO[str]) -> Summary:
        db = await open_database(settings, create=False)
        try:
            return await export_database(db, out)
        finally:
            await db.close()

    if path == STDIO:
        summary = asyncio.run(run(sys.stdout))
        sys.stdout.flush()
        return summary
    partial = f"{path}.partial"
    try:
        with _open_text(partial, "w", compressed=path.endswith(".gz")) as out:
            summary = asyncio.run(run(out))
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    return summary


def import_file(settings: Settings, path: str) -> Summary:
    """Import the export at `path` (`-`: stdin; `.gz`: compressed) into the database `settings`
    names; see `import_database`."""
    if path == STDIO:
        return _import_stream(settings, sys.stdin)
    try:
        source = _open_text(path, "r", compressed=path.endswith(".gz"))
    except OSError as exc:
        raise TransferRefused(f"cannot read {path}: {exc.strerror}") from None
    with source:
        return _import_stream(settings, source)


def _import_stream(settings: Settings, source: Iterable[str]) -> Summary:
    lines = iter(source)
    try:
        header = read_header(next(lines, None))
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError):
        raise TransferRefused("the file is not a gateway export") from None

    async def run() -> Summary:
        db = await open_database(settings, create=True)
        try:
            return await import_database(db, header, lines)
        finally:
            await db.close()

    try:
        return asyncio.run(run())
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError):
        raise TransferRefused("the file is not a whole gateway export") from None
