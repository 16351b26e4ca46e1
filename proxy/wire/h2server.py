"""The server side of one HTTP/2 connection as protocol alone, in h11's shape: bytes in,
events out, frames to send queued, and the proxy's limits on what a peer may make it do.
No sockets, timers or tasks: the listener (``server.listen.http2``) owns those, feeds
``receive`` what it reads and writes what ``data_to_send`` returns.

The limits, per connection: concurrent streams and header list size (as SETTINGS),
resets (the client's, CVE-2023-44487 "rapid reset", and those its frames make the server
send, CVE-2025-8671 "MadeYouReset") and frames that carry no request forward (counted in
``http2.Http2Connection``), each per window of time. Past one, ``Overstepped``: the
listener answers GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from h2.events import Event

from .errors import RenderedError
from .http2 import (
    HOP_BY_HOP,
    ErrorCodes,
    Http2Connection,
    LiteralEncoder,
    SettingCodes,
    TooManyFrames,
    configuration,
)


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


class Overstepped(Exception):
    """The peer sent more of something than ``Http2Limits`` allows in a window."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class Http2Server:
    def __init__(self, limits: Http2Limits, now: float) -> None:
        self.limits = limits
        # Our own encoder checks what h2's outbound validation would (see LiteralEncoder);
        # response field names are lower-case and hop-by-hop ones dropped (``fields``).
        # Inbound fields are checked by the listener (wire.http2.request_fields).
        self.h2 = Http2Connection(config=configuration(client_side=False, validate=False))
        self.h2.encoder = LiteralEncoder()  # type: ignore[assignment]
        self.closing = False  # GOAWAY sent or received: no new streams
        self._window_start = now
        self._resets = 0

    def start(self) -> None:
        """The connection preface: our SETTINGS and connection window."""
        limits, h2 = self.limits, self.h2
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

    def receive(self, data: bytes, now: float) -> list[Event]:
        """The events in ``data``; ``Overstepped`` past the frame budget, h2's
        ``ProtocolError`` on a connection error."""
        if now - self._window_start > self.limits.abuse_window:
            self._window_start, self._resets = now, 0
            self.h2.idle_frame_budget = self.limits.max_control_frames
        try:
            events: list[Event] = self.h2.receive_data(data)
        except TooManyFrames:
            raise Overstepped("control frames") from None
        return events

    def count_reset(self) -> None:
        """One reset, the client's or one its frames made us send."""
        self._resets += 1
        if self._resets > self.limits.max_resets:
            raise Overstepped("resets")

    def accepts_streams(self) -> bool:
        return not self.closing and not self.h2.peer_went_away

    def refuse_stream(self, stream_id: int) -> None:
        self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)

    def malformed(self, stream_id: int) -> None:
        """A malformed request: a stream error, and a reset the client made us send."""
        self.h2.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
        self.count_reset()

    def answer(self, stream_id: int, error: RenderedError) -> None:
        """A whole answer, before any handler ran (a refusal)."""
        fields = self.fields(error.status, error.headers.items(), len(error.body))
        self.h2.send_headers(stream_id, fields)
        self.h2.send_data(stream_id, error.body, end_stream=True)

    def drain(self) -> None:
        """GOAWAY: the streams already open finish, no new one starts."""
        self.closing = True
        self.h2.send_goaway(ErrorCodes.NO_ERROR, last_stream_id=self.h2.highest_inbound_stream_id)

    def sendable(self, stream_id: int, remaining: int) -> int:
        """How many of ``remaining`` bytes the peer's windows take now (0: wait)."""
        h2 = self.h2
        window = min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size)
        return min(window, remaining) if window > 0 else 0

    def send_data(self, stream_id: int, chunk: bytes, end: bool) -> None:
        self.h2.send_data(stream_id, chunk, end_stream=end)
        self.h2.idle_frame_budget += 2  # the stream's and the connection's window updates

    @staticmethod
    def fields(
        status: int | str, headers: Iterable[tuple[str, str]], length: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        """A response's header block: lower-case names, no connection-specific fields;
        ``length`` replaces any Content-Length given."""
        block = [(b":status", str(status).encode())]
        for name, value in headers:
            lower = name.lower()
            if lower in HOP_BY_HOP or (length is not None and lower == "content-length"):
                continue
            block.append((lower.encode(), value.encode("utf-8", "surrogateescape")))
        if length is not None:
            block.append((b"content-length", str(length).encode()))
        return block
