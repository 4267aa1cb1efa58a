"""The deadline sweeper: fails jobs whose stored deadline has passed. No in-memory timers.

Every sweep asks the store for due jobs in batches, earliest deadline first, so a deadline that
passed while the server was down fires in the first sweep after start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.clock import Clock
from gateway.config import SWEEP_BATCH_SIZE
from gateway.errors import StateConflict
from gateway.metrics import Metrics
from gateway.store.base import Store

log = logging.getLogger("gateway.sweeper")


class Sweeper:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        *,
        interval_s: float,
        batch_size: int = SWEEP_BATCH_SIZE,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._interval_s = interval_s
        self._batch_size = batch_size

    async def sweep_once(self) -> int:
        """Fail every job due now; return how many. Each batch is its own short transaction."""
        expired = 0
        lag = 0.0
        while True:
            now = self._clock.now()
            sweep = await self._store.expire_overdue(now, self._batch_size)
            if sweep.oldest_deadline_at is not None and expired == 0:
                lag = max(0.0, now - sweep.oldest_deadline_at)
            self._metrics.record(sweep.events)
            for event in sweep.events:
                reason = event.failure_reason.value if event.failure_reason else "unknown"
                self._metrics.expired.labels(reason).inc()
            expired += len(sweep.events)
            if len(sweep.events) < self._batch_size:
                break
        self._metrics.sweeper_lag.set(lag)
        if expired:
            log.info("deadlines_expired", extra={"count": expired, "lag_s": round(lag, 3)})
        return expired

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every interval until `stop` is set; a failed sweep is logged and retried."""
        while not stop.is_set():
            try:
                await self.sweep_once()
            except StateConflict:
                log.info("sweep_conflict_retrying")
            except Exception:
                log.exception("sweep_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._interval_s)
