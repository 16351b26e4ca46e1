"""The AWS event-stream wire format (application/vnd.amazon.eventstream).

A frame is: total length (4) | headers length (4) | prelude CRC32 (4) | headers | payload |
message CRC32 (4), all big-endian. The proxy forwards frames untouched; it only needs to know
where each one ends (so a cut never leaves half a frame before an exception frame), that
each is whole (both CRCs), to read headers and payloads for metering, and to write its own
exception frames.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

CONTENT_TYPE = "application/vnd.amazon.eventstream"

_PRELUDE = struct.Struct(">II")
_PRELUDE_LEN = 12
_CRC_LEN = 4
_MIN_FRAME = _PRELUDE_LEN + _CRC_LEN
# Same ceiling botocore enforces: anything larger is corruption, not a frame.
MAX_FRAME = 16 * 1024 * 1024 + _MIN_FRAME

_STRING = 7
_BYTES = 6


class EventStreamError(ValueError):
    """The bytes are not a valid event stream; ``valid`` whole frames' bytes came first."""

    def __init__(self, message: str, valid: int = 0) -> None:
        super().__init__(message)
        self.valid = valid


@dataclass(slots=True)
class Frame:
    headers: dict[str, object]
    payload: bytes


def encode_frame(headers: dict[str, str | bytes], payload: bytes) -> bytes:
    """One frame with string (or bytes) headers, CRCs included."""
    parts: list[bytes] = []
    for name, value in headers.items():
        raw_name = name.encode()
        if isinstance(value, bytes):
            parts.append(struct.pack(">B", len(raw_name)) + raw_name)
            parts.append(struct.pack(">BH", _BYTES, len(value)) + value)
        else:
            raw_value = value.encode()
            parts.append(struct.pack(">B", len(raw_name)) + raw_name)
            parts.append(struct.pack(">BH", _STRING, len(raw_value)) + raw_value)
    return encode_raw(b"".join(parts), payload)


def encode_raw(header_bytes: bytes, payload: bytes) -> bytes:
    """One frame from headers already encoded (any header types), CRCs included."""
    total = _PRELUDE_LEN + len(header_bytes) + len(payload) + _CRC_LEN
    prelude = _PRELUDE.pack(total, len(header_bytes))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + header_bytes + payload
    return body + struct.pack(">I", zlib.crc32(body))


def exception_frame(exception_type: str, message: str) -> bytes:
    """The frame AWS sends when a stream fails after it started; SDKs raise on it."""
    return encode_frame(
        {
            ":message-type": "exception",
            ":exception-type": exception_type,
            ":content-type": "application/json",
        },
        orjson.dumps({"message": message}),
    )


def error_frame(code: str, message: str) -> bytes:
    """The frame AWS sends for an error the stream's model does not name: SDKs read its
    ``:error-code`` and ``:error-message`` (botocore raises an EventStreamError with that
    code; an unmodelled ``exception`` frame would come out with an empty one)."""
    return encode_frame(
        {":message-type": "error", ":error-code": code, ":error-message": message}, b""
    )


