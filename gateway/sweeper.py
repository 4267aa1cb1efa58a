"""The deadline sweeper: fails jobs whose stored deadline has passed. No in-memory timers.

Every sweep asks the store for due jobs in batches, earliest deadline first, so a deadline that
passed while the server was down fires in the first sweep after start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from gateway.clock import Clock
from gateway.config import SWEEP_BATCH_SIZE
from gateway.errors import StateConflict
from gateway.metrics import Metrics
from gateway.store.base import Changes, Store

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
        publish: Callable[[Changes], None] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._publish = publish or (lambda changes: metrics.record(changes.events))
        self._interval_s = interval_s
        self._batch_size = batch_size

    async def sweep_once(self) -> int:
        """Fire every deadline due now (fail the job, or requeue an unconfirmed hand-out);
        return how many. Each batch is its own short transaction."""
        expired = 0
        lag = 0.0
        while True:
            now = self._clock.now()
            sweep = await self._store.expire_overdue(now, self._batch_size)
            if sweep.oldest_deadline_at is not None and expired == 0:
                lag = max(0.0, now - sweep.oldest_deadline_at)
            self._publish(sweep.changes)
            for event in sweep.events:
                if event.cause == "deadline" and event.failure_reason is not None:
                    self._metrics.expired.labels(event.failure_reason.value).inc()
            expired += sweep.fired
            if sweep.fired < self._batch_size:
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
