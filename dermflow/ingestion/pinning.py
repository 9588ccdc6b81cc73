"""The HTTP client's network backend: connections only to addresses the guard has just checked
(DNS pinning), on streams that keep their socket.

The HTTP client never resolves names itself: each new connection resolves its host through the
guard (`HostGuard.connectable_addresses`, refusing internal addresses) and connects to those
very addresses. TLS still sends and verifies the URL's host name (httpcore takes SNI from the
request, not from the address connected to).

This module imports httpcore (httpx's engine): `dermflow.ingestion.http` imports it when it builds
a client, so importing the guard or the reader needs no HTTP library.
"""

from __future__ import annotations

import select
import socket

import httpcore

from dermflow.ingestion.guard import HostGuard


class KeptSocketStream(httpcore.AsyncNetworkStream):
    """A connection's stream that keeps its socket, for the pool's liveness checks.

    httpcore's pool asks every pooled connection whether its socket is readable (closed by the
    server) each time a request arrives or ends; anyio answers by building a dict of the
    stream's attributes each time. With 16 requests in flight to a fast server that was about a
    quarter of the CPU of a GET (bench/README.md, "What a GET costs"). The answer is the same
    poll of the same socket, which does not change during the connection's life.
    """

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self.inner = inner
        self.socket = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self.inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self.inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> KeptSocketStream:
        return KeptSocketStream(await self.inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str):
        if info == "socket":
            return self.socket
        if info == "is_readable":
            return socket_is_readable(self.socket)
        return self.inner.get_extra_info(info)


class PinnedNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects only to addresses `guard` has just checked."""

    def __init__(self, guard: HostGuard) -> None:
        self.guard = guard
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            addresses = await self.guard.connectable_addresses(host, port)
        except OSError as error:
            raise httpcore.ConnectError(f"cannot resolve {host}: {error}") from error
        last_error: Exception | None = None
        for address in addresses:
            try:
                stream = await self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                      socket_options=socket_options)
                return KeptSocketStream(stream)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last_error = error
        raise last_error or httpcore.ConnectError(f"no address to connect to for {host}")

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("the fetcher connects over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def socket_is_readable(sock: socket.socket | None) -> bool:
    """Whether `sock` has data or an end of stream waiting (an idle keep-alive connection that
    is readable was closed by its server); a missing or closed socket counts as readable."""
    descriptor = -1 if sock is None else sock.fileno()
    if descriptor < 0:
        return True
    poller = select.poll()
    poller.register(descriptor, select.POLLIN)
    return bool(poller.poll(0))
