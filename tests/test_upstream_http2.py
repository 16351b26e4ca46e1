"""Event streams on shared HTTP/2 connections upstream (``wire.h2pool``): what boto3 sees
is unchanged, the fake upstream sees fewer connections, and an upstream without HTTP/2
gets HTTP/1.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiohttp import web

from proxy.server.listen.tls import server_context
from proxy.wire import h2pool
from tests.conftest import MASTER_KEY, boto_client, start_server
from tests.fake_bedrock import FakeBedrock

MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]


def _stream_text(client, model: str = "test.slow") -> str:
    events = client.converse_stream(modelId=model, messages=MESSAGES)["stream"]
    return "".join(
        e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e
    )


def _streams(fake: FakeBedrock) -> list:
    return [r for r in fake.requests if r.operation == "ConverseStream"]


def test_concurrent_streams_share_connections_and_other_calls_stay_on_http1(start_proxy, fake):
    proxy = start_proxy(upstream_http2_streams=4)
    fake.frame_delay = 0.1  # each stream stays open ~1.4 s: all ten are open at once
    client = boto_client("bedrock-runtime", proxy)
    with ThreadPoolExecutor(10) as pool:
        texts = list(pool.map(lambda _: _stream_text(client), range(10)))
    assert texts == ["".join(f"w{i} " for i in range(10))] * 10
    streams = _streams(fake)
    assert len(streams) == 10 and {r.http_version for r in streams} == {2}
    # Ten streams at four per connection: three connections, not ten.
    assert len({r.peer_port for r in streams}) == 3
    client.converse(modelId="m", messages=MESSAGES)
    assert fake.requests[-1].http_version == 1
    # The next stream reuses a kept-alive connection.
    assert _stream_text(client, "m")
    assert _streams(fake)[-1].peer_port in {r.peer_port for r in streams}


def _raw_stream(port: int) -> socket.socket:
    """A converse-stream request whose response head and first bytes were read."""
    body = json.dumps({"messages": MESSAGES}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        (
            "POST /bedrock/model/test.slow/converse-stream HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {MASTER_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    head = b""
    while b"\r\n\r\n" not in head:
        piece = sock.recv(65536)
        assert piece, head
        head += piece
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def test_a_client_hanging_up_resets_its_stream_and_no_other(start_proxy, fake):
    proxy = start_proxy()
    port = int(proxy.base.rsplit(":", 1)[1].split("/")[0])
    fake.frame_delay = 0.1
    client = boto_client("bedrock-runtime", proxy)
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(_stream_text, client)
        leaver = _raw_stream(port)
        leaver.close()  # mid-stream: the upstream stream is reset, not run to its end
        assert whole.result(timeout=30) == "".join(f"w{i} " for i in range(10))
    for _ in range(100):  # bounded: the fake sees the reset within a few frames
        if fake.stream_disconnects:
            break
        proxy.bg.run(asyncio.sleep(0.05))
    assert fake.stream_disconnects == 1
    streams = _streams(fake)
    assert len(streams) == 2 and len({r.peer_port for r in streams}) == 1
    assert _stream_text(client, "m")  # the shared connection outlived the reset
    assert _streams(fake)[-1].peer_port == streams[0].peer_port


@pytest.mark.parametrize("tls", [False, True], ids=["h2c-refused", "alpn-http1.1-only"])
def test_an_upstream_without_http2_gets_http1(bg, start_proxy, cert_pair, monkeypatch, caplog, tls):
    """A plain aiohttp server (no HTTP/2): refused before any request is sent, the
    origin is remembered, and its streams go on HTTP/1.1."""
    fake = FakeBedrock()
    context = None
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*cert_pair)
        context.set_alpn_protocols(["http/1.1"])
        monkeypatch.setenv("AWS_CA_BUNDLE", cert_pair[0])
    runner = web.AppRunner(fake.app(), auto_decompress=False)
    bg.run(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    bg.run(site.start())
    host, port = runner.addresses[0][:2]
    url = f"{'https' if tls else 'http'}://{host}:{port}"
    try:
        proxy = start_proxy(endpoints={"bedrock-runtime": url})
        client = boto_client("bedrock-runtime", proxy)
        with caplog.at_level(logging.INFO, logger="bedrock_proxy.upstreams"):
            for _ in range(3):
                assert _stream_text(client, "m")
        streams = _streams(fake)
        assert len(streams) == 3 and {r.http_version for r in streams} == {1}
        refusals = [r for r in caplog.records if "does not speak HTTP/2" in r.getMessage()]
        assert len(refusals) == 1  # asked once, then remembered
    finally:
        bg.run(runner.cleanup())


def test_streams_over_tls_negotiate_http2(bg, start_proxy, cert_pair, monkeypatch):
    fake = FakeBedrock()
    url, runner = bg.run(start_server(fake.app(), server_context(*cert_pair)))
    monkeypatch.setenv("AWS_CA_BUNDLE", cert_pair[0])
    try:
        proxy = start_proxy(endpoints={"bedrock-runtime": url})
        client = boto_client("bedrock-runtime", proxy)
        assert _stream_text(client, "m") and _stream_text(client, "m")
        client.converse(modelId="m", messages=MESSAGES)
        assert [r.http_version for r in fake.requests] == [2, 2, 1]
        assert len({r.peer_port for r in _streams(fake)}) == 1
    finally:
        bg.run(runner.cleanup())


def test_a_large_request_body_goes_up_as_the_windows_allow(start_proxy, fake):
    """12 MiB against the fake's 256 KiB stream window: sent in pieces as WINDOW_UPDATEs
    come, byte for byte (the fake checks the SigV4 signature over the body's hash)."""
    proxy = start_proxy()
    text = "x" * (12 * 1024 * 1024)
    client = boto_client("bedrock-runtime", proxy)
    messages = [{"role": "user", "content": [{"text": text}]}]
    events = list(client.converse_stream(modelId="m", messages=messages)["stream"])
    assert "metadata" in events[-1]
    received = _streams(fake)[-1]
    assert received.http_version == 2
    assert json.loads(received.body)["messages"][0]["content"][0]["text"] == text


def test_upstream_http2_streams_zero_keeps_every_stream_on_http1(start_proxy, fake):
    proxy = start_proxy(upstream_http2_streams=0)
    assert _stream_text(boto_client("bedrock-runtime", proxy), "m")
    assert _streams(fake)[-1].http_version == 1


# ---------------------------------------------------------------------- the pool itself


@contextlib.asynccontextmanager
async def _pool_before(app: web.Application, **settings: float) -> AsyncIterator[tuple]:
    """(url, pool): ``app`` on the proxy's own listener (HTTP/2 on its port, as the fakes
    are) and an ``Http2Pool`` in front of it, both closed after."""
    url, runner = await start_server(app)
    settings = {"connect_timeout": 2, "read_timeout": 5, **settings}
    pool = h2pool.Http2Pool(**settings)  # type: ignore[arg-type]
    try:
        yield url, pool
    finally:
        await pool.close()
        await runner.cleanup()


def test_a_reader_that_stops_stalls_only_its_own_stream(bg):
    """Flow control: a stream nobody reads fills its own window (1 MiB), never the
    connection's, so the next stream on the same connection is served whole."""
    size = 3 * 1024 * 1024

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(size // 65536):
            await response.write(b"x" * 65536)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/big", big)

    async def scenario() -> None:
        async with _pool_before(app, max_streams=10) as (url, pool):
            unread = await pool.request("GET", url, "/big", {"host": url[7:]})
            await asyncio.sleep(0.2)  # the server fills that stream's window
            assert pool.open_connections == 1
            other = await pool.request("GET", url, "/big", {"host": url[7:]})
            async with asyncio.timeout(10):
                assert len(await other.read()) == size
            other.finish(True)
            async with asyncio.timeout(10):
                assert len(await unread.read()) == size  # it resumes once read
            unread.finish(True)
            assert pool.open_connections == 1

    bg.run(scenario(), timeout=30)


def test_an_idle_connection_closes_after_its_keepalive(bg):
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)

    async def scenario() -> None:
        async with _pool_before(app, keepalive_timeout=0.2) as (url, pool):
            response = await pool.request("GET", url, "/", {"host": url[7:]})
            assert response.status == 200 and await response.read() == b"hi"
            response.finish(True)
            assert pool.open_connections == 1
            for _ in range(50):  # bounded: 0.2 s keep-alive, checked every 20 ms
                if not pool.open_connections:
                    break
                await asyncio.sleep(0.02)
            assert pool.open_connections == 0

    bg.run(scenario(), timeout=30)


class _RefusingServer(asyncio.Protocol):
    """A bare HTTP/2 server (h2) that refuses a stream unprocessed the way ``mode``
    says, then answers the retry: "goaway" sends GOAWAY below the second stream of a
    connection; "refuse" resets a connection's first stream with REFUSED_STREAM."""

    def __init__(self, mode: str, log: list[list[int]]) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        self.mode = mode
        self.answered: list[int] = []
        log.append(self.answered)
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.seen = 0

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport
        self.h2.initiate_connection()
        transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        from h2 import events as ev
        from h2.errors import ErrorCodes

        for event in self.h2.receive_data(data):
            if isinstance(event, ev.StreamEnded):
                self.seen += 1
                sid = event.stream_id
                if self.mode == "goaway" and self.seen == 2:
                    self.h2.close_connection(last_stream_id=sid - 2)
                elif self.mode == "refuse" and self.seen == 1:
                    self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
                else:
                    self.h2.send_headers(sid, [(b":status", b"200")])
                    self.h2.send_data(sid, b"answered", end_stream=True)
                    self.answered.append(sid)
        self.transport.write(self.h2.data_to_send())


@pytest.mark.parametrize("mode", ["goaway", "refuse"])
def test_a_stream_refused_unprocessed_is_sent_again(bg, mode):
    async def scenario() -> list[list[int]]:
        log: list[list[int]] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _RefusingServer(mode, log), "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = h2pool.Http2Pool(connect_timeout=2, read_timeout=5)
        try:
            for _ in range(2):
                response = await pool.request("POST", url, "/x", {}, b"body")
                assert response.status == 200 and await response.read() == b"answered"
                response.finish(True)
        finally:
            await pool.close()
            server.close()
        return log

    log = bg.run(scenario(), timeout=30)
    if mode == "goaway":  # the second request went on a new connection
        assert log == [[1], [1]]
    else:  # the first was refused, then sent again on the same connection
        assert log == [[3, 5]]


def test_an_unanswered_h2c_preface_means_no_http2(bg):
    """An ``http://`` server that accepts the connection and never answers the preface
    is taken for one without HTTP/2 after the connect timeout, and remembered."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = h2pool.Http2Pool(connect_timeout=0.3, read_timeout=5)
        try:
            assert not pool.refuses(url)
            with pytest.raises(h2pool.NotHttp2):
                await pool.request("POST", url, "/x", {}, b"body")
            assert pool.refuses(url) and pool.open_connections == 0
        finally:
            await pool.close()
            server.close()

    bg.run(scenario(), timeout=30)


def test_a_connection_that_reset_64_streams_takes_no_new_ones(bg):
    """Servers close a connection that resets many streams quickly (the rapid-reset
    defence; the proxy's own front does past 200 in 10 s), which would cut its other
    streams: after 64 resets a connection is retired and the next stream opens another,
    while the streams already on it run to their end."""

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(20):
            await response.write(b"x")
            await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/slow", slow)

    async def scenario() -> tuple[int, int, bytes]:
        async with _pool_before(app) as (url, pool):
            headers = {"host": url[7:]}
            survivor = await pool.request("GET", url, "/slow", headers)
            for _ in range(64):  # clients that hang up after the first byte
                leaver = await pool.request("GET", url, "/slow", headers)
                await leaver.readany()
                leaver.close()
            before = pool.open_connections
            fresh = await pool.request("GET", url, "/slow", headers)
            after = pool.open_connections
            async with asyncio.timeout(10):
                whole = await survivor.read()
                assert await fresh.read() == b"x" * 20
            survivor.finish(True)
            fresh.finish(True)
            return before, after, whole

    before, after, whole = bg.run(scenario(), timeout=30)
    assert (before, after) == (1, 2)
    assert whole == b"x" * 20  # the retired connection's own stream was not cut
