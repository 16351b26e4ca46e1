"""An HTTP/2 upstream stream on ``h2`` and asyncio, for the one operation that needs it:
InvokeModelWithBidirectionalStream, full duplex (request frames go up while response
frames come down). Event streams share connections (``h2pool``); other calls use ``http1``.

One connection per session: a bidirectional session lasts minutes and carries its own
flow control, so sharing a connection would save one handshake per session at the price
of one session's stall becoming another's. TLS is verified as ``http1`` verifies it, and
the connection is refused unless ALPN selects ``h2``. h2c (prior knowledge) is spoken only
to an ``http://`` endpoint, which only tests and VPC overrides configure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections import deque

from h2 import events as ev

from .http1 import (
    ConnectFailed,
    ConnectionClosed,
    ConnectTimeout,
    Origin,
    ReadTimeout,
)
from .http2 import ErrorCodes, Http2Connection, ProtocolError, configuration

_WINDOW = 1024 * 1024


class Http2Stream(asyncio.Protocol):
    """One request: send its body in pieces, read its response as it arrives."""

    def __init__(self) -> None:
        self._h2 = Http2Connection(config=configuration(client_side=True))
        self._transport: asyncio.Transport | None = None
        self._stream_id = 0
        self._loop = asyncio.get_running_loop()
        self._headers: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] = (
            self._loop.create_future()
        )
        self._chunks: deque[bytes] = deque()
        self._readable: asyncio.Future[None] | None = None
        self._window: asyncio.Future[None] | None = None
        self._ended = False
        self._failure: Exception | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    async def open(
        cls,
        origin: str,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        connect_timeout: float,
    ) -> Http2Stream:
        """Connect and send the request's headers; the body follows with ``send``."""
        key = Origin.parse(origin)
        loop = asyncio.get_running_loop()
        context = None
        if key.tls:
            context = h2_ssl_context()
        try:
            async with asyncio.timeout(connect_timeout):
                _, stream = await loop.create_connection(
                    cls,
                    key.host,
                    key.port,
                    ssl=context,
                    server_hostname=key.host if context is not None else None,
                )
        except TimeoutError:
            raise ConnectTimeout(
                f"Timed out connecting to the upstream service after {connect_timeout:g} s"
            ) from None
        except OSError as exc:
            raise ConnectFailed(
                f"Cannot connect to the upstream service ({type(exc).__name__})"
            ) from None
        stream._start(key, method, path, headers)
        return stream

    def _start(self, key: Origin, method: str, path: str, headers: list[tuple[str, str]]) -> None:
        transport = self._transport
        assert transport is not None
        if key.tls:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                transport.abort()
                raise ConnectFailed("The upstream service did not agree to HTTP/2 (ALPN)")
        authority = key.host if key.port == (443 if key.tls else 80) else f"{key.host}:{key.port}"
        h2 = self._h2
        h2.initiate_connection()
        h2.increment_flow_control_window(_WINDOW)
        self._stream_id = h2.get_next_available_stream_id()
        fields = [
            (":method", method),
            (":scheme", "https" if key.tls else "http"),
            (":authority", authority),
            (":path", path),
            *((name, value) for name, value in headers if name != "host"),
        ]
        h2.send_headers(self._stream_id, fields)
        self._flush()

    # ------------------------------------------------------------------ sending

    async def send(self, data: bytes) -> None:
        """Send body bytes as the server's windows allow."""
        h2 = self._h2
        view = memoryview(data)
        while view:
            self._check()
            window = min(h2.local_flow_control_window(self._stream_id), h2.max_outbound_frame_size)
            if window <= 0:
                self._window = self._loop.create_future()
                await self._window
                continue
            h2.send_data(self._stream_id, bytes(view[:window]))
            view = view[window:]
            self._flush()

    def end(self) -> None:
        """The request body is complete."""
        self._check()
        self._h2.end_stream(self._stream_id)
        self._flush()

    # ------------------------------------------------------------------ receiving

    async def response(self, timeout: float) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The response's status and headers, within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self._headers)
        except TimeoutError:
            raise ReadTimeout(
                f"The upstream service did not respond within {timeout:g} s"
            ) from None

    async def read(self, timeout: float) -> bytes:
        """The next piece of the response body; b"" at its end."""
        while not self._chunks:
            if self._ended:
                return b""
            self._check()
            self._readable = self._loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._readable
            except TimeoutError:
                raise ReadTimeout(
                    f"The upstream stream was idle for more than {timeout:g} s"
                ) from None
        data = self._chunks.popleft()
        if self._transport is not None:
            with contextlib.suppress(ProtocolError):
                self._h2.acknowledge_received_data(len(data), self._stream_id)
                self._flush()
        return data

    def reset(self) -> None:
        """Cancel the request upstream (RST_STREAM), then close the connection."""
        if self._transport is not None:
            with contextlib.suppress(ProtocolError):
                self._h2.reset_stream(self._stream_id, ErrorCodes.CANCEL)
                self._flush()
            self._transport.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # ------------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except ProtocolError as exc:
            self._fail(ConnectionClosed(f"The upstream broke the HTTP/2 protocol ({exc})"))
            return
        for event in events:
            if isinstance(event, ev.ResponseReceived) and event.stream_id == self._stream_id:
                status = int(dict(event.headers or [])[b":status"])
                if not self._headers.done():
                    self._headers.set_result((status, list(event.headers or [])))
            elif isinstance(event, ev.DataReceived) and event.stream_id == self._stream_id:
                if event.data:
                    self._chunks.append(event.data)
                    self._wake_reader()
                pad = event.flow_controlled_length - len(event.data)
                if pad:
                    self._h2.acknowledge_received_data(pad, event.stream_id)
            elif isinstance(event, ev.StreamEnded) and event.stream_id == self._stream_id:
                self._ended = True
                self._wake_reader()
            elif isinstance(event, ev.StreamReset) and event.stream_id == self._stream_id:
                self._fail(ConnectionClosed("The upstream reset the stream"))
            elif isinstance(event, ev.WindowUpdated):
                waiter, self._window = self._window, None
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif isinstance(event, ev.ConnectionTerminated) and (
                event.last_stream_id is not None and event.last_stream_id < self._stream_id
            ):
                self._fail(ConnectionClosed("The upstream refused the stream (GOAWAY)"))
        self._flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._transport = None
        if not self._ended:
            self._fail(ConnectionClosed("The upstream connection closed"))

    def _fail(self, failure: Exception) -> None:
        if self._failure is None:
            self._failure = failure
        if not self._headers.done():
            self._headers.set_exception(failure)
            self._headers.exception()  # retrieved: no "never retrieved" warning
        self._wake_reader()
        waiter, self._window = self._window, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._transport is not None:
            self._transport.close()

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._transport is None:
            raise ConnectionClosed("The upstream connection closed")

    def _wake_reader(self) -> None:
        waiter, self._readable = self._readable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)


_contexts: dict[tuple[str | None, tuple[str, ...]], ssl.SSLContext] = {}


def h2_ssl_context(protocols: tuple[str, ...] = ("h2",)) -> ssl.SSLContext:
    """Verifying as ``http1`` does (the system trust store, or ``AWS_CA_BUNDLE`` as
    botocore reads it), offering ``protocols`` by ALPN: h2 alone for a bidirectional
    session, which has no other way; h2 then http/1.1 for ``h2pool``, so a server that
    refuses a handshake without a protocol in common still answers, with http/1.1."""
    cafile = os.environ.get("AWS_CA_BUNDLE") or None
    context = _contexts.get((cafile, protocols))
    if context is None:
        context = _contexts[cafile, protocols] = ssl.create_default_context(cafile=cafile)
        context.set_alpn_protocols(list(protocols))
    return context