class FrameSplitter:
    """Cuts a byte stream at frame boundaries without copying frame contents.

    ``feed`` returns how many of the buffered bytes form complete frames, so the caller
    can forward exactly those and keep the rest until more arrives.
    """

    __slots__ = ("_buf", "broken")

    def __init__(self) -> None:
        self._buf = bytearray()
        # Set when a bad frame followed good ones: those are returned first, and the error
        # is raised by the next call (the caller checks ``broken`` after passing them on).
        self.broken: EventStreamError | None = None

    def feed(self, data: bytes) -> bytes:
        """Add data; return the complete frames now available, as one bytes object."""
        if self.broken is not None:
            raise self.broken
        buf = self._buf
        if not buf:
            end = self._prefix(data)
            if end == len(data):
                return data
            buf += memoryview(data)[end:]
            return data[:end]
        buf += data
        end = self._prefix(buf)
        if end == 0:
            return b""
        out = bytes(buf[:end])
        del buf[:end]
        return out

    def _prefix(self, data: bytes | bytearray) -> int:
        try:
            return _complete_prefix(data)
        except EventStreamError as exc:
            if not exc.valid:
                raise
            self.broken = exc
            return exc.valid

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still held back."""
        return len(self._buf)


_CRC = struct.Struct(">I")


def _complete_prefix(data: bytes | bytearray) -> int:
    """Length of the longest prefix of ``data`` made of whole frames, each checked as
    botocore checks it: a frame whose prelude or message CRC is wrong is corruption, and
    relayed it would make the SDK raise ``ChecksumMismatch`` (not a ``ClientError``)
    after the proxy had counted a success. zlib's CRC runs at memory speed: ~1 us for a
    typical 1 KiB frame, on bytes the meter reads anyway."""
    pos = 0
    size = len(data)
    crc32 = zlib.crc32
    # Released on the way out: the caller resizes its bytearray next.
    with memoryview(data) as view:
        while size - pos >= _PRELUDE_LEN:
            total, _ = _PRELUDE.unpack_from(data, pos)
            if crc32(view[pos : pos + 8]) != _CRC.unpack_from(data, pos + 8)[0]:
                raise EventStreamError("prelude CRC mismatch", pos)
            if total < _MIN_FRAME or total > MAX_FRAME:
                raise EventStreamError(f"invalid frame length {total}", pos)
            if size - pos < total:
                break
            end = pos + total
            if crc32(view[pos : end - _CRC_LEN]) != _CRC.unpack_from(data, end - _CRC_LEN)[0]:
                raise EventStreamError("message CRC mismatch", pos)
            pos = end
    return pos


def iter_frames(data: bytes | bytearray | memoryview) -> Iterator[Frame]:
    """Decode whole frames, checking both CRCs (for tests and metering)."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        if len(view) - pos < _MIN_FRAME:
            raise EventStreamError("truncated frame")
        total, headers_len = _PRELUDE.unpack_from(view, pos)
        if total < _MIN_FRAME or total > MAX_FRAME or len(view) - pos < total:
            raise EventStreamError("truncated or oversized frame")
        (prelude_crc,) = struct.unpack_from(">I", view, pos + 8)
        if zlib.crc32(view[pos : pos + 8]) != prelude_crc:
            raise EventStreamError("prelude CRC mismatch", pos)
        (message_crc,) = struct.unpack_from(">I", view, pos + total - 4)
        if zlib.crc32(view[pos : pos + total - 4]) != message_crc:
            raise EventStreamError("message CRC mismatch")
        header_start = pos + _PRELUDE_LEN
        headers = decode_headers(view[header_start : header_start + headers_len])
        payload = bytes(view[header_start + headers_len : pos + total - 4])
        yield Frame(headers, payload)
        pos += total


def decode_headers(view: memoryview) -> dict[str, object]:
    headers: dict[str, object] = {}
    pos = 0
    while pos < len(view):
        name_len = view[pos]
        name = bytes(view[pos + 1 : pos + 1 + name_len]).decode()
        pos += 1 + name_len
        kind = view[pos]
        pos += 1
        if kind in (0, 1):  # bool true / false
            headers[name] = kind == 0
        elif kind == 2:
            headers[name] = struct.unpack_from(">b", view, pos)[0]
            pos += 1
        elif kind == 3:
            headers[name] = struct.unpack_from(">h", view, pos)[0]
            pos += 2
        elif kind == 4:
            headers[name] = struct.unpack_from(">i", view, pos)[0]
            pos += 4
        elif kind in (5, 8):  # int64, timestamp
            headers[name] = struct.unpack_from(">q", view, pos)[0]
            pos += 8
        elif kind in (_BYTES, _STRING):
            (length,) = struct.unpack_from(">H", view, pos)
            raw = bytes(view[pos + 2 : pos + 2 + length])
            headers[name] = raw.decode() if kind == _STRING else raw
            pos += 2 + length
        elif kind == 9:  # uuid
            headers[name] = bytes(view[pos : pos + 16])
            pos += 16
        else:
            raise EventStreamError(f"unknown header type {kind}")
    return headers
