"""The scale-out store: PostgreSQL through an asyncpg pool, shared by several replicas.

The verbs are the ones SQLite runs (`gateway.store.verbs`). Each runs in a greenlet on the event
loop's thread inside one READ COMMITTED transaction on a pooled connection, its statements
awaited with asyncpg (`bridge.run_blocking`). Concurrency control is row-level: every transition is
compare-and-set (a miss raises ConcurrentChange), claims use `FOR UPDATE SKIP LOCKED`, and a
pipeline's row is locked while its jobs cascade. A verb that lost a race (a missed
compare-and-set, a unique key another transaction took first, a serialization failure, a
deadlock) runs again from the start, a few times.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import asyncpg

from gateway.artifacts import ArtifactLinks
from gateway.errors import ConcurrentChange, StoreError
from gateway.store.base import Policy, Signal
from gateway.store.postgres.bridge import BlockingConnection, run_blocking
from gateway.store.postgres.notify import Notifier
from gateway.store.postgres.schema import migrate
from gateway.store.verbs.connection import POSTGRES, Connection
from gateway.store.verbs.store import VerbStore
from gateway.store.verbs.tx import Tx

T = TypeVar("T")
DEFAULT_POOL_SIZE = 10
MIN_POOL_SIZE = 2
EVENT_LOG_LOCK = 0x6761746577_6C6F67  # the advisory lock that orders event-log writers
VERB_ATTEMPTS = 5  # runs of a verb that keeps losing races before its caller sees a 409
_RACES = (
    ConcurrentChange,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    # a concurrent insert of the same key won (two retries of one job): run again, see it
    asyncpg.exceptions.UniqueViolationError,
)


def is_postgres_url(url: str | None) -> bool:
    return url is not None and url.startswith(("postgresql://", "postgres://"))


class PostgresStore(VerbStore):
    """The store contract on a PostgreSQL database (`dsn`: a `postgresql://` URL)."""

    dialect = POSTGRES

    def __init__(
        self,
        dsn: str,
        policy: Policy | None = None,
        links: ArtifactLinks | None = None,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        server_settings: dict[str, str] | None = None,
    ) -> None:
        """`pool_size`: connections at most;
        `server_settings`: session settings of every connection (a test's `search_path`)."""
        super().__init__(policy, links)
        self._dsn = dsn
        self._pool_size = max(pool_size, MIN_POOL_SIZE)
        self._server_settings = server_settings
        self._pool: asyncpg.Pool | None = None
        self._on_signals: Callable[[frozenset[Signal]], None] = lambda signals: None
        self._notifier: Notifier | None = None

    def subscribe(self, on_signals: Callable[[frozenset[Signal]], None]) -> None:
        self._on_signals = on_signals

    def announce(self, signals: frozenset[Signal]) -> None:
        if self._notifier is not None:
            self._notifier.announce(signals)

    @property
    def notifier(self) -> Notifier | None:
        """The LISTEN/NOTIFY connection's keeper while the store is open."""
        return self._notifier

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=MIN_POOL_SIZE,
            max_size=self._pool_size,
            server_settings=self._server_settings,
        )
        try:
            async with self._pool.acquire() as conn:
                await migrate(conn)
        except BaseException:
            await self.close()
            raise
        self._notifier = Notifier(
            lambda: asyncpg.connect(self._dsn, server_settings=self._server_settings),
            self._on_signals,
        )
        self._notifier.start()

    async def clock_offset(self) -> float:
        async with self._opened().acquire() as conn:
            sent = time.time()
            database = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())")
            received = time.time()
        return float(database) - (sent + received) / 2

    async def close(self) -> None:
        if self._notifier is not None:
            await self._notifier.stop()
            self._notifier = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _opened(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the store is not open")
        return self._pool

    async def _run(self, fn: Callable[[Connection], T]) -> T:
        """Run the read `fn` on a pooled connection (autocommit: each
        statement sees what was committed when it started)."""
        # Shielded: a cancelled caller must not return the connection while the verb still
        # uses it.
        return await asyncio.shield(self._read(fn))

    async def _read(self, fn: Callable[[Connection], T]) -> T:
        async with self._opened().acquire() as conn:
            return await run_blocking(fn, BlockingConnection(conn))

    async def _transact(self, verb: Callable[[Tx], T], now: float) -> T:
        """Run `verb` in one transaction; run it again when it lost a race (at most
        VERB_ATTEMPTS runs, then the last error is raised)."""
        for attempt in range(1, VERB_ATTEMPTS + 1):
            try:
                return await asyncio.shield(self._transact_once(verb, now))
            except _RACES:
                if attempt == VERB_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def _transact_once(self, verb: Callable[[Tx], T], now: float) -> T:
        async with self._opened().acquire() as conn, conn.transaction():
            tx = self._tx(BlockingConnection(conn), now)
            return await run_blocking(_run_verb, verb, tx)


def _run_verb(verb: Callable[[Tx], T], tx: Tx) -> T:
    result = verb(tx)
    if tx.outbox.logged:
        # The event stream reads the log in `seq` order: transactions that log must commit in
        # the order they take their numbers, or a reader past a number still in flight would
        # never see it. So they take them one at a time, last thing before the commit.
        tx.conn.execute("SELECT pg_advisory_xact_lock(?)", (EVENT_LOG_LOCK,))
    tx.finish()
    return result
