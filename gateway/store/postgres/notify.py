"""Wake-ups across replicas: PostgreSQL LISTEN/NOTIFY on one channel per schema.

A replica that committed something others may wait for (a job became pending, deliveries were
queued, events were logged) announces it; every other replica's listener wakes its own waiters
(long polls, the webhook dispatcher, event streams). Announcements are coalesced: at most one
NOTIFY is in flight, and the next one waits `MIN_GAP_S`, so a burst of commits costs one
notification (a NOTIFY serialises commits server-wide, so one per commit would slow the hot path).
They are best effort: one sent while a listener reconnects is lost, so waiters also re-check on
their own every few seconds, and a listener that reconnects wakes everything once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable

import asyncpg

from gateway.store.base import Signal

log = logging.getLogger("gateway.store.notify")

MIN_GAP_S = 0.005  # between two NOTIFYs of one replica: at most 200/s
RECONNECT_DELAYS_S = (0.1, 0.5, 1.0, 2.0, 5.0)  # the last one repeats
_ALL = frozenset(Signal)
_NAMES = frozenset(signal.value for signal in Signal)  # others (a newer replica's) are ignored
_FAILURES = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


def channel_of(schema: str) -> str:
    """`gateway`, or `gateway.<schema>` outside the public schema, so gateways sharing a
    database in separate schemas do not wake each other."""
    return "gateway" if schema == "public" else f"gateway.{schema}"


class Notifier:
    """One listening connection per replica that also sends this replica's announcements."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        on_signals: Callable[[frozenset[Signal]], None],
    ) -> None:
        """`connect` opens a connection to the store's database (its schema settings included);
        `on_signals` is called on the event loop with what another replica announced."""
        self._connect = connect
        self._on_signals = on_signals
        self._origin = secrets.token_hex(6)
        self._pending: set[Signal] = set()
        self._wanted = asyncio.Event()
        self._lost = False
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        self.backend_pid: int | None = None  # of the listening connection, while it listens

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-notifier")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def announce(self, signals: frozenset[Signal]) -> None:
        """Queue `signals` for the other replicas (never blocks, never raises)."""
        if signals:
            self._pending |= signals
            self._wanted.set()

    async def _run(self) -> None:
        failures = 0
        sessions = 0
        while True:
            try:
                await self._session(reconnected=sessions > 0)
            except _FAILURES as exc:
                log.warning("notify_listener_lost", extra={"error": type(exc).__name__})
            except Exception:
                log.exception("notify_listener_failed")
            if self.listening.is_set():
                sessions += 1
                failures = 0
            self.listening.clear()
            await asyncio.sleep(RECONNECT_DELAYS_S[min(failures, len(RECONNECT_DELAYS_S) - 1)])
            failures += 1

    async def _session(self, *, reconnected: bool) -> None:
        """Listen and send until the connection is lost (then raise or return)."""
        conn = await self._connect()
        try:
            channel = channel_of(await conn.fetchval("SELECT current_schema()"))
            self._lost = False
            conn.add_termination_listener(self._terminated)
            await conn.add_listener(channel, self._received)
            self.backend_pid = conn.get_server_pid()
            self.listening.set()
            if reconnected:
                # Whatever was announced while this replica did not listen is lost: look again.
                self._on_signals(_ALL)
            while not self._lost:
                await self._wanted.wait()
                self._wanted.clear()
                if self._lost or not self._pending:
                    continue
                kinds, self._pending = self._pending, set()
                payload = f"{self._origin} {','.join(sorted(kinds))}"
                try:
                    await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
                except BaseException:
                    self._pending |= kinds  # sent by the next session
                    raise
                await asyncio.sleep(MIN_GAP_S)
        finally:
            self.backend_pid = None
            with contextlib.suppress(*_FAILURES):
                await conn.close(timeout=1)

    def _terminated(self, conn: object) -> None:
        self._lost = True
        self._wanted.set()

    def _received(self, conn: object, pid: int, channel: str, payload: str) -> None:
        origin, _, names = payload.partition(" ")
        if origin == self._origin:
            return
        signals = frozenset(Signal(name) for name in names.split(",") if name in _NAMES)
        if signals:
            self._on_signals(signals)
