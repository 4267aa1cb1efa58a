"""What the verbs need of a database connection (sqlite3's shape), and the few clauses only
one dialect has.

The verbs' SQL is the common subset of SQLite and PostgreSQL: `?` placeholders, `RETURNING`,
`ON CONFLICT`, CASE instead of scalar max(). Row locks are the exception: SQLite serialises
writers anyway, PostgreSQL needs them, so a verb asks its `Dialect` for the clause.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor: ...


@dataclass(frozen=True)
class Dialect:
    """Clauses that differ between the backends (empty where a backend needs none)."""

    name: str
    locks_rows: bool

    def skip_locked(self, table: str | None = None) -> str:
        """` FOR UPDATE [OF table] SKIP LOCKED` on PostgreSQL: concurrent claimers take
        different rows instead of waiting for each other."""
        if not self.locks_rows:
            return ""
        return f" FOR UPDATE OF {table} SKIP LOCKED" if table else " FOR UPDATE SKIP LOCKED"

    def for_update(self) -> str:
        """` FOR UPDATE` on PostgreSQL: the row stays as read until the transaction ends."""
        return " FOR UPDATE" if self.locks_rows else ""

    def indexed_by(self, index: str) -> str:
        """` INDEXED BY index` on SQLite, whose planner (without ANALYZE statistics) prefers an
        equality index to a partial one that also gives the order; PostgreSQL keeps statistics."""
        return f" INDEXED BY {index}" if self.name == "sqlite" else ""


SQLITE = Dialect("sqlite", locks_rows=False)
POSTGRES = Dialect("postgres", locks_rows=True)
