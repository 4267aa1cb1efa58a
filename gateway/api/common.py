"""What every route module needs: the wired context, bounded body reading, query parsing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway.artifacts import ArtifactLinks
from gateway.auth import Authenticator
from gateway.clock import Clock
from gateway.config import Settings
from gateway.errors import MalformedRequest, PayloadTooLarge
from gateway.metrics import Metrics
from gateway.models import IdGenerator, Page, Principal
from gateway.store.base import Changes, Signal, Store
from gateway.tokens import ContinueTokens

T = TypeVar("T")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500


@dataclass
class Context:
    """The parts `create_app` wires together; reachable from every request."""

    settings: Settings
    store: Store
    clock: Clock
    tokens: ContinueTokens
    ids: IdGenerator
    metrics: Metrics
    auth: Authenticator
    artifact_links: ArtifactLinks | None = None
    wakeup: WakeUp = field(default_factory=lambda: WakeUp())
    events: WakeUp = field(default_factory=lambda: WakeUp())
    deliveries_committed: Callable[[], None] = lambda: None

    def continue_url(self, token: str) -> str:
        return f"{self.settings.base_url}/continue/{token}"

    def publish(self, changes: Changes) -> None:
        """Tell the rest of the process, and the other replicas, what a store verb recorded:
        metrics, runners waiting in a long poll when a job became pending, the webhook
        dispatcher when deliveries were queued, event streams when events were logged."""
        self.metrics.record(changes.events)
        self.signal(changes.signals)

    def signal(self, signals: frozenset[Signal]) -> None:
        """Wake this process's waiters for `signals` and tell the other replicas."""
        if signals:
            self.wake(signals)
            self.store.announce(signals)

    def wake(self, signals: frozenset[Signal]) -> None:
        """Wake this process's waiters for what a commit here or in another replica changed."""
        if Signal.PENDING in signals:
            self.wakeup.notify()
        if Signal.DELIVERIES in signals:
            self.deliveries_committed()
        if Signal.EVENTS in signals:
            self.events.notify()

    def close(self) -> None:
        """The server is stopping: release long polls and end event streams."""
        self.wakeup.close()
        self.events.close()


class WakeUp:
    """Wakes every long poll waiting for work; fired after a commit that made a job pending.

    Each notify sets the current event and replaces it, so a waiter never misses a notify that
    came after it took its ticket, and old waiters are all released together. A long poll takes
    its ticket before it looks at the queue: a job made pending while the look is in flight
    then wakes it at once."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closed = False

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def close(self) -> None:
        """The server is stopping: release every waiter now and for good."""
        self.closed = True
        self.notify()

    def ticket(self) -> asyncio.Event:
        """What the next notify sets: take it before looking for work, then `wait` on it."""
        return self._event

    async def wait(self, ticket: asyncio.Event, timeout_s: float) -> bool:
        """True when woken since `ticket` was taken, False when `timeout_s` passed first."""
        try:
            await asyncio.wait_for(ticket.wait(), timeout=timeout_s)
        except TimeoutError:
            return False
        return True


def context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


async def authenticated(request: Request, *, admin: bool = False) -> tuple[Context, Principal]:
    """The context and the caller; a viewer token may only read (`Authenticator.require`)."""
    ctx = context(request)
    return ctx, await ctx.auth.require(request, admin=admin)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or PayloadTooLarge as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def query_int(request: Request, name: str, default: int, *, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise MalformedRequest(f"`{name}` must be an integer from {low} to {high}")
    return int(raw)


def query_limit(request: Request) -> int:
    return query_int(request, "limit", DEFAULT_LIMIT, low=1, high=MAX_LIMIT)


def page_response(page: Page[T], to_wire: Callable[[T], dict[str, Any]]) -> JSONResponse:
    """A list answer: `{"items": [...], "next_cursor": ...}`."""
    return json({"items": [to_wire(item) for item in page.items], "next_cursor": page.next_cursor})


def json(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status_code, headers=headers)
