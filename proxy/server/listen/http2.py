"""HTTP/2 connections on the proxy's own listeners, each stream an ordinary aiohttp request.

aiohttp serves HTTP/1.1 only. Its connection handler (``aiohttp_adapter``) hands a
connection here when it opens with the HTTP/2 preface (h2c by prior knowledge) or
negotiated ``h2`` by ALPN. Every stream becomes a ``web.Request`` made by the server's
own request factory and answered by its own handler, so every route, the pipeline and
the observers run unchanged; only the framing differs.

What HTTP/1.1 gets from aiohttp and the runner, an HTTP/2 connection gets here and in
``http2_streams``: back-pressure both ways, cancellation of a stream's handler when its
client resets it (that one only), graceful drain (GOAWAY, then the open streams finish),
the keep-alive timeout and the first-request deadline. The protocol and its limits
against abuse are ``wire.h2server``'s; reads stop while the peer does not read what the
connection owes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web
from h2 import events as ev

from ...wire import errors
from ...wire.h2server import Http2Limits, Overstepped
from ...wire.http2 import ErrorCodes, MalformedRequest, ProtocolError
from .aiohttp_adapter import http2_request_message, new_stream_body, stream_request
from .http2_stream import Http2StreamWriter, Stream
from .http2_streams import Http2Streams
from .responses import aws_response

log = logging.getLogger("bedrock_proxy.http2")


class Http2ServerConnection(Http2Streams, asyncio.Protocol):
    """One HTTP/2 connection: h2's state machine, its streams, its limits."""

    def __init__(
        self,
        server: web.Server,
        limits: Http2Limits,
        keepalive_timeout: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(limits, loop)
        self._server = server
        self._keepalive_timeout = keepalive_timeout
        self._requests_seen = 0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._all_done: asyncio.Future[None] | None = None
        # What each stream's web.Request reads from its protocol (through Stream).
        self.ssl_context: Any = None
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
        self._proto.start()
        self._flush()
        self._server.connection_made(self, transport)  # type: ignore[arg-type]
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._proto.receive(data, self._loop.time())
        except Overstepped as exc:
            self._too_much(exc.what)
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
        if not self._proto.closing and self.transport is not None:
            self._proto.drain()
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
        if not self._proto.accepts_streams():
            self._proto.refuse_stream(stream_id)
            return
        self._requests_seen += 1
        stream = self._streams[stream_id] = Stream(self, stream_id)
        ended = event.stream_ended is not None
        try:
            message = http2_request_message(event.headers or [])
        except MalformedRequest as exc:
            log.info("malformed HTTP/2 request from %s: %s", self.peername, exc)
            del self._streams[stream_id]
            self._after_stream()
            self._count(self._proto.malformed, stream_id)
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
        stream = self._streams.pop(event.stream_id, None)
        if stream is not None:
            self._end_stream(stream, ConnectionResetError("the client reset the stream"))
        self._after_stream()
        self._count(self._proto.count_reset)

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
        self._proto.closing = True
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

    async def _serve(self, stream: Stream, message: Any, writer: Http2StreamWriter) -> None:
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

    def _refuse(self, stream: Stream, exc: errors.AwsError) -> None:
        self._proto.answer(stream.stream_id, exc.rest_json())
        del self._streams[stream.stream_id]
        self._after_stream()

    # ------------------------------------------------------------------ housekeeping

    def _after_stream(self) -> None:
        if not self._streams:
            self._done_if_idle()
            self._close_if_done()
            self._arm_idle()

    def _done_if_idle(self) -> None:
        if not self._streams and self._all_done is not None and not self._all_done.done():
            self._all_done.set_result(None)

    def _close_if_done(self) -> None:
        if self._proto.closing and not self._streams and self.transport is not None:
            self._flush_now()
            self.transport.close()

    def _arm_idle(self) -> None:
        """One lazy timer per connection (not one per request): it notes when the last
        stream ended, and when it fires checks whether the connection has been idle for
        the whole keep-alive timeout since, re-arming for the rest if not."""
        self._idle_since = self._loop.time()
        if self._idle_handle is not None or self.transport is None or self._proto.closing:
            return
        self._idle_handle = self._loop.call_later(self._keepalive_timeout, self._idle)

    def _idle(self) -> None:
        self._idle_handle = None
        if self.transport is None or self._proto.closing:
            return
        if self._streams:
            wait = self._keepalive_timeout  # busy: look again later
        else:
            wait = self._idle_since + self._keepalive_timeout - self._loop.time()
            if wait <= 0:
                self.close()
                return
        self._idle_handle = self._loop.call_later(wait, self._idle)
