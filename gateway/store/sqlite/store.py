"""The embedded store: SQLite in WAL mode through aiosqlite.

Every verb is a plain function run on aiosqlite's connection thread in one hop: `_transact`
wraps it in BEGIN IMMEDIATE ... COMMIT with a `Tx` for its bookkeeping. One aiosqlite call costs
about 120 us on our machine kind, so a verb made of several awaits would cap the hot path near
1.1k/s; one hop per transaction keeps it near the speed of SQLite itself. The connection thread
runs one function at a time, so transactions never interleave
(docs/decisions/0002-one-hop-transactions.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from gateway.artifacts import ArtifactLinks
from gateway.errors import StoreError
from gateway.store.base import Policy, Signal
from gateway.store.sqlite.schema import configure, migrate
from gateway.store.verbs.connection import SQLITE, Connection
from gateway.store.verbs.store import VerbStore
from gateway.store.verbs.tx import Tx

T = TypeVar("T")
GROUP_COMMIT_MAX = 64  # verbs in one transaction at most
CHECKPOINT_EVERY_S = 1.0
# Commits checkpoint only as a fallback (the background checkpointer normally keeps the WAL
# well below this many pages).
WAL_AUTOCHECKPOINT_PAGES = 10_000


class SQLiteStore(VerbStore):
    """The store contract on one SQLite file."""

    dialect = SQLITE

    def __init__(
        self, path: Path, policy: Policy | None = None, links: ArtifactLinks | None = None
    ) -> None:
        """`links` sign the artifact URLs of terminal events (without, those carry none)."""
        super().__init__(policy, links)
        self._path = path
        self._pending: deque[tuple[Callable[[Tx], Any], float, asyncio.Future[Any]]] = deque()
        self._flush_scheduled = False
        self._flushes: set[asyncio.Future[None]] = set()
        self._db: aiosqlite.Connection | None = None
        self._checkpointer: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self._path, isolation_level=None)
        try:
            db = self._db
            await db._execute(_configure_and_migrate, db._conn)  # type: ignore[no-untyped-call]
        except BaseException:
            # A refused open must not leave aiosqlite's (non-daemon) thread behind.
            await self.close()
            raise
        self._checkpointer = asyncio.create_task(self._checkpoint_wal())

    async def _checkpoint_wal(self) -> None:
        """Copy the WAL back into the database every second, on a connection of its own.
        Left to SQLite, the checkpoint runs inside whichever commit crosses the threshold and
        stalls it (and every callback queued behind it) for tens of milliseconds.

        The connection lives on one thread of its own: opening, checkpoints and closing queue
        up there, so a cancel can never close it under a running checkpoint."""
        loop = asyncio.get_running_loop()
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-checkpoint")
        conn = await loop.run_in_executor(thread, _checkpoint_connection, self._path)
        try:
            while True:
                await asyncio.sleep(CHECKPOINT_EVERY_S)
                await loop.run_in_executor(thread, _checkpoint, conn)
        finally:
            thread.submit(conn.close)
            thread.shutdown(wait=False)

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    def subscribe(self, on_signals: Callable[[frozenset[Signal]], None]) -> None:
        """One process owns an embedded database: nothing to hear."""

    def announce(self, signals: frozenset[Signal]) -> None:
        """One process owns an embedded database: nothing to tell."""

    async def clock_offset(self) -> float:
        return 0.0

    async def _run(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn` on the connection thread: one hop, whatever it does."""
        if self._db is None:
            raise StoreError("the store is not open")
        db = self._db
        result: T = await db._execute(fn, db._conn)  # type: ignore[no-untyped-call]
        return result

    async def _transact(self, verb: Callable[[Tx], T], now: float) -> T:
        """Run `verb` atomically on the connection thread and return once it is committed; a
        verb that raises changes nothing.

        Group commit: verbs that queue up while the thread is busy run in one transaction, each
        inside its own SAVEPOINT (rolled back alone when it raises), and are all answered after
        the one COMMIT. Under load one commit then serves many callbacks instead of one."""
        if self._db is None:
            raise StoreError("the store is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((verb, now, future))
        self._schedule_flush()
        result: T = await future
        return result

    def _schedule_flush(self) -> None:
        """On the loop: make sure a flush is queued on the connection thread."""
        if self._flush_scheduled or self._db is None:
            return
        self._flush_scheduled = True
        db = self._db
        flush = asyncio.ensure_future(db._execute(self._flush, db._conn))  # type: ignore[no-untyped-call]
        self._flushes.add(flush)
        flush.add_done_callback(self._flushes.discard)

    def _flush(self, conn: sqlite3.Connection) -> None:
        """On the connection thread: run the queued verbs (at most GROUP_COMMIT_MAX) in one
        transaction, then settle their futures on the loop."""
        self._flush_scheduled = False  # before draining: a verb queued from now on reschedules
        batch: list[tuple[Callable[[Tx], Any], float, asyncio.Future[Any]]] = []
        while self._pending and len(batch) < GROUP_COMMIT_MAX:
            batch.append(self._pending.popleft())
        if not batch:
            return
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for verb, now, future in batch:
                conn.execute("SAVEPOINT verb")
                try:
                    tx = self._tx(conn, now)
                    result = verb(tx)
                    tx.finish()
                    outcomes.append((future, result, None))
                    conn.execute("RELEASE verb")
                except Exception as exc:
                    conn.execute("ROLLBACK TO verb")
                    conn.execute("RELEASE verb")
                    outcomes.append((future, None, exc))
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(future, None, exc) for _, _, future in batch]
        # One wake-up of the loop answers the whole group (each is a write to its self-pipe).
        batch[0][2].get_loop().call_soon_threadsafe(self._settle, outcomes)

    def _settle(
        self, outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]
    ) -> None:
        """On the loop: answer the verbs of a committed (or failed) group, and queue the next
        flush if verbs came meanwhile."""
        for future, result, error in outcomes:
            if future.done():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
        if self._pending:
            self._schedule_flush()


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


def _checkpoint_connection(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    configure(conn)
    return conn


def _configure_and_migrate(conn: sqlite3.Connection) -> int:
    configure(conn)
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    return migrate(conn)
