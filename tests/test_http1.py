"""The upstream HTTP/1.1 client against scripted servers: the wire cases aiohttp's fake
Bedrock never produces (bodies to EOF, HEAD, interim 1xx, garbage, stalls, full backlogs)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.wire import http1
from tests.conftest import unanswered_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A loopback server running ``handler`` per connection, counting connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one request, de-chunking a chunked body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return head, body
            body += chunk[:-2]
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head, await reader.readexactly(int(line.split(b":")[1]))
    return head, b""


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Aborted transports report their loss on a later loop turn."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def pool(**kw: float) -> http1.Pool:
    kw.setdefault("connect_timeout", 2.0)
    kw.setdefault("read_timeout", 5.0)
    return http1.Pool(**kw)  # type: ignore[arg-type]


async def body_of(p: http1.Pool, method: str, origin: str, body: bytes | None = None) -> bytes:
    """One request to ``/``, read whole, its connection handed back to the pool."""
    r = await p.request(method, origin, "/", {"host": "h"}, body)
    try:
        return await r.read()
    finally:
        r.release()


async def test_responses_complete_once_and_keep_their_connection():
    """A response whose end comes with its head (HEAD, an empty body) is complete at its
    head and again at its end; its connection still goes back to the pool."""

    async def handler(reader, writer):
        for _ in range(3):
            head, _ = await read_request(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            else:
                writer.write(ok(b""))

    server = Scripted(handler)
    async with server as origin:
        p = pool()
        for method in ("HEAD", "GET", "HEAD"):
            r = await p.request(method, origin, "/", {"host": "h"})
            assert (r.status, await r.read()) == (200, b"")
            r.release()
        assert server.connections == 1
        await p.close()


async def test_keep_alive_reuses_one_connection_and_sends_exact_headers():
    heads: list[bytes] = []

    async def handler(reader, writer):
        while True:
            head, body = await read_request(reader)
            heads.append(head + body)
            writer.write(ok(body[::-1]))

    server = Scripted(handler)
    async with server as origin:
        p = pool()
        for i in range(5):
            r = await p.request(
                "POST", origin, "/a%2Fb?x=1", {"host": "h", "x-amz-date": "d"}, b"abc%d" % i
            )
            assert (r.status, await r.read()) == (200, b"%dcba" % i)
            r.release()
        await p.close()
    assert server.connections == 1
    assert heads[0] == (
        b"POST /a%2Fb?x=1 HTTP/1.1\r\nhost: h\r\nx-amz-date: d\r\ncontent-length: 4\r\n\r\nabc0"
    )


async def test_body_until_close_head_and_interim_responses():
    async def handler(reader, writer):
        head, _ = await read_request(reader)
        if head.startswith(b"HEAD"):
            # A HEAD response names the length of a body it does not send.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            head, _ = await read_request(reader)  # the same connection carries on
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after-interim"))
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
            await writer.drain()
            writer.close()

    server = Scripted(handler)
    async with server as origin:
        p = pool()
        r = await p.request("HEAD", origin, "/", {"host": "h"})
        assert (r.status, r.content_length, await r.read()) == (200, 100, b"")
        r.release()
        r = await p.request("GET", origin, "/", {"host": "h"})
        assert (r.status, await r.read()) == (200, b"after-interim")
        r.release()
        r = await p.request("GET", origin, "/", {"host": "h"})
        assert r.content_length is None
        assert await r.read() == b"until the end"
        r.release()
        await p.close()
    assert server.connections == 1


async def test_chunked_upload_and_streamed_response():
    async def handler(reader, writer):
        head, body = await read_request(reader)
        assert b"transfer-encoding: chunked" in head
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(body), 7):
            piece = body[i : i + 7]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")

    async def upload() -> AsyncIterator[bytes]:
        for part in (b"hello ", b"", b"streamed ", b"world"):
            yield part

    async with Scripted(handler) as origin:
        p = pool()
        r = await p.request("PUT", origin, "/", {"host": "h"}, upload())
        pieces = []
        while chunk := await r.readany():
            pieces.append(chunk)
        assert b"".join(pieces) == b"hello streamed world" and len(pieces) > 1
        r.release()
        await p.close()


@pytest.mark.parametrize(
    "reply, error",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", http1.ConnectionClosed),
        (b"SSH-2.0-OpenSSH\r\n\r\n", http1.ConnectionClosed),
        (b"", http1.ConnectionClosed),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nstall", http1.ReadTimeout),
        (None, http1.ReadTimeout),
        (b"HTTP/1.1 200 OK\r\nx-big: " + b"b" * 70000, http1.ConnectionClosed),
    ],
    ids=[
        "cut-mid-body",
        "not-http",
        "closed-before-reply",
        "stall-mid-body",
        "no-reply",
        "endless-header",
    ],
)
async def test_upstream_faults_raise_typed_errors(reply, error):
    async def handler(reader, writer):
        await read_request(reader)
        if reply is None:
            await asyncio.sleep(10)
        writer.write(reply)
        await writer.drain()
        if b"stall" in reply or b"x-big" in reply:
            await asyncio.sleep(10)

    async with Scripted(handler) as origin:
        p = pool(read_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(error):
            r = await p.request("GET", origin, "/", {"host": "h"})
            await r.read()
        assert time.monotonic() - started < 3
        await eventually(lambda: p.open_connections == 0)
        await p.close()


async def test_idle_timeout_replaces_first_byte_timeout_once_headers_arrive():
    async def handler(reader, writer):
        await read_request(reader)
        await asyncio.sleep(0.4)  # longer than the idle timeout, shorter than first-byte
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    async with Scripted(handler) as origin:
        p = pool(read_timeout=2.0)
        r = await p.request("POST", origin, "/", {"host": "h"}, b"x")
        r.set_read_timeout(0.2)
        assert await r.readany() == b"abc"
        started = time.monotonic()
        with pytest.raises(http1.ReadTimeout):
            await r.readany()
        assert 0.1 < time.monotonic() - started < 1.5
        r.close()
        await p.close()


async def test_connect_timeout_and_refusal():
    p = pool(connect_timeout=0.3)
    with unanswered_port() as port:
        started = time.monotonic()
        with pytest.raises(http1.ConnectTimeout):
            await p.request("GET", f"http://127.0.0.1:{port}", "/", {"host": "h"})
        assert time.monotonic() - started < 2
    with pytest.raises(http1.ConnectFailed):  # nothing listens there now
        await p.request("GET", f"http://127.0.0.1:{port}", "/", {"host": "h"})
    await p.close()


async def test_slow_reader_pauses_the_upstream_socket():
    size = 32 * 1024 * 1024
    state: dict[str, int] = {}

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await asyncio.sleep(0.5)
        state["unsent"] = writer.transport.get_write_buffer_size()
        await writer.drain()

    async with Scripted(handler) as origin:
        p = pool()
        r = await p.request("GET", origin, "/", {"host": "h"})
        await asyncio.sleep(0.8)  # not reading: the client must stop reading the socket
        received = 0
        while chunk := await r.readany():
            received += len(chunk)
        r.release()
        await p.close()
    assert received == size
    assert state["unsent"] > size // 2  # the server could not push it all into us


async def test_pool_expires_idle_connections_and_caps_per_host():
    async def handler(reader, writer):
        while True:
            await read_request(reader)
            await asyncio.sleep(0.05)
            writer.write(ok())

    server = Scripted(handler)
    async with server as origin:
        p = pool(keepalive_timeout=0.2, limit_per_host=1)

        async def one() -> bytes:
            r = await p.request("GET", origin, "/", {"host": "h"})
            try:
                return await r.read()
            finally:
                r.release()

        assert await asyncio.gather(*(one() for _ in range(4))) == [b"ok"] * 4
        assert server.connections == 1  # the cap made them queue for one connection
        # Expired after 0.2 s idle (the server would keep it open for ever).
        await eventually(lambda: p.open_connections == 0 and server.closed == 1, timeout=5)
        await p.close()


async def test_names_resolve_once_and_every_address_is_tried():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(ok())
        await writer.drain()

    loop = asyncio.get_running_loop()
    lookups = []
    real = loop.getaddrinfo

    async def counting(host, *args, **kwargs):
        lookups.append(host)
        # ::1 first: nothing listens there, so the next address must be tried.
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0))] + await real(
            "127.0.0.1", *args, **kwargs
        )

    loop.getaddrinfo = counting
    try:
        async with Scripted(handler) as origin:
            p = pool()
            named = origin.replace("127.0.0.1", "upstream.test")
            for _ in range(3):  # the server closes each connection: three new connections
                r = await p.request("GET", named, "/", {"host": "upstream.test"})
                assert await r.read() == b"ok"
                r.release()
                await eventually(lambda: p.open_connections == 0)
            await p.close()
    finally:
        del loop.getaddrinfo
    assert lookups == ["upstream.test"]


@pytest.mark.parametrize("method, retried", [("GET", True), ("POST", False)])
async def test_stale_kept_alive_connection_retries_idempotent_requests_only(method, retried):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(ok(b"first"))
        await read_request(reader)  # the next request meets a connection closing under it
        writer.transport.abort()

    server = Scripted(handler)
    async with server as origin:
        p = pool()
        assert await body_of(p, method, origin, b"x") == b"first"
        if retried:  # from a second, new connection
            assert await body_of(p, method, origin, b"x") == b"first"
        else:
            with pytest.raises(http1.ConnectionClosed):
                await p.request(method, origin, "/", {"host": "h"}, b"x")
        await p.close()
    assert server.connections == (2 if retried else 1)


@pytest.mark.parametrize("method, retried", [("GET", True), ("POST", False)])
async def test_a_connection_closing_before_its_turns_writes_go_out(method, retried):
    """Requests are written together at the end of the loop's turn (``Pool.write_soon``):
    one whose connection closes in between is not written to the closing transport, and
    fails, or goes again on a new connection, as if the upstream had closed it."""
    seen: list[bytes] = []

    async def handler(reader, writer):
        while True:
            _head, body = await read_request(reader)
            seen.append(body)
            writer.write(ok(body))

    server = Scripted(handler)
    async with server as origin:
        p = pool()
        assert await body_of(p, method, origin, b"one") == b"one"
        (connection,) = p._all
        sending = asyncio.ensure_future(p.request(method, origin, "/", {"host": "h"}, b"two"))
        await asyncio.sleep(0)  # the request is queued, its write not yet made
        assert seen == [b"one"] and p._outbox
        connection.transport.abort()
        if retried:
            r = await sending
            assert await r.read() == b"two"
            r.release()
        else:
            with pytest.raises(http1.ConnectionClosed):
                await sending
        await p.close()
    assert seen == ([b"one", b"two"] if retried else [b"one"])
    assert server.connections == (2 if retried else 1)


@pytest.mark.parametrize("method, retried", [("GET", True), ("POST", False)])
async def test_a_failed_write_fails_its_own_request_only(method, retried):
    """A write that raises at the end of the turn (uvloop raises on a closed handle)
    fails that request as a closed connection; the turn's other requests still go."""
    heads: list[bytes] = []

    async def handler(reader, writer):
        while True:
            head, body = await read_request(reader)
            heads.append(head.split(b" ")[1])
            writer.write(ok(body))

    server = Scripted(handler)
    async with server as origin:
        p = pool()
        first = [await p.request(method, origin, f"/{i}", {"host": "h"}, b"x") for i in (1, 2)]
        for r in first:
            await r.read()
            r.release()
        broken, _ = p._all

        def refuse(data: object) -> None:
            raise RuntimeError("the handler is closed")

        broken.transport.write = refuse  # type: ignore[method-assign]
        both = [p.request(method, origin, f"/{i}", {"host": "h"}, b"y") for i in (3, 4)]
        results = await asyncio.gather(*both, return_exceptions=True)
        answered = [r for r in results if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        for r in answered:
            assert await r.read() == b"y"
            r.release()
        if retried:
            assert (len(answered), server.connections) == (2, 3)
        else:
            assert len(answered) == 1
            assert [type(e) for e in failed] == [http1.ConnectionClosed]
        await p.close()
    # Only what was written arrived: both (one on a new connection), or the other one.
    assert len(heads) == (4 if retried else 3) and set(heads[2:]) <= {b"/3", b"/4"}


async def test_header_values_cannot_inject_lines():
    async with Scripted(read_request) as origin:
        p = pool()
        with pytest.raises(ValueError):
            await p.request("GET", origin, "/", {"host": "h", "x-a": "1\r\nx-b: 2"})
        await p.close()


async def test_failed_streamed_body_reports_its_own_error():
    class Refused(Exception):
        pass

    async def handler(reader, writer):
        await reader.read(1 << 20)
        await asyncio.sleep(5)

    async def upload() -> AsyncIterator[bytes]:
        yield b"first"
        raise Refused

    async with Scripted(handler) as origin:
        p = pool()
        with pytest.raises(Refused):
            await p.request("PUT", origin, "/", {"host": "h"}, upload())
        await eventually(lambda: p.open_connections == 0)
        await p.close()


async def test_a_body_larger_than_the_high_water_mark_reads_whole():
    """``read`` (job listings, batch manifests from S3) takes a body of several MiB: the
    socket paused at the high-water mark is read again as the body is taken, where a
    reader waiting for the end alone waited forever (the pause is the client's fault, so
    no read deadline fires)."""
    size = 5 * 1024 * 1024

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(ok(b"y" * size))
        await writer.drain()

    async with Scripted(handler) as origin:
        p = pool(read_timeout=2.0)
        r = await p.request("GET", origin, "/", {"host": "h"})
        async with asyncio.timeout(10):
            assert await r.read() == b"y" * size
        r.release()
        await p.close()
