"""Errors on the wire: an ``AwsError``, rendered in its protocol's shape by ``wire.errors``,
as aiohttp's response (the only layer that builds one is the server)."""

from __future__ import annotations

from aiohttp import web

from ...wire import errors


def rendered(error: errors.RenderedError) -> web.Response:
    return web.Response(status=error.status, body=error.body, headers=error.headers)


def aws_response(exc: errors.AwsError, request_id: str | None = None) -> web.Response:
    """The REST-JSON shape AWS's own services answer with: boto3 raises the modelled
    exception from ``x-amzn-ErrorType`` and the ``message``."""
    return rendered(exc.rest_json(request_id))
