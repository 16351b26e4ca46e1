"""A small blocking HTTP/2 client on ``h2`` for the tests that must misbehave on purpose
(resets, floods, GOAWAY mid-stream, oversized headers): no real SDK lets them."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.events
from hyperframe.frame import GoAwayFrame

from proxy.wire.http2 import Http2Connection


@dataclass
class Answer:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None


class H2Client:
    def __init__(self, base: str, *, cafile: str | None = None, timeout: float = 5.0) -> None:
        parts = urlsplit(base)
        self.authority = parts.netloc
        sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=cafile)
            context.set_alpn_protocols(["h2"])
            sock = context.wrap_socket(sock, server_hostname=parts.hostname)
            assert sock.selected_alpn_protocol() == "h2"
        self.sock = sock
        self.timeout = timeout
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        # The proxy's GOAWAY-tolerant connection: stock h2 drops open streams on a GOAWAY.
        self.conn = Http2Connection(config=config)
        self.conn.initiate_connection()
        self.answers: dict[int, Answer] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.closed_by = ""  # how the connection ended without a GOAWAY read: for failures
        # The server stopped taking our bytes (it closed): what it sent before is still read.
        self.write_failed = ""
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.write_failed:
            self.sock.sendall(data)

    def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
        body: bytes | None = None,
        end: bool = True,
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        fields = [
            (":method", method),
            (":scheme", "http"),
            (":authority", self.authority),
            (":path", path),
            *headers,
        ]
        self.conn.send_headers(stream_id, fields, end_stream=end and body is None)
        self.answers[stream_id] = Answer()
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=end)
        self.flush()
        return stream_id

    def send_all(self, stream_id: int, data: bytes, end: bool = True) -> None:
        """Send a body as the server's windows allow, reading its updates in between."""
        view = memoryview(data)
        while view:
            window = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                self.pump(lambda: self.conn.local_flow_control_window(stream_id) > 0)
                continue
            self.conn.send_data(stream_id, view[:window].tobytes())
            view = view[window:]
            self.flush()
        if end:
            self.conn.end_stream(stream_id)
            self.flush()

    def send_goaway(self) -> None:
        """A GOAWAY on the wire while our side carries on, as Node's client does (h2 would
        close its own state machine on sending one)."""
        self.sock.sendall(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())

    def pump(self, until: Callable[[], bool], timeout: float | None = None) -> None:
        """Read events until ``until()`` holds, the connection closes, or time is up."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not until() and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as exc:
                data, self.closed_by = b"", repr(exc)
            if not data:
                self.closed = True
                self.closed_by = self.closed_by or "end of stream"
                if self.write_failed:
                    self.closed_by += f" (after a failed write: {self.write_failed})"
                break
            for event in self.conn.receive_data(data):
                self._on(event)
            try:
                self.flush()
            except (BrokenPipeError, ConnectionResetError) as exc:
                # The server closed while we answered its frames: its last ones (a GOAWAY)
                # may still be on the way, so reading goes on until the connection ends.
                self.write_failed = repr(exc)

    def _on(self, event: Any) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            answer = self.answers[event.stream_id]
            answer.headers = {k: v for k, v in event.headers}
            answer.status = int(answer.headers[":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.answers[event.stream_id].body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.answers[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.answers[event.stream_id].reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    def done(self, stream_id: int) -> bool:
        answer = self.answers[stream_id]
        return answer.ended or answer.reset is not None

    def fetch(self, method: str, path: str, **kwargs: Any) -> Answer:
        stream_id = self.request(method, path, **kwargs)
        self.pump(lambda: self.done(stream_id))
        return self.answers[stream_id]

    def close(self) -> None:
        self.sock.close()
