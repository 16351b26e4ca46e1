"""HTTP/2 framing on ``h2``, with the one behaviour of it the proxy cannot use.

hyper-h2 treats a peer's GOAWAY as the end of the connection: its state machine moves
to CLOSED and it empties the outbound buffer, so every later frame on a stream that is
still open raises ``ProtocolError`` (python-hyper/h2 issue 1181, open). A GOAWAY only
says the sender will start no new streams; streams already open must finish. Node's
HTTP/2 client sends one as soon as a response's headers arrive when it closes the
session behind a request (the AWS SDK does, ``disableConcurrentStreams``), so with h2's
behaviour every streamed answer would be cut after its headers. ``Http2Connection``
records the GOAWAY as an event and leaves the connection open; sending one (a drain)
leaves it open too.
"""

from __future__ import annotations

import re
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, Event
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hpack.table import HeaderTable
from hyperframe.frame import DataFrame, HeadersFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Connection-specific fields HTTP/2 forbids (RFC 9113 8.2.2); aiohttp adds some of them
# to HTTP/1.1-shaped responses.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)

__all__ = [
    "HOP_BY_HOP",
    "PREFACE",
    "ErrorCodes",
    "Http2Connection",
    "LiteralEncoder",
    "MalformedRequest",
    "ProtocolError",
    "SettingCodes",
    "TooManyFrames",
    "configuration",
    "request_fields",
]


def configuration(*, client_side: bool, validate: bool = True) -> H2Configuration:
    """Header names and values stay bytes (the proxy decodes them as aiohttp does).
    ``validate=False`` is for the server, which checks requests with ``request_fields``
    and encodes responses with ``LiteralEncoder``."""
    return H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_inbound_headers=validate,
        normalize_inbound_headers=validate,
        validate_outbound_headers=validate,
    )


class MalformedRequest(ProtocolError):
    """A request header block RFC 9113 calls malformed: a stream error, PROTOCOL_ERROR."""


# A field name: visible ASCII without upper case, and a colon only as a pseudo-header's
# first character. A field value: no NUL, CR or LF; no leading or trailing SP or HTAB.
_NAME = re.compile(rb":?[\x21-\x39\x3b-\x40\x5b-\x7e]+\Z")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_HOP_BY_HOP = frozenset(name.encode() for name in HOP_BY_HOP)


def request_fields(
    fields: list[tuple[bytes, bytes]],
) -> tuple[dict[bytes, bytes], list[tuple[bytes, bytes]]]:
    """A request's pseudo-headers and regular fields, checked as RFC 9113 8.2 and 8.3 ask,
    with its Cookie fields joined for HTTP/1.1 (8.2.3).

    The server runs h2 with its inbound validation off and checks here instead, in one
    pass of two compiled expressions per field: h2's chain of per-character generator
    checks was a quarter of its cost for a request (100 of 360 µs on the development VM).
    The checks are h2's: names, values, TE, connection-specific fields, pseudo-header
    order, duplicates and presence, :path not empty, Host agreeing with :authority."""
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    for name, value in fields:
        if _NAME.match(name) is None:
            raise MalformedRequest(f"invalid header name {name[:64]!r}")
        if value and _BAD_VALUE.search(value) is not None:
            raise MalformedRequest(f"invalid value for header {name[:64]!r}")
        if name[0] == 0x3A:  # ":"
            if regular or name in pseudo or name not in _PSEUDO:
                raise MalformedRequest(f"misplaced, repeated or unknown {name[:64]!r}")
            pseudo[name] = value
        elif name in _HOP_BY_HOP:
            raise MalformedRequest(f"connection-specific header {name!r}")
        elif name == b"te" and value.lower() != b"trailers":
            raise MalformedRequest("TE other than trailers")
        elif name == b"cookie":
            cookies.append(value)
        else:
            regular.append((name, value))
    if cookies:
        regular.append((b"cookie", b"; ".join(cookies)))
    if b":method" not in pseudo or b":scheme" not in pseudo or not pseudo.get(b":path"):
        raise MalformedRequest("a request needs :method, :scheme and :path")
    authority = pseudo.get(b":authority")
    for name, value in regular:
        if name == b"host" and authority is not None and value != authority:
            raise MalformedRequest("Host does not match :authority")
    return pseudo, regular


# Static-table entries (RFC 7541 appendix A): whole fields, and names.
_STATIC_FIELDS = {field: i for i, field in enumerate(HeaderTable.STATIC_TABLE, 1)}
# Bytes a header value may not hold, as ints: ``bytes in bytes`` formats a TypeError first
# (it tries the needle as an int), three per header.
_CR, _LF, _NUL = 13, 10, 0
_STATIC_NAMES: dict[bytes, int] = {}
for _i, (_name, _) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC_NAMES.setdefault(_name, _i)


