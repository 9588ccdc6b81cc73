"""The fetcher's SSRF guard: schemes and internal addresses refused, and connections pinned to the
addresses the guard resolved and checked (a loopback server)."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest

from dermflow.ingestion.fetch import fetch_shard
from dermflow.ingestion.guard import BlockedURL, HostGuard

from tests.support.fetch_doubles import MemoryStore, jpeg, options, row

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------ the SSRF guard


def test_guard_refuses_schemes_and_internal_addresses():
    async def resolve_to(address):
        async def resolver(host, port):
            return [address]
        return resolver

    async def check(url, allowed=(), address="93.184.216.34"):
        await HostGuard(allowed, resolver=await resolve_to(address)).check(url)

    async def reason(url, **kw):
        try:
            await check(url, **kw)
        except BlockedURL as error:
            return error.reason
        return None

    async def main():
        assert await reason("ftp://example.com/x") == "bad_scheme"
        assert await reason("file:///etc/passwd") == "bad_scheme"
        assert await reason("http:///nohost") == "bad_scheme"
        assert await reason("https://example.com/x.jpg") is None
        for internal in ("127.0.0.1", "10.1.2.3", "192.168.1.1", "169.254.169.254", "::1", "fe80::1", "0.0.0.0",
                         "::ffff:127.0.0.1", "100.64.0.1"):
            assert await reason("http://evil.example/", address=internal) == "blocked_address", internal
        assert await reason("http://127.0.0.1:8000/x") == "blocked_address"
        assert await reason("http://[::1]:8000/x") == "blocked_address"
        # Exemptions: an IP allows exactly that IP; a CIDR a network; a name that host.
        assert await reason("http://127.0.0.1:8000/x", allowed=["127.0.0.1"]) is None
        assert await reason("http://127.0.0.2:8000/x", allowed=["127.0.0.1"]) == "blocked_address"
        assert await reason("http://cdn.internal/x", allowed=["10.0.0.0/8"], address="10.9.9.9") is None
        assert await reason("http://cdn.internal/x", allowed=["cdn.internal"], address="10.9.9.9") is None
        assert await reason("http://other.internal/x", allowed=["cdn.internal"], address="10.9.9.9") == "blocked_address"

    asyncio.run(main())


# ------------------------------------------------------------------ DNS pinning (a loopback server)


class _OneImageServer:
    """A loopback HTTP server that answers every GET with one JPEG and counts the requests."""

    def __init__(self, body: bytes):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        owner = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_the_client_connects_only_to_the_addresses_the_guard_resolved_and_checked():
    body = jpeg(21)
    md5 = hashlib.md5(body).hexdigest()
    looked_up = []

    async def loopback(host, port):
        looked_up.append(host)
        return ["127.0.0.1"]

    with _OneImageServer(body) as server:
        # `images.test` is unknown to the system resolver: the fetch can only succeed if the
        # connection goes to the address the guard resolved (allowed here by IP).
        result = fetch_shard([row(md5, f"http://images.test:{server.port}/a.jpg")], MemoryStore(),
                             options(allowed_hosts=("127.0.0.1",)), resolver=loopback)
        assert (result[0]["status"], result[0]["reason"]) == ("ok", "")
        assert server.requests == 1 and looked_up.count("images.test") == 2  # the early check, the connection


def test_a_host_that_rebinds_to_an_internal_address_after_its_check_is_refused_at_connect_time():
    body = jpeg(22)
    md5 = hashlib.md5(body).hexdigest()
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])  # public when checked, loopback when connecting

    async def rebinding(host, port):
        return next(answers, ["127.0.0.1"])

    with _OneImageServer(body) as server:
        store = MemoryStore()
        result = fetch_shard([row(md5, f"http://rebind.test:{server.port}/a.jpg")], store, options(),
                             resolver=rebinding)
        assert (result[0]["status"], result[0]["reason"]) == ("failed", "blocked_address")
        assert server.requests == 0 and store.objects == {}


# ------------------------------------------------------------------ the pinned connections' liveness


def test_socket_is_readable_says_when_data_or_an_end_of_stream_waits():
    import socket

    from dermflow.ingestion.pinning import socket_is_readable

    ours, theirs = socket.socketpair()
    try:
        assert not socket_is_readable(ours)
        theirs.sendall(b"x")
        assert socket_is_readable(ours)
        ours.recv(1)
        theirs.close()
        assert socket_is_readable(ours)  # the end of stream: a server that closed a keep-alive connection
    finally:
        ours.close()
    assert socket_is_readable(ours) and socket_is_readable(None)  # closed or missing: never reused


def test_a_keep_alive_connection_the_server_closed_is_not_reused():
    """The pool checks an idle connection's socket before reusing it (through the pinned
    backend's streams); a connection the server has closed is replaced, not written to."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dermflow.ingestion.http import ReadPolicy, make_async_client, read_async

    body = jpeg(23)
    connections = []

    class ClosingHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive by default: no "Connection: close" is sent

        def log_message(self, *args):
            pass

        def do_GET(self):
            connections.append(self.client_address)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True  # then the server closes it, as an idle keep-alive timeout would

    server = ThreadingHTTPServer(("127.0.0.1", 0), ClosingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/a.jpg"

    async def main():
        guard, policy = HostGuard(("127.0.0.1",)), ReadPolicy()
        async with make_async_client(guard, policy, user_agent="test") as client:
            bodies = []
            for _ in range(3):
                bodies.append(await read_async(client, guard, url, policy))
                await asyncio.sleep(0.2)  # the server's close reaches the client's socket
            return bodies

    try:
        assert asyncio.run(main()) == [body] * 3
        assert len({port for _host, port in connections}) == 3  # a new connection each time
    finally:
        server.shutdown()
        server.server_close()


def test_a_pinned_connection_speaks_tls_and_keeps_its_socket(tmp_path):
    """https through the pinned backend: TLS is started on the kept-socket stream, the host name
    is verified against the certificate, and the socket stays the one connected."""
    import shutil
    import ssl
    import subprocess
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpcore

    from dermflow.ingestion.pinning import KeptSocketStream, PinnedNetworkBackend

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=images.test", "-addext", "subjectAltName=DNS:images.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    body = jpeg(24)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def loopback(host, port):
        return ["127.0.0.1"]

    async def main():
        backend = PinnedNetworkBackend(HostGuard(("127.0.0.1",), resolver=loopback))
        async with httpcore.AsyncConnectionPool(ssl_context=ssl.create_default_context(cafile=str(cert)),
                                                network_backend=backend) as pool:
            response = await pool.request("GET", f"https://images.test:{server.server_address[1]}/a.jpg")
            stream = response.extensions["network_stream"]
            assert isinstance(stream, KeptSocketStream)  # the TLS stream is wrapped again
            return response.content, stream.get_extra_info("ssl_object"), stream.get_extra_info("socket")

    try:
        content, ssl_object, sock = asyncio.run(main())
        assert content == body
        assert ssl_object is not None and ssl_object.server_hostname == "images.test"
        assert sock is not None and sock.fileno() == -1  # the connection's own socket, closed with the pool
    finally:
        server.shutdown()
        server.server_close()
