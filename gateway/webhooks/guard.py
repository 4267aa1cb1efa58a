"""The private-address guard: webhooks reach only globally routable addresses, unless a CIDR
in `GATEWAY_WEBHOOK_ALLOW_NETS` opens a range.

Two checks: a literal address (or `localhost`) in a subscription's URL is refused at once with
422, and every connection is checked against the address it actually dials (a name is resolved
at connect time, so a DNS answer pointing inside cannot sneak past). Redirects are never
followed by the dispatcher, so a public URL cannot bounce a delivery inside.
"""

from __future__ import annotations

import asyncio
import ipaddress
import select
import socket
import ssl
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Ranges `is_global` lets through but that can reach inside (NAT64 and 6to4 embed IPv4).
_EMBEDDING = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("2002::/16"))


class BlockedAddress(Exception):
    """A delivery whose destination is not globally routable."""


def parse_networks(text: str | None) -> tuple[IPNetwork, ...]:
    """`GATEWAY_WEBHOOK_ALLOW_NETS`: comma-separated CIDRs; ValueError names a bad one."""
    if not text:
        return ()
    networks = []
    for part in text.split(","):
        part = part.strip()
        if part:
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"not a CIDR: {part!r}") from None
    return tuple(networks)


def _unwrap(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_allowed(address: IPAddress, allow: Sequence[IPNetwork]) -> bool:
    """Whether a delivery may connect to `address`."""
    address = _unwrap(address)
    if any(address in network for network in allow):
        return True
    if address.is_multicast or not address.is_global:
        return False
    return not any(address in network for network in _EMBEDDING)


def destination(url: str) -> str:
    """The receiver a URL names, `scheme://host:port/path` (the query aside): what the
    per-endpoint cap counts, so every job whose `state_webhook_url` names one receiver shares
    its cap, while two paths on one server stay two endpoints."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = (parts.hostname or "").lower()
    except ValueError:
        return url
    return f"{parts.scheme}://{host}:{port}{parts.path or '/'}"


def refusal(url: str, allow: Sequence[IPNetwork]) -> str | None:
    """Why a webhook URL is refused as given (a bad scheme, `localhost`, a private literal
    address), or None. Names are checked again, by address, when a delivery connects."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        httpx.URL(url)  # what the dispatcher will parse (it refuses e.g. `127.000.000.001`)
    except (ValueError, httpx.InvalidURL):
        return "not a valid URL"
    if parts.scheme not in ("http", "https") or not host:
        return "must be an http:// or https:// URL with a host"
    if parts.username or parts.password:
        return "must not carry credentials"
    if host == "localhost" or host.endswith(".localhost"):
        if any(ipaddress.ip_address("127.0.0.1") in n for n in allow):
            return None
        return "points at this machine (localhost)"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not is_allowed(address, allow):
        return f"points at a non-public address ({address})"
    return None


def _has_input(sock: Any) -> bool:
    """Whether the socket has bytes or an EOF waiting (a gone socket counts as EOF)."""
    fd = -1 if sock is None else sock.fileno()
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _SocketStream(httpcore.AsyncNetworkStream):
    """httpcore's network stream on asyncio's streams. httpcore's own (anyio) stream costs a
    cancel scope and a checkpoint per read and write; timeouts are not needed here, the
    dispatcher bounds each whole attempt."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        try:
            return await self._reader.read(max_bytes)
        except OSError as exc:
            raise httpcore.ReadError(exc) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        if self._writer.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._writer.write(buffer)
        try:
            await self._writer.drain()
        except OSError as exc:
            raise httpcore.WriteError(exc) from exc

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
    ) -> httpcore.AsyncNetworkStream:
        try:
            await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except (OSError, ssl.SSLError) as exc:
            self._writer.close()
            raise httpcore.ConnectError(exc) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # Idle, a connection has nothing to read: data or EOF means the peer closed it.
            return self._reader.at_eof() or _has_input(self._writer.get_extra_info("socket"))
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        return None


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves the host itself and dials only addresses the guard allows."""

    def __init__(self, allow: Sequence[IPNetwork]) -> None:
        self._allow = tuple(allow)

    async def _addresses(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(exc) from exc
        return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """A stream to the first allowed address `host` resolves to that accepts; BlockedAddress
        when none is allowed, httpcore.ConnectError when none accepts."""
        allowed = [a for a in await self._addresses(host, port) if is_allowed(a, self._allow)]
        if not allowed:
            raise BlockedAddress(f"{host} resolves only to non-public addresses")
        last: OSError | None = None
        local = None if local_address is None else (local_address, 0)
        for address in allowed:
            try:
                reader, writer = await asyncio.open_connection(str(address), port, local_addr=local)
            except OSError as exc:
                last = exc
            else:
                return _SocketStream(reader, writer)
        raise httpcore.ConnectError(last)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress("unix sockets are not webhook destinations")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
