"""A blocking, sqlite3-shaped face on one asyncpg connection, for the store's verbs.

The verbs are plain functions of a connection (`Tx` in `gateway.store.verbs.tx`): SQLite runs
them on its connection thread. On PostgreSQL they run on the event loop's thread in a greenlet
(`run_blocking`): a statement switches back to the loop, which awaits it with asyncpg while
other requests go on, and switches into the verb again with its rows. So the verbs are written
once, blocking, without a thread hop per statement (SQLAlchemy runs its asyncio drivers the
same way). `?` placeholders become `$1, $2, ...`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any, TypeVar, cast

import asyncpg
import greenlet

T = TypeVar("T")
_PLACEHOLDER = re.compile(r"\?")
_RETURNS_ROWS = re.compile(r"^\s*(SELECT|WITH)\b|\bRETURNING\b", re.IGNORECASE)
# The only SQLite spellings the verbs use that PostgreSQL lacks, and PostgreSQL's for them:
# - `group_concat(x, ',')` (always with its separator) is `string_agg(x, ',')`;
# - `json_each(?)` over a JSON array of strings (`SELECT value FROM ...`) is
#   `json_array_elements_text(?::json)`, whose column is also named `value`.
REWRITES = (
    (re.compile(r"\bgroup_concat\(([^,()]+), ','\)"), r"string_agg(\1, ',')"),
    (re.compile(r"\bjson_each\(\?\)"), "json_array_elements_text(?::json)"),
)


@lru_cache(maxsize=512)
def to_postgres(sql: str) -> str:
    """The verbs' SQL in PostgreSQL's dialect: `REWRITES`, then `?` placeholders as `$n` (our
    SQL never holds a `?` inside a literal)."""
    for pattern, replacement in REWRITES:
        sql = pattern.sub(replacement, sql)
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


def _storable(value: Any) -> Any:
    """PostgreSQL's text cannot hold NUL: it becomes U+FFFD (so an id with a NUL is simply not
    found, as on SQLite, instead of an error)."""
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _rowcount(status: str) -> int:
    """`UPDATE 3` -> 3, `INSERT 0 1` -> 1."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class _VerbGreenlet(greenlet.greenlet):  # type: ignore[misc]
    """Runs one blocking function for `run_blocking`."""


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` on this thread in a greenlet; each awaitable it hands over with
    `wait_for` is awaited here (the loop serves others meanwhile) and its result, or its
    exception, goes back into `fn`."""
    verb = _VerbGreenlet(fn, greenlet.getcurrent())
    request = verb.switch(*args)
    while not verb.dead:
        try:
            value = await request
        except BaseException:
            request = verb.throw(*sys.exc_info())
        else:
            request = verb.switch(value)
    return cast(T, request)


def wait_for(awaitable: Awaitable[T]) -> T:
    """From inside `run_blocking`: the result of `awaitable`, awaited by the event loop."""
    current = greenlet.getcurrent()
    if not isinstance(current, _VerbGreenlet):
        raise RuntimeError("a store verb ran outside run_blocking")
    return cast(T, current.parent.switch(awaitable))


class BlockingConnection:
    """See the module docstring. Use only inside `run_blocking`."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        query = to_postgres(sql)
        values = [_storable(value) for value in params]
        if _RETURNS_ROWS.search(sql):
            rows = wait_for(self._conn.fetch(query, *values))
            return Result(rows, len(rows))
        status = wait_for(self._conn.execute(query, *values))
        return Result([], _rowcount(status))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Result:
        batch = [tuple(_storable(value) for value in row) for row in rows]
        if batch:
            wait_for(self._conn.executemany(to_postgres(sql), batch))
        return Result([], len(batch))
