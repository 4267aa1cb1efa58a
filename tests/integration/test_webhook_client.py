"""The dispatcher's HTTP client against raw loopback HTTP/1.1 servers: keep-alive reuse, a
connection the server closed while idle, the snippet limit, and an attempt cut by its deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway.webhooks.client import WebhookClient
from gateway.webhooks.guard import parse_networks
from tests.receivers import poll_until

LOOPBACK = parse_networks("127.0.0.0/8")


@dataclass
class RawServer:
    """Answers each request with `answer`; closes after it when `close_after`; never answers
    when `answer` is empty. Records each connection's peer port and each request line, and
    counts the connections it has closed."""

    answer: bytes
    close_after: bool = False
    peers: list[int] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)
    closed: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[1])
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.requests.append(head.split(b"\r\n", 1)[0])
                if not self.answer:
                    await asyncio.sleep(3600)
                writer.write(self.answer)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.closed += 1


Serve = Callable[["RawServer"], Awaitable["RawServer"]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []

    async def start(raw: RawServer) -> RawServer:
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        raw.port = server.sockets[0].getsockname()[1]
        return raw

    yield start
    for server in servers:
        server.close()


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def test_attempts_to_one_receiver_share_a_kept_alive_connection(serve: Serve) -> None:
    """Three sequential posts to a keep-alive receiver travel on one connection."""
    raw = await serve(RawServer(OK))
    client = WebhookClient(LOOPBACK, max_idle=4)
    try:
        answers = [
            await client.post(f"http://127.0.0.1:{raw.port}/h{i}", {"x": "1"}, b"{}", 1024)
            for i in range(3)
        ]
    finally:
        await client.aclose()
    assert [(a.status_code, a.snippet) for a in answers] == [(200, "ok")] * 3
    assert raw.requests == [b"POST /h0 HTTP/1.1", b"POST /h1 HTTP/1.1", b"POST /h2 HTTP/1.1"]
    assert len(raw.peers) == 1


async def test_a_connection_the_receiver_closed_while_idle_is_not_reused(serve: Serve) -> None:
    """A receiver that closes after each answer (without saying so) gets every post on a new
    connection, and none of them fails."""
    raw = await serve(RawServer(OK, close_after=True))
    client = WebhookClient(LOOPBACK, max_idle=4)

    async def closed() -> int:
        return raw.closed

    try:
        statuses = []
        for _ in range(3):
            answer = await client.post(f"http://127.0.0.1:{raw.port}/h", {}, b"{}", 1024)
            statuses.append(answer.status_code)
            # the receiver's close has arrived; the client must notice it
            await poll_until(closed, lambda n: n == len(statuses), what="the receiver's close")
    finally:
        await client.aclose()
    assert statuses == [200, 200, 200]
    assert len(raw.peers) == 3


async def test_the_snippet_stops_at_its_limit_and_the_retry_after_header_is_read(
    serve: Serve,
) -> None:
    """An answer longer than the snippet limit is cut there; Retry-After comes back as sent."""
    body = b"x" * 5000
    answer = b"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\ncontent-length: 5000\r\n\r\n" + body
    raw = await serve(RawServer(answer))
    client = WebhookClient(LOOPBACK, max_idle=4)
    try:
        got = await client.post(f"http://127.0.0.1:{raw.port}/h", {}, b"{}", 1024)
    finally:
        await client.aclose()
    assert (got.status_code, got.retry_after, got.snippet) == (503, "7", "x" * 1024)


async def test_an_attempt_past_its_deadline_ends_and_the_next_one_dials_afresh(
    serve: Serve,
) -> None:
    """A receiver that never answers: the deadline around the post ends it; a later post to a
    healthy receiver on the same client still works."""
    silent = await serve(RawServer(b""))
    healthy = await serve(RawServer(OK))
    client = WebhookClient(LOOPBACK, max_idle=4)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await client.post(f"http://127.0.0.1:{silent.port}/h", {}, b"{}", 1024)
        answer = await client.post(f"http://127.0.0.1:{healthy.port}/h", {}, b"{}", 1024)
    finally:
        await client.aclose()
    assert silent.requests == [b"POST /h HTTP/1.1"]
    assert answer.status_code == 200
