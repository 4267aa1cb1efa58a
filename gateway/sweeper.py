"""The deadline sweeper: fails jobs whose stored deadline has passed. No in-memory timers.

Every sweep asks the store for due jobs in batches, earliest deadline first, so a deadline that
passed while the server was down fires in the first sweep after start. At most once a minute
it also prunes what is older than the retention, in small batches (each its own short
transaction, so callbacks queue behind one batch at most, never behind the whole clean-up).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import Callable

from gateway.clock import Clock
from gateway.config import SWEEP_BATCH_SIZE
from gateway.errors import StateConflict
from gateway.metrics import Metrics
from gateway.store.base import Changes, Pruned, Store

log = logging.getLogger("gateway.sweeper")

PRUNE_INTERVAL_S = 60.0
PRUNE_BATCH_SIZE = 500
PRUNE_BATCHES_PER_PASS = 10  # then deadlines are swept again before pruning goes on


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
        retention_s: float | None = None,
        prune_batch_size: int = PRUNE_BATCH_SIZE,
    ) -> None:
        """`retention_s`: age past which terminal jobs are pruned (None: never)."""
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._publish = publish or (lambda changes: metrics.record(changes.events))
        self._interval_s = interval_s
        self._batch_size = batch_size
        self._retention_s = retention_s
        self._prune_batch_size = prune_batch_size
        self._next_prune_at = -math.inf

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
            reasons = collections.Counter(
                event.failure_reason
                for event in sweep.events
                if event.cause == "deadline" and event.failure_reason is not None
            )
            for reason, count in reasons.items():
                self._metrics.expired.labels(reason.value).inc(count)
            expired += sweep.fired
            # A requeued hand-out may have another deadline already due (its queue timeout):
            # it fires in the next pass, not a sweep later, when a runner might take the job.
            if sweep.fired < self._batch_size and not sweep.changes.requeued:
                break
        self._metrics.sweeper_lag.set(lag)
        if expired:
            log.info("deadlines_expired", extra={"count": expired, "lag_s": round(lag, 3)})
        return expired

    async def prune_once(self, max_batches: int | None = None) -> Pruned:
        """Delete terminal jobs and finished pipelines older than the retention, with all they
        own, batch after batch until none is left or `max_batches` ran; return the totals
        (`more` when batches were left for later)."""
        jobs = pipelines = batches = 0
        more = self._retention_s is not None
        while more and (max_batches is None or batches < max_batches):
            assert self._retention_s is not None
            now = self._clock.now()
            batch = await self._store.prune(now - self._retention_s, self._prune_batch_size, now)
            jobs += batch.jobs
            pipelines += batch.pipelines
            batches += 1
            more = batch.more
        if jobs or pipelines:
            log.info("retention_pruned", extra={"jobs": jobs, "pipelines": pipelines})
        return Pruned(jobs=jobs, pipelines=pipelines, more=more)

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every interval until `stop` is set, and prune at most once a minute; a failed
        sweep or prune is logged and retried."""
        while not stop.is_set():
            try:
                await self.sweep_once()
            except StateConflict:
                log.info("sweep_conflict_retrying")
            except Exception:
                log.exception("sweep_failed")
            if self._retention_s is not None and self._clock.now() >= self._next_prune_at:
                self._next_prune_at = self._clock.now() + PRUNE_INTERVAL_S
                try:
                    pruned = await self.prune_once(PRUNE_BATCHES_PER_PASS)
                except Exception:
                    log.exception("prune_failed")
                else:
                    if pruned.more:
                        self._next_prune_at = self._clock.now()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._interval_s)
