"""The streams of one HTTP/2 connection on the proxy's listener: each stream's answer sent
as the peer's flow-control windows allow (back-pressure both ways), one stream ended or
reset without touching the others, and what h2 queues written once per loop turn. The
connection's own life (events, drain, timers) is ``http2.Http2ServerConnection``'s; how it
ends when the peer errs or oversteps a limit is here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from ...wire.h2server import Http2Limits, Http2Server, Overstepped
from ...wire.http2 import ErrorCodes, ProtocolError
from .http2_stream import Stream

log = logging.getLogger("bedrock_proxy.http2")


class Http2Streams:
    def __init__(self, limits: Http2Limits, loop: asyncio.AbstractEventLoop) -> None:
        self._limits = limits
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.peername: Any = None
        self._proto = Http2Server(limits, loop.time())
        self._h2 = self._proto.h2
        self._flush_pending = False
        self._streams: dict[int, Stream] = {}
        self._writable: asyncio.Future[None] | None = None

    def _after_stream(self) -> None:
        """A stream has ended: the connection's housekeeping."""
        raise NotImplementedError

    def is_open(self, stream: Stream) -> bool:
        return self.transport is not None and self._streams.get(stream.stream_id) is stream

    def end_now(self, stream: Stream) -> None:
        writer = stream.writer
        if not self.is_open(stream) or writer is None or writer.ended:
            return
        writer.ended = True
        with contextlib.suppress(ProtocolError):
            if not writer.headers_sent:
                self._h2.send_headers(stream.stream_id, [(b":status", b"200")])
            self._h2.end_stream(stream.stream_id)
            self._flush()

    def reset(self, stream: Stream, code: ErrorCodes) -> None:
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

    def send_headers(self, stream: Stream, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.transport is None or self._streams.get(stream.stream_id) is not stream:
            raise ConnectionResetError("the HTTP/2 stream is closed")
        self._h2.send_headers(stream.stream_id, headers, end_stream=end)
        self._flush()

    async def send_data(self, stream: Stream, data: bytes, end: bool) -> None:
        """Send ``data`` as the peer's windows allow; wait (back-pressure) when they are
        shut or the transport's buffer is full."""
        proto = self._proto
        stream_id = stream.stream_id
        offset, total = 0, len(data)
        while True:
            if self.transport is None or self._streams.get(stream_id) is not stream:
                raise ConnectionResetError("the HTTP/2 stream is closed")
            if offset == total:
                if end:
                    proto.h2.end_stream(stream_id)
                    self._flush()
                break
            size = proto.sendable(stream_id, total - offset)
            if not size:
                await self._wait_for_window(stream)
                continue
            chunk = data if size == total else data[offset : offset + size]
            offset += size
            proto.send_data(stream_id, chunk, end and offset == total)
            self._flush()
            if end and offset == total:
                break
        if self._writable is not None:
            await self._writable

    async def _wait_for_window(self, stream: Stream) -> None:
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

    def _end_stream(self, stream: Stream, exc: BaseException) -> None:
        if stream.body is not None and not stream.body.is_eof():
            stream.body.set_exception(exc)
        stream.wake(exc)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    def _discard_unread(self, stream: Stream) -> None:
        """A stream answered before its body was read whole: give its window back."""
        if stream.unacked:
            self.grant(stream.stream_id, stream.unacked)
            stream.unacked = 0

    # ------------------------------------------------------------------ ending it all

    def _count(self, counted: Callable[..., None], *args: Any) -> None:
        """Something the limits count; past them, the connection ends."""
        try:
            counted(*args)
        except Overstepped as exc:
            self._too_much(exc.what)

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
