"""A blocking, sqlite3-shaped face on one asyncpg connection, for the store's verbs.

The verbs are plain functions of a connection (`Tx` in `gateway.store.sqlite.tx`): SQLite runs
them on its connection thread. On PostgreSQL they run in a worker thread, and every statement
they issue is sent by asyncpg on the event loop (`run_coroutine_threadsafe`), one at a time, so
the connection is only ever used from the loop. `?` placeholders become `$1, $2, ...`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine, Iterable, Sequence
from functools import lru_cache
from typing import Any, TypeVar

import asyncpg

T = TypeVar("T")
_PLACEHOLDER = re.compile(r"\?")
_RETURNS_ROWS = re.compile(r"^\s*(SELECT|WITH)\b|\bRETURNING\b", re.IGNORECASE)


@lru_cache(maxsize=512)
def to_postgres(sql: str) -> str:
    """`?` placeholders as `$n` (our SQL never holds a `?` inside a literal)."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class Result:
    """What a statement returned, shaped like a sqlite3 cursor."""

    def __init__(self, rows: Sequence[Any], rowcount: int) -> None:
        self._rows = list(rows)
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows

    @property
    def lastrowid(self) -> int:
        """The `id` a `RETURNING id` statement gave."""
        row = self.fetchone()
        if row is None:
            raise RuntimeError("lastrowid needs a statement with RETURNING id")
        return int(row[0])


def _rowcount(status: str) -> int:
    """`UPDATE 3` -> 3, `INSERT 0 1` -> 1."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class BlockingConnection:
    """See the module docstring. Use only from a worker thread, never on the loop."""

    def __init__(self, conn: asyncpg.Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._loop = loop

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        query = to_postgres(sql)
        if _RETURNS_ROWS.search(sql):
            rows = self._wait(self._conn.fetch(query, *params))
            return Result(rows, len(rows))
        status = self._wait(self._conn.execute(query, *params))
        return Result([], _rowcount(status))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Result:
        batch = [tuple(row) for row in rows]
        if batch:
            self._wait(self._conn.executemany(to_postgres(sql), batch))
        return Result([], len(batch))
