"""One request pipeline for every front: track, forward, render refusals, complete.

A front (the Bedrock passthrough, the files endpoint) turns a request into a response and
fills the ``Exchange`` as it goes; it raises ``AwsError`` to refuse. The pipeline owns
what every request shares: the request id, the set of handlers in flight (so a shutdown
past its deadline can end them), refusals in the front's own error format, and handing
the finished exchange to the observers, once, after the response has gone out.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler

from ..exchange import Exchange, Observer
from ..wire import errors

log = logging.getLogger("bedrock_proxy.pipeline")


class Front(Protocol):
    async def forward(self, request: web.Request, x: Exchange) -> web.StreamResponse:
        """The response to ``request``; raises AwsError to refuse it."""
        ...

    def render(self, exc: errors.AwsError, x: Exchange, request: web.Request) -> web.Response:
        """A refusal in this front's error format (AWS JSON, S3 XML)."""
        ...


class Shutdown:
    """Whether the process is draining: a stream cut by shutdown ends with an exception
    frame that says so, one cut by its client does not."""

    __slots__ = ("stopping",)

    def __init__(self) -> None:
        self.stopping = False


class Pipeline:
    def __init__(self, observers: Sequence[Observer], shutdown: Shutdown) -> None:
        self._observers = tuple(observers)
        self.shutdown = shutdown
        # Handlers in flight, so a shutdown past its deadline can end them cleanly.
        self._active: set[asyncio.Task[object]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._active)

    async def idle(self) -> None:
        """Wait until no request is in flight: every finished exchange has been observed."""
        while self._active:
            await asyncio.wait(list(self._active))

    def abort_all(self) -> None:
        """Shutdown deadline: end every request now; streams get an exception frame."""
        self.shutdown.stopping = True
        for task in list(self._active):
            task.cancel()

    def handler(self, front: Front) -> Handler:
        # A partial, not a wrapping coroutine: one coroutine less per request, and one
        # frame less for every resumption of the request's task.
        return functools.partial(self.serve, front=front)

    async def serve(self, request: web.Request, front: Front) -> web.StreamResponse:
        x = Exchange(errors.new_request_id(), request.method, time.perf_counter())
        # The loop named, not looked up: on Python 3.11 finding the running loop costs a
        # getpid() system call, on every request.
        task = asyncio.current_task(request.task.get_loop())
        if task is not None:
            self._active.add(task)
        try:
            response = await front.forward(request, x)
            x.status = response.status
            if not response.prepared:
                # Sent before the observers run, which the client need not wait for.
                try:
                    await response.prepare(request)
                    await response.write_eof()
                except ConnectionError:
                    x.error = "ClientDisconnected"
                    x.incomplete = True
            return response
        except errors.AwsError as exc:
            x.error = exc.code
            x.status = exc.status
            return front.render(exc, x, request)
        except asyncio.CancelledError:
            x.error = "ProxyShutdown" if self.shutdown.stopping else "ClientDisconnected"
            x.status = 499
            x.incomplete = True
            raise
        except Exception:
            log.exception("unexpected error forwarding request %s", x.request_id)
            internal = errors.internal()
            x.error = internal.code
            x.status = internal.status
            return front.render(internal, x, request)
        finally:
            if task is not None:
                self._active.discard(task)
            x.end(time.perf_counter() - x.started)
            x.request_headers = request.headers
            self._complete(x)

    def _complete(self, x: Exchange) -> None:
        for observer in self._observers:
            try:
                observer.completed(x)
            except Exception:  # one observer's bug must not cost the others their record
                log.exception("observer %s failed on %s", type(observer).__name__, x.request_id)
