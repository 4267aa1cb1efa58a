"""The webhook dispatcher: claims due deliveries from the outbox under a lease, sends each
attempt signed afresh, records it, and schedules the next one.

At least once: a delivery is marked done only after a 2xx was recorded, so a crash between the
send and the record resends it (same `webhook-id`). A slow or failing endpoint never delays a
transition (nothing is sent in a transaction) nor another endpoint (a global cap and a
per-endpoint cap on attempts in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from gateway.clock import Clock
from gateway.metrics import Metrics
from gateway.models import DeliveryClaim
from gateway.store.base import AttemptOutcome, Store
from gateway.webhooks import signing
from gateway.webhooks.client import SendError, WebhookClient
from gateway.webhooks.guard import BlockedAddress, IPNetwork

log = logging.getLogger("gateway.webhooks")

SNIPPET_BYTES = 1024
JITTER = 0.2
LEASE_MARGIN_S = 5.0
IDLE_POLL_S = 1.0
DRAIN_S = 5.0


@dataclass(frozen=True)
class DispatchPolicy:
    schedule: tuple[float, ...]
    timeout_s: float
    disable_after_s: float
    concurrency: int
    endpoint_concurrency: int
    allow: tuple[IPNetwork, ...]
    server_secret: str


def retry_after_s(value: str | None, now: float) -> float | None:
    """A `Retry-After` header in seconds (delta or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def next_delay(
    schedule: Sequence[float],
    attempt: int,
    status_code: int | None,
    retry_after: float | None,
    rng: random.Random,
) -> float | None:
    """Seconds until the attempt after `attempt` (1-based), or None when the schedule is spent.
    The scheduled delay gets +-20% jitter; a `Retry-After` on 429/503 replaces it, at most 2x."""
    if attempt > len(schedule):
        return None
    scheduled = schedule[attempt - 1]
    if status_code in (429, 503) and retry_after is not None:
        return min(retry_after, 2 * scheduled)
    return scheduled * rng.uniform(1 - JITTER, 1 + JITTER)


class Dispatcher:
    """Runs in every `gateway serve`; see the module docstring."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        policy: DispatchPolicy,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._policy = policy
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._per_receiver: Tally[str] = Tally()
        self._client: WebhookClient | None = None
        self._outcomes: list[tuple[DeliveryClaim, AttemptOutcome]] = []
        self._recorder: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """New deliveries were committed: look now instead of at the next poll."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and send until `stop` is set; then let attempts in flight finish briefly
        (their leases lapse and another pass resends whatever was cut off)."""
        self._client = WebhookClient(self._policy.allow, max_idle=self._policy.concurrency)
        try:
            while not stop.is_set():
                # Cleared before the pass, so a commit made during it still wakes the next one.
                self._wake.clear()
                try:
                    await self.dispatch_once()
                except Exception:
                    log.exception("dispatch_failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wait_for_work(stop), timeout=IDLE_POLL_S)
                if not self._wake.is_set():
                    await self._client.prune()
            if self._in_flight:
                await asyncio.wait(self._in_flight, timeout=DRAIN_S)
            for task in self._in_flight:
                task.cancel()
            if self._recorder is not None:
                await asyncio.wait([self._recorder], timeout=DRAIN_S)
        finally:
            await self._client.aclose()

    async def _wait_for_work(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def dispatch_once(self) -> int:
        """Claim what is due and start sending it; return how many attempts started.

        The per-endpoint cap counts attempts by receiver (its URL, query aside), so many jobs
        whose state_webhook_url names one receiver share one cap. A claim fills every free slot
        within each receiver's room, so every claimed delivery starts at once (one held back
        for its receiver's cap would wait out its whole lease). Rows of a receiver that filled
        up are passed over unleased: the claim repeats while one did, since rows of others may
        lie beyond them."""
        cap = self._policy.endpoint_concurrency
        started = 0
        while True:
            free = self._policy.concurrency - len(self._in_flight)
            if free <= 0:
                return started
            busy_before = sum(1 for n in self._per_receiver.values() if n >= cap)
            claims = await self._store.claim_deliveries(
                limit=free,
                lease_s=self._policy.timeout_s + LEASE_MARGIN_S,
                server_secret=self._policy.server_secret,
                in_flight=dict(self._per_receiver),
                per_destination=cap,
                now=self._clock.now(),
            )
            for claim in claims:
                self._per_receiver[claim.destination] += 1
                task = asyncio.create_task(self._attempt(claim))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
                started += 1
            filled = sum(1 for n in self._per_receiver.values() if n >= cap) > busy_before
            if not claims or len(claims) == free or not filled:
                return started

    async def drain(self) -> None:
        """Wait until every attempt in flight is sent and recorded (tests)."""
        while self._in_flight or (self._recorder is not None and not self._recorder.done()):
            await asyncio.wait({*self._in_flight, *([self._recorder] if self._recorder else [])})

    async def _attempt(self, claim: DeliveryClaim) -> None:
        """Send one attempt and hand its outcome to the recorder; the receiver's slot frees
        once the answer is in (the delivery stays leased until the outcome is recorded)."""
        try:
            outcome = await self._send(claim)
        except Exception:
            log.exception("delivery_attempt_failed", extra={"delivery_id": claim.delivery_id})
        else:
            self._outcomes.append((claim, outcome))
            if self._recorder is None or self._recorder.done():
                self._recorder = asyncio.create_task(self._record())
        finally:
            self._per_receiver[claim.destination] -= 1
            if self._per_receiver[claim.destination] <= 0:
                del self._per_receiver[claim.destination]
            self._wake.set()

    async def _record(self) -> None:
        """Record the outcomes gathered so far in one transaction, again while more came in
        meanwhile. Outcomes that fail to be recorded are lost; their leases lapse and the
        deliveries are sent again (at least once)."""
        while self._outcomes:
            batch, self._outcomes = self._outcomes, []
            try:
                await self._store.record_attempts(
                    batch, self._policy.disable_after_s, now=self._clock.now()
                )
            except Exception:
                log.exception("delivery_record_failed", extra={"count": len(batch)})
                continue
            succeeded = sum(1 for _, outcome in batch if outcome.succeeded)
            for label, count in (("succeeded", succeeded), ("failed", len(batch) - succeeded)):
                if count:
                    self._metrics.webhook_attempts.labels(label).inc(count)
            self._wake.set()  # a retry due at once can be claimed now

    async def _send(self, claim: DeliveryClaim) -> AttemptOutcome:
        assert self._client is not None
        now = self._clock.now()
        headers = signing.headers(claim.secrets, claim.message_id, int(now), claim.body)
        loop = asyncio.get_running_loop()
        started = loop.time()
        status: int | None = None
        error: str | None = None
        snippet: str | None = None
        retry_after: float | None = None
        try:
            async with asyncio.timeout(self._policy.timeout_s):
                answer = await self._client.post(claim.url, headers, claim.body, SNIPPET_BYTES)
            status = answer.status_code
            retry_after = retry_after_s(answer.retry_after, now)
            snippet = answer.snippet
        except BlockedAddress as exc:
            error = f"blocked: {exc}"
        except TimeoutError:
            error = f"timeout after {self._policy.timeout_s:g} s"
        except (SendError, httpx.InvalidURL) as exc:
            error = (str(exc) if isinstance(exc, SendError) else f"InvalidURL: {exc}")[:300]
        duration_ms = (loop.time() - started) * 1000
        succeeded = status is not None and 200 <= status < 300
        if status == 410:
            return AttemptOutcome(
                status, duration_ms, error, snippet, False, None, "the receiver answered 410 Gone"
            )
        delay = (
            None
            if succeeded
            else next_delay(self._policy.schedule, claim.attempt, status, retry_after, self._rng)
        )
        return AttemptOutcome(
            status_code=status,
            duration_ms=duration_ms,
            error=error,
            response_snippet=snippet,
            succeeded=succeeded,
            next_attempt_at=None if delay is None else self._clock.now() + delay,
            disable_reason=None,
        )
