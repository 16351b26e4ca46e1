"""Request bodies that are read before the call: read once (SigV4 hashes them), kept as
the bytes that arrived, sent on as the same bytes."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from ...wire import errors, sigv4

# Request bodies are read in one piece up to this size.
_SMALL_BODY = 1024 * 1024


@dataclass(slots=True)
class RequestBody:
    # bytes for a body read in one piece, chunks for a large one (sent without a join).
    data: bytes | list[bytes]
    size: int
    sha256: str

    def joined(self) -> bytes:
        return self.data if isinstance(self.data, bytes) else b"".join(self.data)

    def payload(self) -> bytes | list[bytes] | None:
        return self.data or None


async def read_body(request: web.Request, limit: int, timeout: float) -> RequestBody:
    """The whole body, up to ``limit`` bytes, within ``timeout`` seconds."""
    length = request.content_length
    content = request.content
    if length and length <= _SMALL_BODY and length <= limit and content.is_eof():
        # Already here whole (a small body comes in the headers' packet): no waiting,
        # so no deadline to arm.
        data = content.read_nowait()
        if len(data) != length:
            raise errors.validation("The request body ended before its Content-Length")
        return RequestBody(data, length, hashlib.sha256(data).hexdigest())
    try:
        async with asyncio.timeout(timeout):
            return await _read_unbounded(request, limit)
    except TimeoutError:
        raise errors.AwsError(
            408,
            "RequestTimeoutException",
            f"The request body was not received within {timeout:g} s",
        ) from None
    except (asyncio.IncompleteReadError, aiohttp.ClientPayloadError, ConnectionError):
        raise errors.validation("The request body ended before its Content-Length") from None


async def _read_unbounded(request: web.Request, limit: int) -> RequestBody:
    length = request.content_length
    if length is not None and length > limit:
        raise errors.payload_too_large(limit)
    if not request.body_exists:
        return RequestBody(b"", 0, sigv4.EMPTY_SHA256)
    content = request.content
    if length is not None and length <= _SMALL_BODY:
        data = await content.readexactly(length) if length else b""
        return RequestBody(data, len(data), hashlib.sha256(data).hexdigest())
    digest = hashlib.sha256()
    chunks: list[bytes] = []
    size = 0
    async for chunk in content.iter_any():
        size += len(chunk)
        if size > limit:
            raise errors.payload_too_large(limit)
        digest.update(chunk)
        chunks.append(chunk)
    if len(chunks) <= 1:
        data = chunks[0] if chunks else b""
        return RequestBody(data, size, digest.hexdigest())
    return RequestBody(chunks, size, digest.hexdigest())
