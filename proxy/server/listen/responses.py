"""Errors on the wire: an ``AwsError``, rendered in its protocol's shape by ``wire.errors``,
as aiohttp's response (the only layer that builds one is the server)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from ...wire import errors


def rendered(error: errors.RenderedError) -> web.Response:
    return web.Response(status=error.status, body=error.body, headers=error.headers)


def aws_response(exc: errors.AwsError, request_id: str | None = None) -> web.Response:
    """The REST-JSON shape AWS's own services answer with: boto3 raises the modelled
    exception from ``x-amzn-ErrorType`` and the ``message``."""
    return rendered(exc.rest_json(request_id))


async def expect_continue(request: web.Request, max_body: int) -> web.StreamResponse | None:
    """Answer ``Expect: 100-continue`` with 413 at once when the body is too large."""
    length = request.content_length
    if length is not None and length > max_body:
        return aws_response(errors.payload_too_large(max_body))
    if request.version != aiohttp.HttpVersion11:
        return None
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        return aws_response(
            errors.AwsError(417, "ValidationException", f"Unsupported Expect header: {expect}")
        )
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the 100 is not part of the response proper
    return None
