"""HTTP/2 connections on the proxy's own listeners, each stream an ordinary aiohttp request.

aiohttp serves HTTP/1.1 only. Its connection handler (``aiohttp_adapter``) hands a
connection here when it opens with the HTTP/2 preface (h2c by prior knowledge) or
negotiated ``h2`` by ALPN. Every stream
becomes a ``web.Request`` made by the server's own request factory and answered by its
own handler, so the Bedrock, files and admin routes, the pipeline and the observers run
unchanged; only the framing differs.

What HTTP/1.1 gets from aiohttp and the runner, an HTTP/2 connection gets here:
per-stream back-pressure both ways (flow-control windows are granted as the handler
reads, DATA is sent as the peer's window allows), cancellation of a stream's handler
when its client resets it (and of that one only), graceful drain (GOAWAY, then the open
streams finish), the keep-alive timeout, and the runner's first-request deadline. The
limits against abuse are settings of ``Http2Limits``: concurrent streams, header list
size, resets (CVE-2023-44487, "rapid reset") and control frames (SETTINGS, PING,
PRIORITY, empty DATA floods) per window of time, and reads stop while the peer does not
read what the connection owes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from h2 import events as ev

from ...wire import errors
from ...wire.http2 import (
    HOP_BY_HOP,
    ErrorCodes,
    Http2Connection,
    LiteralEncoder,
    MalformedRequest,
    ProtocolError,
    SettingCodes,
    TooManyFrames,
    configuration,
)
from .aiohttp_adapter import StreamBody, http2_request_message, new_stream_body, stream_request
from .responses import aws_response

log = logging.getLogger("bedrock_proxy.http2")


@dataclass(frozen=True, slots=True)
class Http2Limits:
    max_concurrent_streams: int = 100
    max_header_list_size: int = 64 * 1024
    stream_window: int = 256 * 1024
    connection_window: int = 4 * 1024 * 1024
    # Counted per ``abuse_window`` seconds; past either, GOAWAY ENHANCE_YOUR_CALM. Resets
    # are the client's and the ones its frames make the server send ("MadeYouReset");
    # control frames are every frame that carries no request forward (wire.http2), with
    # room added for those the server's own answers call for (window updates, acks).
    max_resets: int = 200
    max_control_frames: int = 100
    abuse_window: float = 10.0
    # How long a response may wait for the client to open its flow-control window (a
    # client that never reads, or advertises a zero window) before the stream is reset.
    send_timeout: float = 120.0


class _Stream:
    """One request's share of the connection, and the ``protocol`` its ``web.Request``
    and body reader see: flow control (aiohttp's StreamReader pauses and resumes it), the
    handler task, and a ``transport`` that is this stream, not the connection (closing or
    aborting it ends this request only)."""

    __slots__ = (
        "_reading_paused",
        "body",
        "conn",
        "stream_id",
        "task",
        "transport",
        "unacked",
        "window",
        "writer",
    )
    max_field_size = 8190
    max_headers = 128

    def __init__(self, conn: Http2ServerConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.body: StreamBody | None = None
        self.task: asyncio.Task[None] | None = None
        self.writer: Http2StreamWriter | None = None
        self.transport = _StreamTransport(conn, self)
        self._reading_paused = False
        self.unacked = 0  # bytes received but not yet granted back to the peer
        self.window: asyncio.Future[None] | None = None  # waiting for send window

    # -- what aiohttp's web.Request reads from its protocol
    @property
    def ssl_context(self) -> Any:
        return self.conn.ssl_context

    @property
    def peername(self) -> Any:
        return self.conn.peername

    @property
    def sockname(self) -> Any:
        return self.conn.sockname

    # -- what aiohttp's StreamReader calls on its protocol
    @property
    def connected(self) -> bool:
        return self.conn.transport is not None

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False
        if self.unacked:
            self.conn.grant(self.stream_id, self.unacked)
            self.unacked = 0

    def wake(self, exc: BaseException | None = None) -> None:
        waiter, self.window = self.window, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)


class _StreamTransport:
    """``request.transport`` for an HTTP/2 request: one stream of the connection."""

    __slots__ = ("_conn", "_stream")

    def __init__(self, conn: Http2ServerConnection, stream: _Stream) -> None:
        self._conn = conn
        self._stream = stream

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self._conn.transport
        return transport.get_extra_info(name, default) if transport is not None else default

    def is_closing(self) -> bool:
        return not self._conn.is_open(self._stream)

    def close(self) -> None:
        """End the response after what was written (END_STREAM)."""
        self._conn.end_now(self._stream)

    def abort(self) -> None:
        """Cut the response (RST_STREAM): the client sees it incomplete."""
        self._conn.reset(self._stream, ErrorCodes.INTERNAL_ERROR)


class Http2ServerConnection(asyncio.Protocol):
    """One HTTP/2 connection: h2's state machine, its streams, its limits."""

    def __init__(
        self,
        server: web.Server,
        limits: Http2Limits,
        keepalive_timeout: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._server = server
        self._limits = limits
        self._keepalive_timeout = keepalive_timeout
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        # Our own encoder checks what h2's outbound validation would (see LiteralEncoder);
        # the response's names are lower-case and hop-by-hop fields are dropped below.
        # Inbound fields are checked by http2_request_message (wire.http2.request_fields).
        self._h2 = Http2Connection(config=configuration(client_side=False, validate=False))
        self._h2.encoder = LiteralEncoder()  # type: ignore[assignment]
        self._flush_pending = False
        self._streams: dict[int, _Stream] = {}
        self._requests_seen = 0
        self._closing = False  # GOAWAY sent: no new streams
        self._writable: asyncio.Future[None] | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._all_done: asyncio.Future[None] | None = None
        self._window_start = 0.0
        self._resets = 0
        # What each stream's web.Request reads from its protocol (through _Stream).
        self.ssl_context: Any = None
        self.peername: Any = None
        self.sockname: Any = None
        # web.Server.connection_lost looks for a handler task; streams have their own.
        self._task_handler = None

    # ------------------------------------------------------------------ lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport  # type: ignore[assignment]
        self.ssl_context = transport.get_extra_info("sslcontext")
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        self._window_start = self._loop.time()
        limits = self._limits
        h2 = self._h2
        h2.idle_frame_budget = limits.max_control_frames
        h2.initiate_connection()
        # Our limits go out in a second SETTINGS frame and bind once the peer has
        # acknowledged it (h2 sends only acknowledged values in the first).
        h2.update_settings(
            {
                SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
                SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            }
        )
        h2.increment_flow_control_window(limits.connection_window - 65535)
        self._flush()
        self._server.connection_made(self, transport)  # type: ignore[arg-type]
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        now = self._loop.time()
        if now - self._window_start > self._limits.abuse_window:
            self._window_start, self._resets = now, 0
            self._h2.idle_frame_budget = self._limits.max_control_frames
        try:
            events = self._h2.receive_data(data)
        except TooManyFrames:
            self._too_much("control frames")
            return
        except ProtocolError as exc:
            log.info("HTTP/2 protocol error from %s: %s", self.peername, exc)
            self._end_lingering(exc)
            return
        for event in events:
            handle = self._dispatch.get(type(event))
            if handle is not None:
                handle(self, event)
            if self.transport is None:
                return
        self._flush()

    def eof_received(self) -> bool | None:
        return None  # close: a half-closed HTTP/2 connection cannot carry frames

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        gone = ConnectionResetError("the HTTP/2 connection was closed")
        for stream in list(self._streams.values()):
            self._end_stream(stream, gone)
        self._streams.clear()
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(gone)
        self._done_if_idle()
        self._server.connection_lost(self, exc)  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        # The peer is not reading what it is owed: read nothing more from it either, so
        # a PING or SETTINGS flood cannot pile up acknowledgements in memory.
        if self._writable is None:
            self._writable = self._loop.create_future()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.transport is not None:
            self.transport.resume_reading()

    # What web.Server and the runner call on each connection.
    def awaiting_first_request(self) -> bool:
        return self._requests_seen == 0

    def close(self) -> None:
        """Drain: GOAWAY now (streams already open finish), close when they have."""
        if not self._closing and self.transport is not None:
            self._closing = True
            self._h2.send_goaway(
                ErrorCodes.NO_ERROR, last_stream_id=self._h2.highest_inbound_stream_id
            )
            self._flush()
        self._close_if_done()

    def force_close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        self.close()
        if self._streams:
            self._all_done = self._loop.create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._all_done), timeout)
        for stream in list(self._streams.values()):
            if stream.task is not None:
                stream.task.cancel()
        self.force_close()

    # ------------------------------------------------------------------ events

    def _on_request(self, event: ev.RequestReceived) -> None:
        stream_id = event.stream_id
        if self._closing or self._h2.peer_went_away:
            self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        self._requests_seen += 1
        stream = self._streams[stream_id] = _Stream(self, stream_id)
        ended = event.stream_ended is not None
        try:
            message = http2_request_message(event.headers or [])
        except MalformedRequest as exc:
            log.info("malformed HTTP/2 request from %s: %s", self.peername, exc)
            del self._streams[stream_id]
            self._h2.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
            self._count_reset()  # one the client made us send
            self._after_stream()
            return
        except errors.AwsError as exc:
            self._refuse(stream, exc)
            return
        if not ended:
            stream.body = new_stream_body(stream, self._loop)
        writer = stream.writer = Http2StreamWriter(self, stream)
        stream.task = self._loop.create_task(self._serve(stream, message, writer))

    def _on_data(self, event: ev.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        size = event.flow_controlled_length
        if stream is None or stream.body is None:
            # A stream already answered or reset: its bytes still count against the
            # connection's window, which is given back.
            if size:
                self._h2.acknowledge_received_data(size, event.stream_id)
            return
        stream.body.feed_data(event.data)
        if stream._reading_paused:
            stream.unacked += size
        elif size:
            self.grant(event.stream_id, size)
        if event.stream_ended is not None:
            stream.body.feed_eof()

    def _on_stream_ended(self, event: ev.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None and stream.body is not None:
            stream.body.feed_eof()

    def _on_reset(self, event: ev.StreamReset) -> None:
        # The client's resets, and those h2 sent because of the client's frames (a window
        # update that overflows a stream's window: CVE-2025-8671, "MadeYouReset").
        self._count_reset()
        stream = self._streams.pop(event.stream_id, None)
        if stream is not None:
            self._end_stream(stream, ConnectionResetError("the client reset the stream"))
        self._after_stream()

    def _on_window(self, event: ev.WindowUpdated) -> None:
        if event.stream_id == 0:
            for waiting in self._streams.values():
                waiting.wake()
        else:
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.wake()

    def _on_goaway(self, event: ev.ConnectionTerminated) -> None:
        # The peer opens no more streams; the open ones finish (see wire.http2).
        self._closing = True
        self._close_if_done()

    _dispatch: dict[type, Any] = {
        ev.RequestReceived: _on_request,
        ev.DataReceived: _on_data,
        ev.StreamEnded: _on_stream_ended,
        ev.StreamReset: _on_reset,
        ev.WindowUpdated: _on_window,
        ev.ConnectionTerminated: _on_goaway,
    }

    # ------------------------------------------------------------------ requests

    async def _serve(self, stream: _Stream, message: Any, writer: Http2StreamWriter) -> None:
        server = self._server
        task = asyncio.current_task()
        assert task is not None
        request = stream_request(server, message, stream.body, stream, writer, task)
        try:
            try:
                response = await server.request_handler(request)
            except web.HTTPException as exc:
                response = exc
            if not response.prepared:
                await response.prepare(request)
                await response.write_eof()
            elif not writer.ended:
                await writer.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass  # reset by the client or the connection gone: nothing more to send
        except Exception:
            log.exception("error answering an HTTP/2 stream")
            if not writer.headers_sent and self.transport is not None:
                with contextlib.suppress(Exception):
                    await aws_response(errors.internal()).prepare(request)
                    await writer.write_eof()
        finally:
            if not writer.ended and self._streams.get(stream.stream_id) is stream:
                # Ended without its last frame (an error mid-stream): say so to the peer.
                with contextlib.suppress(ProtocolError):
                    self._h2.reset_stream(stream.stream_id, ErrorCodes.INTERNAL_ERROR)
                    self._flush()
            if self._streams.get(stream.stream_id) is stream:
                del self._streams[stream.stream_id]
                self._discard_unread(stream)
            self._after_stream()

    def _refuse(self, stream: _Stream, exc: errors.AwsError) -> None:
        response = exc.rest_json()
        headers = [(b":status", str(response.status).encode())]
        body = response.body
        for name, value in response.headers.items():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                headers.append((name.lower().encode(), value.encode()))
        headers.append((b"content-length", str(len(body)).encode()))
        self._h2.send_headers(stream.stream_id, headers)
        self._h2.send_data(stream.stream_id, body, end_stream=True)
        del self._streams[stream.stream_id]
        self._after_stream()

    # ------------------------------------------------------------------ one stream

    def is_open(self, stream: _Stream) -> bool:
        return self.transport is not None and self._streams.get(stream.stream_id) is stream

    def end_now(self, stream: _Stream) -> None:
        writer = stream.writer
        if not self.is_open(stream) or writer is None or writer.ended:
            return
        writer.ended = True
        with contextlib.suppress(ProtocolError):
            if not writer.headers_sent:
                self._h2.send_headers(stream.stream_id, [(b":status", b"200")])
            self._h2.end_stream(stream.stream_id)
            self._flush()

    def reset(self, stream: _Stream, code: ErrorCodes) -> None:
        """Reset one stream from our side; its handler carries on to its end."""
        if not self.is_open(stream):
            return
        del self._streams[stream.stream_id]
        with contextlib.suppress(ProtocolError):
            self._h2.reset_stream(stream.stream_id, code)
            self._flush()
        gone = ConnectionResetError("the stream was reset")
        if stream.body is not None and not stream.body.is_eof():
            stream.body.set_exception(gone)
        stream.wake(gone)
        self._discard_unread(stream)
        self._after_stream()

    # ------------------------------------------------------------------ sending

    def grant(self, stream_id: int, size: int) -> None:
        """Give ``size`` received bytes back to the peer's windows (stream and connection)."""
        if self.transport is None:
            return
        with contextlib.suppress(ProtocolError):  # the stream closed meanwhile
            self._h2.acknowledge_received_data(size, stream_id)
        self._flush()

    def send_headers(self, stream: _Stream, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.transport is None or self._streams.get(stream.stream_id) is not stream:
            raise ConnectionResetError("the HTTP/2 stream is closed")
        self._h2.send_headers(stream.stream_id, headers, end_stream=end)
        self._flush()

    async def send_data(self, stream: _Stream, data: bytes, end: bool) -> None:
        """Send ``data`` as the peer's windows allow; wait (back-pressure) when they are
        shut or the transport's buffer is full."""
        h2 = self._h2
        stream_id = stream.stream_id
        offset, total = 0, len(data)
        while True:
            if self.transport is None or self._streams.get(stream_id) is not stream:
                raise ConnectionResetError("the HTTP/2 stream is closed")
            if offset == total:
                if end:
                    h2.end_stream(stream_id)
                    self._flush()
                break
            window = min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size)
            if window <= 0:
                await self._wait_for_window(stream)
                continue
            size = min(window, total - offset)
            chunk = data if size == total else data[offset : offset + size]
            offset += size
            h2.send_data(stream_id, chunk, end_stream=end and offset == total)
            h2.idle_frame_budget += 2  # the stream's and the connection's window updates
            self._flush()
            if end and offset == total:
                break
        if self._writable is not None:
            await self._writable

    async def _wait_for_window(self, stream: _Stream) -> None:
        """Wait for the client to open its window, at most ``send_timeout``: a client that
        advertises a zero window and never opens it would hold the stream (and its
        handler) for ever. Past it the stream is reset, as a client gone."""
        stream.window = self._loop.create_future()
        try:
            await asyncio.wait_for(stream.window, self._limits.send_timeout)
        except TimeoutError:
            log.info("reset an HTTP/2 stream from %s: its window stayed shut", self.peername)
            self.reset(stream, ErrorCodes.CANCEL)
            raise ConnectionResetError("the client did not open its window in time") from None

    def _flush(self) -> None:
        """Write what h2 has queued at the end of this loop turn: a response's HEADERS and
        DATA, and the window updates of its request, go out in one write (they were three
        to five, and the writes were 5 % of an HTTP/2 request's CPU)."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        data = self._h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    # ------------------------------------------------------------------ housekeeping

    def _end_stream(self, stream: _Stream, exc: BaseException) -> None:
        if stream.body is not None and not stream.body.is_eof():
            stream.body.set_exception(exc)
        stream.wake(exc)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    def _discard_unread(self, stream: _Stream) -> None:
        """A stream answered before its body was read whole: give its window back."""
        if stream.unacked:
            self.grant(stream.stream_id, stream.unacked)
            stream.unacked = 0

    def _after_stream(self) -> None:
        if not self._streams:
            self._done_if_idle()
            self._close_if_done()
            self._arm_idle()

    def _done_if_idle(self) -> None:
        if not self._streams and self._all_done is not None and not self._all_done.done():
            self._all_done.set_result(None)

    def _close_if_done(self) -> None:
        if self._closing and not self._streams and self.transport is not None:
            self._flush_now()
            self.transport.close()

    def _arm_idle(self) -> None:
        """One lazy timer per connection (not one per request): it notes when the last
        stream ended, and when it fires checks whether the connection has been idle for
        the whole keep-alive timeout since, re-arming for the rest if not."""
        self._idle_since = self._loop.time()
        if self._idle_handle is not None or self.transport is None or self._closing:
            return
        self._idle_handle = self._loop.call_later(self._keepalive_timeout, self._idle)

    def _idle(self) -> None:
        self._idle_handle = None
        if self.transport is None or self._closing:
            return
        if self._streams:
            wait = self._keepalive_timeout  # busy: look again later
        else:
            wait = self._idle_since + self._keepalive_timeout - self._loop.time()
            if wait <= 0:
                self.close()
                return
        self._idle_handle = self._loop.call_later(wait, self._idle)

    def _count_reset(self) -> None:
        self._resets += 1
        if self._resets > self._limits.max_resets:
            self._too_much("resets")

    def _too_much(self, what: str) -> None:
        """GOAWAY ENHANCE_YOUR_CALM, then nothing more of the peer's bytes is read and the
        connection is dropped after ``abuse_window``. Closing at once made a flooding
        client connect again at once: each new connection cost more than its frames (the
        flood bench's Converse p99 went 8x its unloaded value), where a connection held
        unread costs nothing."""
        log.warning(
            "ending an HTTP/2 connection from %s: too many %s in %g s",
            self.peername,
            what,
            self._limits.abuse_window,
        )
        self._end_lingering(None, ErrorCodes.ENHANCE_YOUR_CALM)

    def _end_lingering(
        self, exc: BaseException | None, code: ErrorCodes = ErrorCodes.PROTOCOL_ERROR
    ) -> None:
        """A connection error: GOAWAY at once, then read nothing more and drop the
        connection after ``abuse_window`` (a client that errs on purpose to make the
        proxy close, and connects again, would otherwise cost a connection each time)."""
        transport = self.transport
        self._abort(exc, code, linger=True)
        if transport is not None:
            self._loop.call_later(self._limits.abuse_window, transport.abort)

    def _abort(
        self,
        exc: BaseException | None,
        code: ErrorCodes = ErrorCodes.PROTOCOL_ERROR,
        linger: bool = False,
    ) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(ProtocolError):
            self._h2.close_connection(code)
        self._flush_now()
        if linger:
            self.transport.pause_reading()
        else:
            self.transport.close()
        self.transport = None  # nothing more is read or sent; connection_lost follows
        gone = ConnectionResetError("the HTTP/2 connection was closed")
        for stream in list(self._streams.values()):
            self._end_stream(stream, gone)


class Http2StreamWriter:
    """The payload writer aiohttp's ``StreamResponse`` writes through, as HEADERS and
    DATA frames on one stream. Connection-level fields HTTP/1.1 needs are dropped."""

    buffer_size = 0
    length: int | None = 0
    on_body_write = None

    def __init__(self, conn: Http2ServerConnection, stream: _Stream) -> None:
        self._conn = conn
        self._stream = stream
        self.output_size = 0
        self.headers_sent = False
        self.ended = False

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    async def write_headers(self, status_line: str, headers: Any) -> None:
        status = status_line.split(" ", 2)[1]
        fields = [(b":status", status.encode())]
        for name, value in headers.items():
            lower = name.lower()
            if lower not in HOP_BY_HOP:
                fields.append((lower.encode(), value.encode("utf-8", "surrogateescape")))
        self._conn.send_headers(self._stream, fields, end=False)
        self.headers_sent = True

    def send_headers(self) -> None:
        pass  # headers go out when written

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if chunk:
            self.output_size += len(chunk)
            await self._conn.send_data(self._stream, bytes(chunk), end=False)

    async def write_eof(self, chunk: bytes = b"") -> None:
        if self.ended:
            return
        self.output_size += len(chunk)
        self.ended = True
        await self._conn.send_data(self._stream, chunk, end=True)

    async def drain(self) -> None:
        pass  # write() already waits for the windows and the transport

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None) -> None:
        raise RuntimeError("the proxy sends bodies as they are")

    def enable_chunking(self) -> None:
        pass  # HTTP/2 frames bodies itself
