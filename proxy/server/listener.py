"""One listener, two protocols: each new connection is handed to aiohttp (HTTP/1.1) or to
``http2`` before any request is read.

On TLS the choice is ALPN's (``h2`` or ``http/1.1``). On plain TCP, and on TLS without
ALPN, the first bytes decide: the 24-byte HTTP/2 preface means h2c by prior knowledge,
anything else is HTTP/1.1. The connection's transport is then given to the chosen
protocol with the bytes already read, so an HTTP/1.1 connection costs one extra call at
its start and nothing per request. A client that sends nothing is closed after the
header timeout, as a slow one is later by the runner's sweeper.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..wire.http2 import PREFACE


class ProtocolSniffer(asyncio.Protocol):
    __slots__ = ("_buffer", "_http1", "_http2", "_loop", "_timeout", "_timer", "_transport")

    def __init__(
        self,
        http1: Callable[[], asyncio.BaseProtocol],
        http2: Callable[[], asyncio.BaseProtocol],
        header_timeout: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._http1 = http1
        self._http2 = http2
        self._timeout = header_timeout
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = transport  # type: ignore[assignment]
        ssl_object = transport.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if chosen == "h2":
            self._hand_over(self._http2(), b"")
        elif chosen is not None:
            self._hand_over(self._http1(), b"")
        else:
            self._timer = self._loop.call_later(self._timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        buffered = self._buffer + data if self._buffer else data
        if buffered[: len(PREFACE)] == PREFACE[: len(buffered)]:
            if len(buffered) < len(PREFACE):
                self._buffer = buffered  # the start of a preface: wait for the rest
                return
            self._hand_over(self._http2(), buffered)
        else:
            self._hand_over(self._http1(), buffered)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def _hand_over(self, protocol: asyncio.BaseProtocol, data: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        assert transport is not None
        self._transport = None
        self._buffer = b""
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data:
            protocol.data_received(data)  # type: ignore[attr-defined]
