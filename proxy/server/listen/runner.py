"""The HTTP server around the app: aiohttp's runner, HTTP/2 on the same listeners
(``http2``; the choice is made in ``aiohttp_adapter``), and the limits aiohttp leaves out.

aiohttp has no deadline for a request's headers, so a slowloris client can hold a
connection forever by trickling them. A sweeper closes every connection that has not
completed its first request's headers within ``header_timeout``; between requests the
keep-alive timeout applies, and the body has its own deadline (in ``forward``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ...wire.background import stop as stop_task
from ...wire.h2server import Http2Limits
from .aiohttp_adapter import AwsServer, awaiting_first_request, use_aws_error_handler
from .http2 import Http2ServerConnection

log = logging.getLogger("bedrock_proxy.server")


class ProxyRunner(web.AppRunner):
    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        keepalive_timeout: float,
        http2: Http2Limits | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            app,
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=keepalive_timeout,
            # Bodies are forwarded and signed as sent: a gzip body stays gzip.
            auto_decompress=False,
            **kwargs,
        )
        self._header_timeout = header_timeout
        self._keepalive_timeout = keepalive_timeout
        self._http2 = http2 or Http2Limits()
        self._sweeper: asyncio.Task[None] | None = None
        self.slow_clients_closed = 0

    async def _make_server(self) -> web.Server:
        server = use_aws_error_handler(await super()._make_server())
        assert isinstance(server, AwsServer)
        loop = asyncio.get_running_loop()
        limits, keepalive = self._http2, self._keepalive_timeout
        server.http2 = lambda: Http2ServerConnection(server, limits, keepalive, loop)
        return server

    async def setup(self) -> None:
        await super().setup()
        self._sweeper = asyncio.create_task(self._sweep())

    async def cleanup(self) -> None:
        await stop_task(self._sweeper)
        await super().cleanup()

    async def _sweep(self) -> None:
        # Keyed by the handler itself, not id(): ids of closed connections are reused.
        first_seen: dict[RequestHandler, float] = {}
        interval = min(1.0, self._header_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            server = self.server
            if server is None:
                continue
            now = time.monotonic()
            waiting = {}
            for handler in server.connections:
                if not awaiting_first_request(handler):
                    continue  # a request was read: keep-alive and handlers take over
                started = waiting[handler] = first_seen.get(handler, now)
                if now - started > self._header_timeout:
                    self.slow_clients_closed += 1
                    handler.force_close()
                    transport = handler.transport
                    if transport is not None:
                        transport.close()
            first_seen = waiting
