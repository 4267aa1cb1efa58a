"""The dispatcher's HTTP client: one POST per attempt over keep-alive HTTP/1.1 connections,
dialled through the private-address guard.

httpcore's connections speak HTTP/1.1 (h11); this module only keeps them, as a stack of idle
connections per origin. httpx's pool (`httpcore.AsyncConnectionPool`) re-examines every
connection it holds on each request and each response, one poll(2) per idle connection, which
cost more CPU than the requests themselves with 32 connections; here a request looks at one
idle connection. No redirects, proxies or cookies, and no per-operation timeouts: the
dispatcher bounds each whole attempt with one deadline.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import httpcore
import httpx

from gateway.webhooks.guard import GuardedBackend, IPNetwork

KEEPALIVE_S = 5.0
Origin = tuple[bytes, bytes, int]


class SendError(Exception):
    """An attempt that got no HTTP answer; the message says why (no secret in it)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What an attempt got back: the status, the `Retry-After` header, the body's start."""

    status_code: int
    retry_after: str | None
    snippet: str


@lru_cache(maxsize=1024)
def _target(url: str) -> tuple[httpcore.URL, Origin, bytes]:
    """A stored URL as httpcore takes it, its origin and its Host header (parsed by httpx, as
    the API checked it; InvalidURL when it cannot be)."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise httpx.InvalidURL(f"not an http(s) URL: {url}")
    port = parsed.port
    default = 443 if parsed.scheme == "https" else 80
    target = httpcore.URL(
        scheme=parsed.raw_scheme, host=parsed.raw_host, port=port, target=parsed.raw_path
    )
    host = parsed.raw_host if port is None else b"%b:%d" % (parsed.raw_host, port)
    if parsed.raw_host.count(b":"):
        host = b"[%b]" % parsed.raw_host + (b"" if port is None else b":%d" % port)
    return target, (parsed.raw_scheme, parsed.raw_host, port or default), host


class WebhookClient:
    """Keep-alive connections per origin, at most `max_idle` idle in all (the oldest closes
    first); a connection is taken by one attempt at a time, so the dispatcher's caps on
    attempts in flight also cap the connections."""

    def __init__(
        self,
        allow: Sequence[IPNetwork],
        *,
        max_idle: int,
        keepalive_s: float = KEEPALIVE_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._backend = GuardedBackend(allow)
        self._max_idle = max_idle
        self._keepalive_s = keepalive_s
        self._ssl_context = ssl_context
        # Each stack holds (serial, connection), the most recently released last.
        self._idle: dict[Origin, list[tuple[int, httpcore.AsyncHTTP11Connection]]] = {}
        self._idle_count = 0
        self._serial = 0
        self._closed = False

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, snippet_bytes: int
    ) -> Answer:
        """POST `body` to `url` and read at most `snippet_bytes` of the answer.

        Raises httpx.InvalidURL for a URL that cannot be sent to, guard.BlockedAddress for a
        destination the guard refuses, SendError when no HTTP answer came."""
        target, origin, host = _target(url)
        connection = await self._acquire(origin)
        request = httpcore.Request(
            b"POST",
            target,
            headers=[
                (b"host", host),
                (b"content-length", b"%d" % len(body)),
                *((name.encode(), value.encode()) for name, value in headers.items()),
            ],
            content=body,
        )
        try:
            response = await connection.handle_async_request(request)
            try:
                collected = b""
                async for chunk in response.aiter_stream():
                    collected += chunk
                    if len(collected) >= snippet_bytes:
                        break
            finally:
                await response.aclose()
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException) as exc:
            await connection.aclose()
            raise SendError(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            await connection.aclose()
            raise
        if connection.is_idle():
            await self._release(origin, connection)
        retry_after = None
        for name, value in response.headers:
            if name.lower() == b"retry-after":
                retry_after = value.decode("latin-1")
        return Answer(
            response.status, retry_after, collected[:snippet_bytes].decode(errors="replace")
        )

    async def _acquire(self, origin: Origin) -> httpcore.AsyncHTTP11Connection:
        """The most recently used idle connection to `origin` still open, or a new one."""
        stack = self._idle.get(origin)
        while stack:
            _, connection = stack.pop()
            self._idle_count -= 1
            if not connection.has_expired():
                return connection
            await connection.aclose()
        scheme, host, port = origin
        try:
            stream = await self._backend.connect_tcp(host.decode("ascii"), port)
            if scheme == b"https":
                context = self._ssl_context or httpx.create_ssl_context()
                self._ssl_context = context
                stream = await stream.start_tls(context, server_hostname=host.decode("ascii"))
        except (httpcore.NetworkError, httpcore.TimeoutException, OSError) as exc:
            raise SendError(f"ConnectError: {exc}") from None
        return httpcore.AsyncHTTP11Connection(
            httpcore.Origin(scheme, host, port), stream, keepalive_expiry=self._keepalive_s
        )

    async def _release(self, origin: Origin, connection: httpcore.AsyncHTTP11Connection) -> None:
        if self._closed:
            await connection.aclose()
            return
        self._serial += 1
        self._idle.setdefault(origin, []).append((self._serial, connection))
        self._idle_count += 1
        if self._idle_count > self._max_idle:
            oldest = min(self._idle, key=lambda o: self._idle[o][0][0])
            await self._drop(oldest, 0)

    async def _drop(self, origin: Origin, index: int) -> None:
        stack = self._idle[origin]
        _, connection = stack.pop(index)
        self._idle_count -= 1
        if not stack:
            del self._idle[origin]
        await connection.aclose()

    async def prune(self) -> None:
        """Close the idle connections past their keep-alive or closed by the other side."""
        for origin in list(self._idle):
            stack = self._idle[origin]
            for index in reversed(range(len(stack))):
                if stack[index][1].has_expired():
                    await self._drop(origin, index)
                    if origin not in self._idle:
                        break

    async def aclose(self) -> None:
        self._closed = True
        stacks, self._idle, self._idle_count = list(self._idle.values()), {}, 0
        for stack in stacks:
            for _, connection in stack:
                await connection.aclose()