def _integer(value: int, prefix_bits: int, flags: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _name_prefix(name: bytes) -> bytes:
    """A literal field's start: without indexing, by static-table name or literal name."""
    index = _STATIC_NAMES.get(name)
    if index is not None:
        return _integer(index, 4, 0x00)
    return b"\x00" + _integer(len(name), 7, 0x00) + name


_NAME_PREFIXES: dict[bytes, bytes] = {}


class LiteralEncoder:
    """HPACK for the proxy's responses: static-table references and plain literals, no
    dynamic table and no Huffman coding.

    Hand-written because hpack's ``Encoder`` was 12 % of an HTTP/2 request's CPU (py-spy,
    h2load at 32 streams): it Huffman-codes every literal and searches and updates its
    dynamic table for each field, while most of a response's fields (request ids, dates,
    token counts) are new every time. This encodes a response in a few microseconds and is
    valid for any table size the peer allows: the first block sets the table to size 0.
    Values with CR, LF or NUL are refused, as h2's outbound validation would.
    """

    __slots__ = ("_sized", "header_table_size")

    def __init__(self) -> None:
        self.header_table_size = 4096  # set by h2 from the peer's SETTINGS; never used
        self._sized = False

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        out = bytearray()
        if not self._sized:
            out += b"\x20"  # dynamic table size update: 0
            self._sized = True
        names = _NAME_PREFIXES
        for name, value in headers:
            if _CR in value or _LF in value or _NUL in value:
                raise ProtocolError(f"header {name!r} has a forbidden character")
            whole = _STATIC_FIELDS.get((name, value))
            if whole is not None:
                out += _integer(whole, 7, 0x80)
                continue
            prefix = names.get(name)
            if prefix is None:
                prefix = _name_prefix(name)
                if len(names) < 1024:  # names repeat; values mostly do not
                    names[name] = prefix
            out += prefix
            size = len(value)
            out += bytes((size,)) if size < 127 else _integer(size, 7, 0x00)
            out += value
        return bytes(out)


# Frames that carry no request forward a new request brings with it, at most.
STREAM_CREDIT = 4
# A DATA frame this small, not a body's last, is a tenth of such a frame: a body sent a
# byte a frame costs h2 ~15 us a byte (a 4 KiB anonymous form, 60 ms; a 32 MiB body read
# before its signature is checked, minutes), while a bidirectional session's events,
# a few hundred bytes each at tens a second, stay far below the budget.
SMALL_DATA = 256
SMALL_DATA_PER_FRAME = 10


class TooManyFrames(ProtocolError):
    """The peer sent more frames that carry no request forward than it may: a connection
    error, ENHANCE_YOUR_CALM (h2 sends the GOAWAY on its way out of ``receive_data``)."""

    error_code = ErrorCodes.ENHANCE_YOUR_CALM


class Http2Connection(H2Connection):
    """An ``H2Connection`` on which a peer's GOAWAY ends nothing already open, and that
    counts the frames a peer sends which carry no request forward.

    Those are what a flood is made of: WINDOW_UPDATE, PING, SETTINGS, PRIORITY,
    RST_STREAM, GOAWAY and unknown frames, empty DATA (tiny DATA, a tenth each), and any
    frame on a stream that is no longer open (h2 answers some of those with a RST_STREAM
    of its own). Each costs h2 ~15 us of Python, so 100,000 WINDOW_UPDATE(+1) frames
    (1.2 MiB) held the event loop for seconds; counting the events h2 returns missed
    them, since frames on closed streams and window updates on stream 0 produce none.
    They are counted here, frame by frame, inside ``receive_data``, so one large read
    cannot run past the budget: the frame that exceeds ``idle_frame_budget`` raises
    ``TooManyFrames`` before h2 handles it. The owner sets the budget (per window of
    time) and credits it for the frames its own answers make the peer send.
    """

    peer_went_away = False
    idle_frame_budget = 1 << 62
    _small_data = 0

    def _receive_frame(self, frame: Any) -> list[Event]:
        kind = type(frame)
        if kind is DataFrame:
            data = frame.data
            idle = not data or not self._open(frame.stream_id)
            if not idle and len(data) < SMALL_DATA and "END_STREAM" not in frame.flags:
                self._small_data += 1
                idle = self._small_data % SMALL_DATA_PER_FRAME == 0
        elif kind is HeadersFrame:
            if frame.stream_id > self.highest_inbound_stream_id:
                # A new request (streams are bounded apart): its own frames besides HEADERS
                # and DATA (an empty last DATA, window updates, a reset) are its fair share.
                self.idle_frame_budget += STREAM_CREDIT
                idle = False
            else:  # a request's trailers, or a frame on a stream that has ended
                idle = not self._open(frame.stream_id)
        else:
            idle = True
        if idle:
            self.idle_frame_budget -= 1
            if self.idle_frame_budget < 0:
                raise TooManyFrames("too many frames that carry no request forward")
        events: list[Event] = super()._receive_frame(frame)
        return events

    def _open(self, stream_id: int) -> bool:
        stream = self.streams.get(stream_id)
        return stream is not None and not stream.closed

    def send_goaway(self, code: ErrorCodes, last_stream_id: int | None = None) -> None:
        """GOAWAY, with the streams already open still able to finish (RFC 9113 6.8);
        h2's ``close_connection`` would also move its state machine to CLOSED."""
        state = self.state_machine.state
        self.close_connection(code, last_stream_id=last_stream_id)
        self.state_machine.state = state

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Event]]:
        # Overrides a private h2 method (see the module docstring): no state change, no
        # cleared buffer; the caller stops opening streams and closes when all are done.
        self.peer_went_away = True
        event = ConnectionTerminated()
        event.error_code = _error_code(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def _error_code(code: int) -> ErrorCodes | int:
    try:
        return ErrorCodes(code)
    except ValueError:
        return code
