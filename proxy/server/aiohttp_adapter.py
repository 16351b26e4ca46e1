"""Every use of aiohttp's internals, in one place, each with the reason no public hook does.

If an aiohttp upgrade breaks one of these, this module is where it shows; the tests that
cover each are named beside it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from ..wire import errors

log = logging.getLogger("bedrock_proxy.server")


def application_with_router(router: web.UrlDispatcher, **kwargs: Any) -> web.Application:
    """An Application on our own router. aiohttp deprecates ``Application(router=)`` but
    still supports it, and nothing else lets a router resolve a request before its URL
    is built and decoded (see ``dispatch``). Tests: test_routing, every passthrough test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return web.Application(router=router, **kwargs)


def use_aws_error_handler(server: web.Server) -> web.Server:
    """Make the server's connections ``AwsErrorRequestHandler``s. ``web.Server`` has no
    parameter for its handler class and ``AppRunner`` builds the server itself (from the
    app's private ``_handle``); ``AwsServer`` adds no state, so swapping the class of the
    built server is safe. Tests: test_auth_and_errors (malformed HTTP gets AWS JSON)."""
    server.__class__ = AwsServer
    return server


def awaiting_first_request(handler: RequestHandler) -> bool:
    """True while a connection has not completed its first request's headers. aiohttp
    counts requests only in the private ``_request_count`` and has no header deadline of
    its own. Tests: test_resilience (slowloris headers are cut)."""
    return not getattr(handler, "_request_count", 1)


class AwsErrorRequestHandler(RequestHandler):
    """Requests aiohttp itself refuses (unparseable HTTP, oversized headers) get an
    AWS-shaped JSON error like every other refusal, not aiohttp's text/plain page, and
    are logged as the client's mistake, without a traceback."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)  # raises: too late
        if status < 500:
            reason = (message or str(exc) or "malformed request")[:200]
            log.info("refused a request aiohttp could not parse (%d): %s", status, reason)
            response = errors.json_error_response(
                status, "ValidationException", f"The request is not valid HTTP: {reason}"
            )
        else:
            log.error("error handling request (%d)", status, exc_info=exc)
            response = errors.internal().to_response()
        response.force_close()
        return response


class AwsServer(web.Server):
    """A ``web.Server`` whose connections render aiohttp's own refusals the AWS way."""

    def __call__(self) -> RequestHandler:
        return AwsErrorRequestHandler(self, loop=self._loop, **self._kwargs)
