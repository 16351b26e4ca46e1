"""An upstream answer's body, copied to the client as it arrives: teed to the meter, cut
at event boundaries when it streams, ended in a way the client's SDK raises on when the
upstream fails, the key is revoked, or the proxy shuts down (``Framing``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from ..access.keywatch import KeyWatch
from ..exchange import Exchange
from ..metering.usage import Meter
from ..wire import errors, eventstream, h2pool, http1
from .pipeline import Shutdown

CLIENT_GONE = "client gone"
# How a stream cut by the proxy's shutdown ends: SDKs raise on it, and retry.
SHUTTING_DOWN_MESSAGE = "The proxy is shutting down; retry the request"
SHUTTING_DOWN = eventstream.exception_frame("internalServerException", SHUTTING_DOWN_MESSAGE)


class Splitter(Protocol):
    """Cuts a stream at its event boundaries (raising ValueError on bytes that are not
    events), so that what the proxy adds never lands inside an event."""

    @property
    def pending(self) -> int | bool: ...

    @property
    def broken(self) -> ValueError | None: ...

    def feed(self, data: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Framing:
    """A streamed answer's format: how it is cut, and how the proxy ends it early in a
    way the client's SDK raises on (an exception frame, an error event)."""

    splitter: Callable[[], Splitter]
    # The proxy's own refusal mid-stream (the key was revoked), and the upstream's failure.
    refusal: Callable[[errors.AwsError], bytes]
    failure: Callable[[str], bytes]
    shutting_down: bytes


EVENT_STREAM = Framing(
    eventstream.FrameSplitter,
    lambda exc: eventstream.error_frame(exc.code, exc.message),
    lambda message: eventstream.exception_frame("internalServerException", message),
    SHUTTING_DOWN,
)


class BodyRelay:
    def __init__(self, idle_timeout: float, shutdown: Shutdown) -> None:
        self._idle_timeout = idle_timeout
        self._shutdown = shutdown

    async def relay(
        self,
        request: web.Request,
        upstream: h2pool.UpstreamResponse,
        response: web.StreamResponse,
        x: Exchange,
        framing: Framing | None,
        watch: KeyWatch | None = None,
    ) -> bool:
        """Copy the body as it arrives, teeing it to the meter; True when copied whole.
        ``watch`` ends the copy once the key that asked may no longer go on."""
        splitter = framing.splitter() if framing is not None else None
        try:
            failure = await self.copy(response, upstream.readany, splitter, x.meter, x, watch)
        except asyncio.CancelledError:
            if framing is not None and self._shutdown.stopping:
                await write_quietly(response, framing.shutting_down)
            raise
        if failure is CLIENT_GONE:
            return False
        if failure is None:
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return True
        x.incomplete = True
        if framing is None:
            # No frame format to report the failure in: cut the connection so the client
            # sees a truncated body instead of a complete-looking one.
            transport = request.transport
            if transport is not None:
                transport.abort()
            return False
        if isinstance(failure, errors.AwsError):  # the proxy ended it: the key was revoked
            x.error = failure.code
            frame = framing.refusal(failure)
        else:
            x.error = "UpstreamStreamError"
            frame = framing.failure(failure)
        try:
            await response.write(frame)
            await response.write_eof()
        except ConnectionError:
            pass
        return False

    async def copy(
        self,
        response: web.StreamResponse,
        read: Callable[[], Awaitable[bytes]],
        splitter: Splitter | None,
        meter: Meter | None,
        x: Exchange,
        watch: KeyWatch | None = None,
    ) -> str | errors.AwsError | None:
        """Copy what ``read`` returns until it ends, cut at event boundaries; the failure
        to report (the proxy's own, when ``watch`` found the key revoked), CLIENT_GONE, or
        None when complete."""
        sent = 0
        failure: str | errors.AwsError | None = None
        while True:
            try:
                data = await read()
            except http1.ReadTimeout:
                failure = f"The upstream stream was idle for more than {self._idle_timeout:g} s"
                break
            except http1.UpstreamError:
                failure = "The upstream stream was cut off"
                break
            if not data:
                if splitter is not None and splitter.pending:
                    failure = "The upstream event stream ended in the middle of a frame"
                break
            # The key is looked at again on what arrives, not before waiting for it: what
            # came after a revocation (however long the wait) is not passed on.
            if watch is not None and watch.due():
                try:
                    await watch.check()
                except errors.AwsError as exc:
                    failure = exc
                    break
            if splitter is not None:
                try:
                    data = splitter.feed(data)
                except ValueError as exc:  # EventStreamError, SseError
                    failure = _not_an_event_stream(exc)
                    break
                if not data:
                    continue
            if meter is not None:
                meter.feed(data)
                if meter.due is not None:  # a compatible stream's stored response, recorded
                    await meter.run_due()
            try:
                await response.write(data)
            except ConnectionError:
                x.error, x.bytes_out, x.incomplete = "ClientDisconnected", sent, True
                return CLIENT_GONE
            if not sent:
                x.first_byte_at = time.perf_counter()
            sent += len(data)
            x.bytes_out = sent
            if splitter is not None and splitter.broken is not None:  # after good frames
                failure = _not_an_event_stream(splitter.broken)
                break
        return failure


def _not_an_event_stream(exc: ValueError) -> str:
    return f"The upstream sent bytes that are not a valid event stream ({exc})"


async def write_quietly(response: web.StreamResponse, data: bytes) -> None:
    """Best effort, bounded: the client may already be gone."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(response.write(data), 1.0)
        await asyncio.wait_for(response.write_eof(), 1.0)
