"""One HTTP/2 stream as aiohttp sees a request's connection: the ``protocol`` its
``web.Request`` and body reader talk to (flow control, the handler task), the
``transport`` that is this stream alone (closing or aborting it ends this request only),
and the payload writer its ``StreamResponse`` writes through as HEADERS and DATA."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ...wire.h2server import Http2Server
from ...wire.http2 import ErrorCodes
from .aiohttp_adapter import StreamBody

if TYPE_CHECKING:
    from .http2 import Http2ServerConnection


class Stream:
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

    def __init__(self, conn: Http2ServerConnection, stream: Stream) -> None:
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


class Http2StreamWriter:
    """The payload writer aiohttp's ``StreamResponse`` writes through, as HEADERS and
    DATA frames on one stream. Connection-level fields HTTP/1.1 needs are dropped."""

    buffer_size = 0
    length: int | None = 0
    on_body_write = None

    def __init__(self, conn: Http2ServerConnection, stream: Stream) -> None:
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
        self._conn.send_headers(
            self._stream, Http2Server.fields(status, headers.items()), end=False
        )
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
