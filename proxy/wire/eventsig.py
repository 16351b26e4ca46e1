"""Signed event streams: the chunk-signature chain of InvokeModelWithBidirectionalStream.

Each client event travels as an inner event-stream frame wrapped in an outer frame whose
headers are ``:date`` (a timestamp) and ``:chunk-signature`` (32 raw bytes). The signature
chains from the request's own SigV4 signature:

    HMAC(signing key, "AWS4-HMAC-SHA256-PAYLOAD\\n" date "\\n" scope "\\n" previous
         signature "\\n" sha256(the encoded :date header) "\\n" sha256(payload))

and the stream ends with a signed frame whose payload is empty. (As the AWS SDK for
JavaScript's ``EventSigningTransformStream`` and ``SignatureV4.signEvent`` do it.)

The proxy verifies a client's chain with the virtual key's secret and re-signs every
payload on its own chain with the server's credentials; the inner frames pass unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from datetime import UTC, datetime

from . import eventstream, sigv4

STREAMING_EVENTS = "STREAMING-AWS4-HMAC-SHA256-EVENTS"
_ALGORITHM = "AWS4-HMAC-SHA256-PAYLOAD"
_TIMESTAMP = 8


class ChunkSignatureError(ValueError):
    """A client frame whose signature is missing or wrong."""


def date_header(epoch_ms: int) -> bytes:
    """The ``:date`` header as encoded in the frame (what its hash covers)."""
    return b"\x05:date" + struct.pack(">Bq", _TIMESTAMP, epoch_ms)


class SignatureChain:
    """One direction's chain: the key and scope of the request's signature, and the
    signature of the last frame (the request's own, to begin with)."""

    __slots__ = ("_key", "_scope", "previous")

    def __init__(self, key: bytes, scope: str, seed_signature: str) -> None:
        self._key = key
        self._scope = scope
        self.previous = seed_signature

    @classmethod
    def for_credentials(
        cls, secret_key: str, day: str, region: str, service: str, seed_signature: str
    ) -> SignatureChain:
        key = sigv4.signing_key(secret_key, day, region, service)
        return cls(key, f"{day}/{region}/{service}/aws4_request", seed_signature)

    def _signature(self, epoch_ms: int, payload: bytes) -> str:
        when = datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y%m%dT%H%M%SZ")
        to_sign = "\n".join(
            (
                _ALGORITHM,
                when,
                self._scope,
                self.previous,
                hashlib.sha256(date_header(epoch_ms)).hexdigest(),
                hashlib.sha256(payload).hexdigest(),
            )
        )
        return hmac.new(self._key, to_sign.encode(), hashlib.sha256).hexdigest()

    def sign(self, payload: bytes, epoch_ms: int | None = None) -> bytes:
        """The outer frame carrying ``payload`` (empty for the end of the stream)."""
        if epoch_ms is None:
            epoch_ms = int(time.time() * 1000)
        signature = self._signature(epoch_ms, payload)
        self.previous = signature
        headers = date_header(epoch_ms) + _bytes_header(
            ":chunk-signature", bytes.fromhex(signature)
        )
        return eventstream.encode_raw(headers, payload)

    def verify(self, frame: eventstream.Frame) -> bytes:
        """The payload of a client's outer frame, once its signature checks out."""
        epoch_ms = frame.headers.get(":date")
        signature = frame.headers.get(":chunk-signature")
        if not isinstance(epoch_ms, int) or not isinstance(signature, bytes):
            raise ChunkSignatureError("The event is not signed (no :date or :chunk-signature)")
        expected = self._signature(epoch_ms, frame.payload)
        if not hmac.compare_digest(bytes.fromhex(expected), signature):
            raise ChunkSignatureError(
                "The event signature we calculated does not match the signature you provided"
            )
        self.previous = expected
        return frame.payload


def _bytes_header(name: str, value: bytes) -> bytes:
    raw = name.encode()
    return struct.pack(">B", len(raw)) + raw + struct.pack(">BH", 6, len(value)) + value
