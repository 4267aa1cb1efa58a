"""A real webhook receiver on loopback for tests: a Starlette app served by uvicorn in a
background thread (its own event loop, so it works beside an in-process app and beside
subprocess servers alike). It records the raw body and headers of every request and answers
with planned statuses, headers and delays.

    with Receiver() as hook:
        hook.plan(Reply(500), Reply(500))      # the next two requests; then the default (200)
        ... point a webhook at hook.url() ...
        await hook.wait_for(lambda got: len(got) >= 3)

Delays are the receiver's behaviour (a slow or hanging endpoint), never synchronisation:
`release()` (and `stop()`) end every delay at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

T = TypeVar("T")

START_TIMEOUT_S = 10.0
POLL_S = 0.01


@dataclass(frozen=True)
class Reply:
    """One planned answer: its status, headers and body, after `delay_s` (a hang)."""

    status: int = 200
    delay_s: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b"ok"


@dataclass(frozen=True)
class Received:
    """One request as it arrived (recorded before any delay)."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    arrived: float
    """`time.monotonic()` at arrival."""
    wall: float
    """`time.time()` at arrival."""
    status: int
    """The status planned for it (answered after its delay)."""

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def timestamp(self) -> int:
        return int(self.headers["webhook-timestamp"])

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """See the module docstring. Thread-safe: the test reads what the server thread records."""

    def __init__(self, default: Reply | None = None) -> None:
        self._default = default or Reply()
        self._planned: deque[Reply] = deque()
        self._received: list[Received] = []
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._released: asyncio.Event | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Receiver:
        """Listen on 127.0.0.1 (a free port) and return once the server accepts connections."""
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["POST", "GET"])])
        config = uvicorn.Config(
            app,
            log_level="error",
            lifespan="off",
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name=f"receiver-{self.port}")
        self._thread.daemon = True
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (self._server.started and self._released is not None):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the webhook receiver did not start")
            time.sleep(POLL_S)  # polling with a deadline for the thread to come up
        return self

    def _serve(self) -> None:
        assert self._server is not None and self._socket is not None
        asyncio.run(self._serve_async())

    async def _serve_async(self) -> None:
        assert self._server is not None and self._socket is not None
        self._loop = asyncio.get_running_loop()
        self._released = asyncio.Event()
        await self._server.serve(sockets=[self._socket])

    def release(self) -> None:
        """End every delay now and skip all later ones (hanging requests are answered)."""
        if self._loop is not None and self._released is not None:
            self._loop.call_soon_threadsafe(self._released.set)

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self.release()
        self._server.should_exit = True
        self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- programming -----------------------------------------------------------------------

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def plan(self, *replies: Reply) -> None:
        """Queue answers for the next requests, in order; after them the default answers."""
        with self._lock:
            self._planned.extend(replies)

    def set_default(self, reply: Reply) -> None:
        with self._lock:
            self._default = reply

    # -- reading ---------------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        """Every request so far, in arrival order."""
        with self._lock:
            return list(self._received)

    def delivered(self) -> dict[str, Received]:
        """The first request answered 2xx per `webhook-id` (a receiver's dedupe)."""
        found: dict[str, Received] = {}
        for request in self.received:
            if request.ok and "webhook-id" in request.headers:
                found.setdefault(request.webhook_id, request)
        return found

    async def wait_for(
        self, condition: Callable[[list[Received]], bool], within_s: float = 10.0
    ) -> list[Received]:
        """Poll (without blocking the caller's event loop) until `condition(received)` holds;
        AssertionError with what arrived after `within_s` seconds."""
        deadline = time.monotonic() + within_s
        while True:
            got = self.received
            if condition(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver condition not met in {within_s} s; got {got!r}")
            await asyncio.sleep(POLL_S)  # polling with a deadline

    def wait_for_sync(
        self, condition: Callable[[list[Received]], bool], within_s: float = 10.0
    ) -> list[Received]:
        """`wait_for` for synchronous tests (those driving a subprocess server)."""
        deadline = time.monotonic() + within_s
        while True:
            got = self.received
            if condition(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver condition not met in {within_s} s; got {got!r}")
            time.sleep(POLL_S)  # polling with a deadline

    # -- the server side -------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        with self._lock:
            reply = self._planned.popleft() if self._planned else self._default
            self._received.append(
                Received(
                    method=request.method,
                    path=request.url.path,
                    headers={k.lower(): v for k, v in request.headers.items()},
                    body=body,
                    arrived=time.monotonic(),
                    wall=time.time(),
                    status=reply.status,
                )
            )
        if reply.delay_s > 0 and self._released is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), timeout=reply.delay_s)
        return Response(reply.body, status_code=reply.status, headers=dict(reply.headers))


async def poll_until(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    within_s: float = 10.0,
    what: str = "condition",
) -> T:
    """Await `probe()` every few milliseconds until `done(value)` holds; return that value.
    AssertionError with the last value after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met in {within_s} s; last: {value!r}")
        await asyncio.sleep(POLL_S)  # polling with a deadline
