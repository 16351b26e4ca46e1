"""Every use of aiohttp's internals, in one place, each with the reason no public hook does.

If an aiohttp upgrade breaks one of these, this module is where it shows; the tests that
cover each are named beside it.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ...wire import errors
from ...wire.http2 import PREFACE, request_fields
from .responses import aws_response, rendered

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


def awaiting_first_request(handler: Any) -> bool:
    """True while a connection has not completed its first request's headers. aiohttp
    counts requests only in the private ``_request_count`` and has no header deadline of
    its own; an HTTP/2 connection answers for itself. Tests: test_resilience (slowloris
    headers are cut), test_http2."""
    if not isinstance(handler, RequestHandler):
        return bool(handler.awaiting_first_request())
    return not getattr(handler, "_request_count", 1)


# ---------------------------------------------------------------------------- HTTP/2
# An HTTP/2 stream becomes the same ``web.Request`` an HTTP/1.1 message does: aiohttp's
# public RawRequestMessage, StreamReader and request factory, fed by ``server.http2``
# instead of aiohttp's parser. Tests: test_http2 (every route over h2c and h2).

HTTP2 = HttpVersion(2, 0)
StreamBody = StreamReader
_BODY_LIMIT = 2**16  # aiohttp's own per-request read buffer


def drop_idle_timer(request: web.BaseRequest) -> None:
    """A long response is starting: cancel the connection's keep-alive timer, which
    aiohttp arms when the connection opens and would otherwise hold (a TimerHandle and a
    libuv handle, ~700 bytes) for every open stream until it fires. ``keep_alive(True)``
    is the public method that cancels it; aiohttp re-arms the timer when the response
    ends, and sets keep-alive then from the response, so the value set here does not
    last. HTTP/2 streams have no such timer. Tests: test_streaming (a kept-alive connection)."""
    protocol = request.protocol
    if isinstance(protocol, RequestHandler):
        protocol.keep_alive(True)


def http2_request_message(fields: list[tuple[bytes, bytes]]) -> RawRequestMessage:
    """The request an HTTP/2 HEADERS block describes, as aiohttp's parser would give it;
    raises ``MalformedRequest`` (see ``wire.http2.request_fields``). ``:authority``
    becomes ``Host`` (RFC 9113 8.3.1), so the policy and the signature read one host."""
    pseudo, regular = request_fields(fields)
    headers: CIMultiDict[str] = CIMultiDict(
        (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        for name, value in regular
    )
    authority = pseudo.get(b":authority")
    if authority is not None and "Host" not in headers:
        headers["Host"] = authority.decode("utf-8", "surrogateescape")
        regular.append((b"host", authority))
    method = pseudo[b":method"].decode("ascii", "replace")
    path = pseudo[b":path"].decode("utf-8", "surrogateescape")
    if method == "CONNECT" or not path.startswith("/"):
        raise errors.AwsError(405, "ValidationException", f"Unsupported method {method}")
    target, _, fragment = path.partition("#")
    target, _, query = target.partition("?")
    try:
        url = URL.build(path=target, query_string=query, fragment=fragment, encoded=True)
    except ValueError:
        raise errors.validation("The request path is not valid") from None
    return RawRequestMessage(
        method,
        path,
        HTTP2,
        CIMultiDictProxy(headers),
        tuple(regular),
        False,
        None,
        False,
        False,
        url,
    )


def stream_request(
    server: web.Server,
    message: RawRequestMessage,
    body: StreamReader | None,
    protocol: Any,
    writer: Any,
    task: asyncio.Task[Any],
) -> BaseRequest:
    """The server's own request (the app's ``web.Request``) for one HTTP/2 stream."""
    payload = body if body is not None else EMPTY_PAYLOAD
    return server.request_factory(message, payload, protocol, writer, task)


def new_stream_body(flow: Any, loop: asyncio.AbstractEventLoop) -> StreamReader:
    """A request body reader whose pauses and resumes drive one stream's window."""
    return StreamReader(flow, _BODY_LIMIT, loop=loop)


class AwsErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, with two changes.

    Requests aiohttp itself refuses (unparseable HTTP, oversized headers) get an
    AWS-shaped JSON error like every other refusal, not aiohttp's text/plain page, and are
    logged as the client's mistake, without a traceback.

    And the connection may turn out to be HTTP/2 (``server.http2``): negotiated by ALPN on
    TLS, it is handed over before aiohttp sets anything up; on plain TCP the first bytes
    decide, and a connection that opens with the HTTP/2 preface is let go (its transport
    taken back, the handler force-closed without it, the server told it is gone: public
    methods only) and handed over with those bytes. An HTTP/1.1 connection runs exactly as
    aiohttp runs it, plus one attribute test per read. Tests: test_http2, test_resilience.
    """

    _http2: Callable[[], asyncio.Protocol] | None = None
    _owner: web.Server | None = None
    # The first bytes while they may still be the start of a preface; None once decided.
    _first: bytes | None = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._http2 is None:
            self._first = None
        else:
            ssl_object = transport.get_extra_info("ssl_object")
            chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            if chosen == "h2":
                self._first = None
                _hand_over(transport, self._http2(), b"")
                return
            if chosen is not None:
                self._first = None  # http/1.1 by ALPN
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        first = self._first
        if first is not None:
            if first:
                data = first + data
            if data[: len(PREFACE)] == PREFACE[: len(data)]:
                if len(data) < len(PREFACE):
                    self._first = data  # the start of a preface: wait for the rest
                    return
                self._let_go_to_http2(data)
                return
            self._first = None
        RequestHandler.data_received(self, data)

    def _let_go_to_http2(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None and self._http2 is not None and self._owner is not None
        self._first = None
        self.transport = None  # so that force_close leaves the connection open
        self.force_close()  # ends aiohttp's wait for a first request
        self._owner.connection_lost(self, None)
        _hand_over(transport, self._http2(), data)

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
            response = rendered(
                errors.rest_json_error(
                    status, "ValidationException", f"The request is not valid HTTP: {reason}"
                )
            )
        else:
            log.error("error handling request (%d)", status, exc_info=exc)
            response = aws_response(errors.internal())
        response.force_close()
        return response


def _hand_over(transport: asyncio.BaseTransport, protocol: asyncio.Protocol, data: bytes) -> None:
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if data:
        protocol.data_received(data)


class AwsServer(web.Server):
    """A ``web.Server`` whose connections render aiohttp's own refusals the AWS way, and
    may be HTTP/2 (``http2``: a factory of HTTP/2 connections, set by the runner)."""

    http2: Callable[[], asyncio.Protocol] | None = None

    def __call__(self) -> RequestHandler:
        handler = AwsErrorRequestHandler(self, loop=self._loop, **self._kwargs)
        if self.http2 is not None:
            handler._http2 = self.http2
            handler._owner = self
        return handler
