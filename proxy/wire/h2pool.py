"""Requests over shared HTTP/2 connections upstream: the event streams' transport.

On HTTP/1.1 an open stream holds an upstream connection for its whole life: a file
descriptor beside its client's (10,000 streams needed 20,018 of a 20,000 limit) and,
against AWS, a TLS connection of ~42 KiB. Here up to ``max_streams`` requests share a
connection (fewer if the server's SETTINGS_MAX_CONCURRENT_STREAMS says so); a new one is
opened when every connection is full, and closed after ``keepalive_timeout`` idle.

Flow control keeps one slow client from stalling the others: a stream's window (1 MiB,
``http1``'s high-water mark) is opened again only as its reader takes the bytes, and the
connection's window covers every stream's, so it never runs out first.

An origin that does not agree to HTTP/2 (by ALPN on TLS, which offers h2 then
http/1.1; on ``http://``, by answering the h2c preface with anything but SETTINGS, by
closing, or by leaving it unanswered past the connect timeout) is found out before any
request is sent, and is remembered: its requests go on HTTP/1.1 (``refuses``). A stream
the server refuses unprocessed (REFUSED_STREAM, or a GOAWAY below its id) is sent once
more on another connection when its body can be sent again.

A stream whose client hung up is reset (RST_STREAM, CANCEL), which stops the model as
closing an HTTP/1.1 connection did. After ``_RESETS_PER_CONNECTION`` resets a connection
takes no new streams and closes once its own are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from h2 import events as ev
from h2.config import H2Configuration
from h2.settings import Settings
from multidict import CIMultiDict

from . import http1
from .deadlines import ReadDeadlines
from .h2client import h2_ssl_context
from .http1 import (
    MAX_HEAD,
    Body,
    ConnectFailed,
    ConnectionClosed,
    ConnectTimeout,
    Origin,
    ReadTimeout,
    UpstreamError,
    origin_of,
)
from .http2 import (
    HOP_BY_HOP,
    ErrorCodes,
    Http2Connection,
    LiteralEncoder,
    ProtocolError,
    SettingCodes,
)
from .reading import ArrivingResponse

_STREAM_WINDOW = 1024 * 1024
# Bytes read before they are acknowledged to h2 (which itself sends WINDOW_UPDATE only
# once half a window is used): one call per 64 KiB, not one per event-stream frame.
_ACK_BATCH = 64 * 1024
_DEFAULT_MAX_STREAMS = 100
_MAX_WINDOW = 2**31 - 1
# How long an origin that did not agree to HTTP/2 is not asked again (seconds).
_REFUSAL_MEMORY = 600.0
_SKIPPED = HOP_BY_HOP | {"host"}
# Streams a connection may reset (its clients hung up) before it takes no more. Servers
# close a connection that resets many streams quickly (the "rapid reset" defence; this
# proxy's own front does past 200 in 10 s), which would cut every other stream on it.
_RESETS_PER_CONNECTION = 64


class NotHttp2(ConnectFailed):
    """The origin did not agree to HTTP/2; nothing was sent. Use HTTP/1.1."""


class StreamRefused(ConnectionClosed):
    """The server refused the stream before processing it: it may be sent again."""


class Http2Pool:
    """Shared HTTP/2 connections per origin; ``request`` returns once the headers are in."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = 30.0,
        max_streams: int = _DEFAULT_MAX_STREAMS,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_streams = max_streams
        self.deadlines = ReadDeadlines()
        # Per origin, the connections taking new streams; ``_all`` has the draining too.
        self._connections: dict[Origin, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._refused: dict[Origin, float] = {}
        self._closed = False

    @property
    def open_connections(self) -> int:
        return len(self._all)

    def refuses(self, origin: str) -> bool:
        """The origin did not agree to HTTP/2 lately: send on HTTP/1.1."""
        if not self._refused:
            return False
        key = origin_of(origin)
        until = self._refused.get(key)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._refused[key]
        return False

    async def request(
        self,
        method: str,
        origin: str,
        target: str,
        headers: dict[str, str],
        body: Body = None,
        read_timeout: float | None = None,
    ) -> Http2Response:
        """Send ``method target`` with these headers (``host`` becomes ``:authority``)
        and this body. Raises ``NotHttp2`` when the origin will not speak HTTP/2."""
        key = origin_of(origin)
        timeout = self.read_timeout if read_timeout is None else read_timeout
        replayable = body is None or isinstance(body, bytes | list)
        while True:
            connection = await self._acquire(key)
            response = Http2Response(connection, timeout)
            try:
                response.start(method, target, headers, _is_empty(body))
                if not _is_empty(body):
                    await response.send_body(body)
                await response.wait_headers()
                return response
            except StreamRefused:
                response.close()
                if not replayable:
                    raise
                replayable = False  # once: a server refusing every stream is failing
            except BaseException:
                response.close()
                raise

    async def _acquire(self, key: Origin) -> _Connection:
        """A connection with room for one more stream (reserved for the caller)."""
        while True:
            if self._closed:
                raise ConnectionClosed("The upstream client is closed")
            connections = self._connections.setdefault(key, [])
            for connection in connections:
                if connection.has_room:
                    break
            else:
                connection = _Connection(self, key)
                connections.append(connection)
                self._all.add(connection)
            connection.reserve()
            if connection.ready.done() and connection.ready.exception() is None:
                return connection
            try:
                await asyncio.shield(connection.ready)
            except BaseException:
                connection.unreserve()
                raise
            if connection.reserved <= connection.capacity:
                return connection
            connection.unreserve()  # the server allows fewer streams than were waiting

    # -- bookkeeping, called by connections

    def refused(self, key: Origin) -> None:
        self._refused[key] = time.monotonic() + _REFUSAL_MEMORY

    def retire(self, connection: _Connection) -> None:
        """No new streams for ``connection``."""
        connections = self._connections.get(connection.key)
        if connections is not None and connection in connections:
            connections.remove(connection)

    def lost(self, connection: _Connection) -> None:
        self.retire(connection)
        self._all.discard(connection)

    async def close(self) -> None:
        self._closed = True
        self.deadlines.close()
        for connection in list(self._all):
            connection.abort()
        self._connections.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks


def _is_empty(body: Body) -> bool:
    return body is None or body == b"" or (isinstance(body, list) and not any(body))


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection and the streams it carries."""

    def __init__(self, pool: Http2Pool, key: Origin) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        # The proxy's request fields are lower-case names and values its front checked,
        # so outbound validation (h2's per-character generators) is off, and requests are
        # encoded by ``LiteralEncoder`` as the server front's responses are.
        h2 = self.h2 = Http2Connection(
            config=H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        h2.encoder = LiteralEncoder()  # type: ignore[assignment]
        h2.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEAD,
            },
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Http2Response] = {}
        self.reserved = 0
        self.resets = 0
        self.capacity = pool.max_streams
        self.draining = False  # GOAWAY received, or closing: no new streams
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self._writable: asyncio.Future[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._opening = self.loop.create_task(self._open())

    @property
    def has_room(self) -> bool:
        return not self.draining and self.reserved < self.capacity

    def reserve(self) -> None:
        self.reserved += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def unreserve(self) -> None:
        self.reserved = max(0, self.reserved - 1)
        if not self.reserved:
            if self.draining:
                self.close()
            elif self.transport is not None and self._idle is None:
                self._idle = self.loop.call_later(self.pool.keepalive_timeout, self._expire)

    # ------------------------------------------------------------------ opening

    async def _open(self) -> None:
        key = self.key
        pool = self.pool
        context = h2_ssl_context(("h2", "http/1.1")) if key.tls else None
        try:
            async with asyncio.timeout(pool.connect_timeout):
                await self.loop.create_connection(
                    lambda: self,
                    key.host,
                    key.port,
                    ssl=context,
                    server_hostname=key.host if context is not None else None,
                )
                transport = self.transport
                assert transport is not None
                if context is not None:
                    ssl_object = transport.get_extra_info("ssl_object")
                    if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                        raise NotHttp2("The upstream service did not agree to HTTP/2 (ALPN)")
                h2 = self.h2
                h2.initiate_connection()
                window = min(_MAX_WINDOW, _STREAM_WINDOW * pool.max_streams)
                h2.increment_flow_control_window(window - 65535)
                self.flush()
                # The server's preface (its SETTINGS): HTTP/2 is spoken, its limits known.
                await asyncio.shield(self.ready)
        except TimeoutError:
            failure: UpstreamError = ConnectTimeout(
                f"Timed out connecting to the upstream service after {pool.connect_timeout:g} s"
            )
            if self.transport is not None and not key.tls:
                # Connected, but the h2c preface went unanswered: not an HTTP/2 server.
                pool.refused(key)
                failure = NotHttp2("The upstream service did not answer the HTTP/2 preface")
        except NotHttp2 as exc:
            pool.refused(key)
            failure = exc
        except UpstreamError as exc:
            failure = exc
        except OSError as exc:
            reason = type(exc).__name__
            failure = ConnectFailed(f"Cannot connect to the upstream service ({reason})")
        else:
            if not self.reserved:
                self.unreserve()  # its callers went away meanwhile: idle from now
            return
        self._lose(failure)

    def _fail_ready(self, failure: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(failure)
            self.ready.exception()  # retrieved: waiters may all have gone

    # ------------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            if not self.ready.done():
                self._fail_ready(NotHttp2("The upstream service did not answer in HTTP/2"))
                self.pool.refused(self.key)
            self._lose(ConnectionClosed(f"The upstream broke the HTTP/2 protocol ({exc})"))
            return
        streams = self.streams
        for event in events:
            if isinstance(event, ev.DataReceived):
                response = streams.get(event.stream_id or 0)
                if response is not None:
                    response.on_data(event)
                else:  # a stream we reset: give the connection its window back
                    self.consumed(event.stream_id or 0, event.flow_controlled_length or 0)
            elif isinstance(event, ev.ResponseReceived):
                response = streams.get(event.stream_id or 0)
                if response is not None:
                    response.on_headers(list(event.headers or []))
            elif isinstance(event, ev.StreamEnded):
                response = streams.get(event.stream_id or 0)
                if response is not None:
                    response.on_end()
            elif isinstance(event, ev.StreamReset):
                response = streams.get(event.stream_id or 0)
                if response is not None:
                    response.on_reset(event.error_code or 0)
            elif isinstance(event, ev.WindowUpdated):
                if event.stream_id:
                    response = streams.get(event.stream_id)
                    if response is not None:
                        response.wake_sender()
                else:
                    for response in list(streams.values()):
                        response.wake_sender()
            elif isinstance(event, ev.RemoteSettingsChanged):
                limit = self.h2.remote_settings.max_concurrent_streams
                self.capacity = min(self.pool.max_streams, limit)
                if not self.ready.done():
                    self.ready.set_result(None)
            elif isinstance(event, ev.ConnectionTerminated):
                self._went_away(event.last_stream_id)
        self.flush()

    def _went_away(self, last_stream_id: int | None) -> None:
        """GOAWAY: no new streams here; those the server will not process are refused."""
        self.draining = True
        self.pool.retire(self)  # it closes when its streams are done
        last = last_stream_id if last_stream_id is not None else 2**31
        for stream_id, response in list(self.streams.items()):
            if stream_id > last:
                response.fail(StreamRefused("The upstream refused the stream (GOAWAY)"))
        if not self.reserved:
            self.close()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    def _wake_writer(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drained(self) -> None:
        """Wait while the transport's buffer is over its high-water mark."""
        waiter = self._writable
        if waiter is not None and self.transport is not None:
            await asyncio.shield(waiter)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        if not self.ready.done() and not self.key.tls:
            # Closed on the h2c preface, before any SETTINGS: an HTTP/1.1 server.
            self.pool.refused(self.key)
            self._fail_ready(NotHttp2("The upstream service closed on HTTP/2: it is not HTTP/2"))
        self._lose(ConnectionClosed("The upstream connection closed"))

    def _lose(self, failure: UpstreamError) -> None:
        self._fail_ready(failure)
        self.draining = True
        self.pool.lost(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        for response in list(self.streams.values()):
            response.fail(failure)
        self._wake_writer()
        if self.transport is not None:
            self.transport.abort()
            self.transport = None

    # ------------------------------------------------------------------ for streams

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def consumed(self, stream_id: int, size: int) -> None:
        """The reader took ``size`` bytes: open the windows again (h2 sends an update once
        half a window is used, so a stream of small frames sends few)."""
        if size and self.transport is not None:
            with contextlib.suppress(ProtocolError):
                self.h2.acknowledge_received_data(size, stream_id)
            self.flush()

    def reset(self, stream_id: int) -> None:
        if self.transport is not None:
            with contextlib.suppress(ProtocolError, KeyError):
                self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
            self.flush()
            self.resets += 1
            if self.resets >= _RESETS_PER_CONNECTION and not self.draining:
                self.draining = True
                self.pool.retire(self)

    def done(self, response: Http2Response) -> None:
        """A response released its stream."""
        self.streams.pop(response.stream_id, None)
        self.unreserve()

    def _expire(self) -> None:
        self._idle = None
        if not self.reserved:
            self.close()

    def close(self) -> None:
        """Say GOAWAY and close (no stream is open)."""
        self.draining = True
        self.pool.retire(self)
        if self.transport is not None:
            with contextlib.suppress(ProtocolError):
                self.h2.close_connection()
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        if not self._opening.done():
            self._opening.cancel()
        self._lose(ConnectionClosed("The upstream client is closing"))


class Http2Response(ArrivingResponse):
    """One stream: status and headers at once; the body as it arrives, by ``readany`` or
    ``read``. Its interface is ``http1.Response``'s, so the relay takes either."""

    __slots__ = (
        "_connection",
        "_request_ended",
        "_sender",
        "_unacked",
        "reserved",
        "stream_id",
    )

    def __init__(self, connection: _Connection, read_timeout: float) -> None:
        super().__init__(connection.loop, connection.pool.deadlines, read_timeout)
        self._connection = connection
        self.reserved = True  # one of the connection's stream slots, until ``close``
        self.stream_id = 0
        self._unacked = 0
        self._request_ended = False
        self._sender: asyncio.Future[None] | None = None

    # -- sending

    def start(self, method: str, target: str, headers: dict[str, str], end: bool) -> None:
        connection = self._connection
        if connection.transport is None:
            raise StreamRefused("The upstream connection closed")
        key = connection.key
        h2 = connection.h2
        stream_id = self.stream_id = h2.get_next_available_stream_id()
        authority = headers.get("host") or (
            key.host if key.port == (443 if key.tls else 80) else f"{key.host}:{key.port}"
        )
        fields = [
            (b":method", method.encode()),
            (b":scheme", b"https" if key.tls else b"http"),
            (b":authority", authority.encode()),
            (b":path", target.encode()),
        ]
        fields += [
            (name.encode(), value.encode())
            for name, value in headers.items()
            if name not in _SKIPPED
        ]
        try:
            h2.send_headers(stream_id, fields, end_stream=end)
        except ProtocolError as exc:  # e.g. the server lowered its stream limit meanwhile
            raise StreamRefused(f"The upstream connection took no new stream ({exc})") from None
        self._request_ended = end
        connection.streams[stream_id] = self
        if stream_id > 2**30:  # ids run out at 2**31: let a new connection take over
            connection.draining = True
        connection.flush()
        self._watch()

    async def send_body(self, body: Body) -> None:
        if isinstance(body, bytes):
            await self._send(body)
        elif isinstance(body, list):
            for piece in body:
                await self._send(piece)
        elif body is not None:
            await self._send_all(body)
        if self._done or self._error is not None:
            return  # answered (or failed) before the body was all sent
        connection = self._connection
        with contextlib.suppress(ProtocolError):
            connection.h2.end_stream(self.stream_id)
            self._request_ended = True
        connection.flush()

    async def _send_all(self, body: AsyncIterator[bytes]) -> None:
        async for piece in body:
            await self._send(piece)
            if self._done or self._error is not None:
                return

    async def _send(self, data: bytes) -> None:
        """As the stream's and the connection's windows allow."""
        connection = self._connection
        h2 = connection.h2
        view = memoryview(data)
        while view:
            if self._error is not None:
                raise self._error
            if self._done:
                return  # the server has answered: the rest is not wanted
            window = min(h2.local_flow_control_window(self.stream_id), h2.max_outbound_frame_size)
            if window <= 0:
                self._sender = self.loop.create_future()
                await self._sender
                continue
            try:
                h2.send_data(self.stream_id, bytes(view[:window]))
            except ProtocolError as exc:
                raise ConnectionClosed(f"The upstream stream closed ({exc})") from None
            view = view[window:]
            connection.flush()
            await connection.drained()
        self.last_activity = self.loop.time()  # the wait for the answer starts now

    def wake_sender(self) -> None:
        waiter, self._sender = self._sender, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- connection events

    def on_headers(self, fields: list[tuple[bytes, bytes]]) -> None:
        if self._headers_done:
            return
        headers: CIMultiDict[str] = CIMultiDict()
        status = 0
        for name, value in fields:
            if name[:1] == b":":
                if name == b":status":
                    status = int(value)
                continue
            headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
        self.status = status
        self.headers = headers
        length = headers.get("content-length")
        if length is not None and length.isdigit():
            self.content_length = int(length)
        self._headers_done = True
        self.last_activity = self.loop.time()
        self._wake()

    def on_data(self, event: ev.DataReceived) -> None:
        data = event.data or b""
        padding = (event.flow_controlled_length or 0) - len(data)
        if padding:
            self._connection.consumed(self.stream_id, padding)
        if self._done:
            return
        self.last_activity = self.loop.time()
        if data:
            self._chunks.append(data)
            self._wake()

    def on_end(self) -> None:
        self._done = True
        self._stop_watching()
        self._wake()
        self.wake_sender()

    def on_reset(self, code: int) -> None:
        if code == ErrorCodes.REFUSED_STREAM and not self._headers_done:
            self.fail(StreamRefused("The upstream refused the stream"))
        elif self._done:
            self.wake_sender()  # NO_ERROR after a whole response: stop sending, that is all
        else:
            self.fail(ConnectionClosed(f"The upstream reset the stream ({_code_name(code)})"))

    def fail(self, error: BaseException) -> None:
        super().fail(error)
        self.wake_sender()

    # -- timeouts

    def timed_out(self, now: float) -> None:
        if self._chunks:  # unread: the client is the slow side
            self.last_activity = now
            return
        self.fail(ReadTimeout(f"The upstream sent nothing for {self.read_timeout:g} s"))
        self._connection.reset(self.stream_id)

    # -- reading

    def _taken(self, size: int) -> None:
        unacked = self._unacked + size
        if unacked >= _ACK_BATCH:
            self._connection.consumed(self.stream_id, unacked)
            unacked = 0
        self._unacked = unacked

    # -- the end

    def finish(self, read_whole: bool) -> None:
        """The caller is done (read whole or not, the connection stays for others)."""
        self.close()

    def close(self) -> None:
        """Free the stream: one not yet ended is reset (RST_STREAM, CANCEL)."""
        if not self.reserved:
            return
        self.reserved = False
        connection = self._connection
        if self.stream_id and not (self._done and self._request_ended):
            connection.reset(self.stream_id)
        unread = self._unacked + sum(len(chunk) for chunk in self._chunks)
        self._unacked = 0
        self._chunks.clear()
        if unread:
            connection.consumed(self.stream_id, unread)  # the connection's share
        if self._error is None and not self._done:
            self._error = ConnectionClosed("The response was abandoned")
        self._stop_watching()
        connection.done(self)


# What the upstream call returns: the relay reads either alike.
UpstreamResponse = http1.Response | Http2Response


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)
