"""InvokeModelWithBidirectionalStream (Nova Sonic speech-to-speech): a full-duplex relay
between the client's HTTP/2 stream and an HTTP/2 stream to bedrock-runtime.

Two directions run at once. Up: the client's outer frames are cut at frame boundaries,
their chunk signatures checked on the client's chain (a virtual key pair; a Bearer key
authenticated the stream itself), and each payload, the inner frame byte for byte, is
re-signed on the server's chain; the client's final empty frame becomes ours. Down: the
upstream's event frames go to the client as they arrive, teed to the meter, which reads
the usage events. Either side ending early ends both: a client gone or a bad frame resets
the upstream stream; an upstream gone, an idle timeout or a shutdown ends the client's
stream with an exception frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from ...access.keywatch import KeyWatch
from ...exchange import Exchange
from ...metering.service import Metering
from ...metering.usage import BidirectionalStreamMeter
from ...observe.metrics import Metrics
from ...wire import errors, eventstream, http1
from ...wire.eventsig import ChunkSignatureError, SignatureChain
from ...wire.h2client import Http2Stream
from ...wire.headers import RequestHeaders, response_headers
from ..gate import Admitted
from ..pipeline import Shutdown
from ..relay import CLIENT_GONE, SHUTTING_DOWN, write_quietly
from ..upstream import UpstreamClient

OPERATION = "InvokeModelWithBidirectionalStream"
# Which pool member served the request ("account/region"), when upstreams are configured.
UPSTREAM_HEADER = "x-bedrock-proxy-upstream"


class _Refused(Exception):
    """The client sent a frame that cannot go on: its exception frame says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DuplexRelay:
    def __init__(
        self,
        upstream: UpstreamClient,
        metering: Metering,
        idle_timeout: float,
        first_byte_timeout: float,
        metrics: Metrics,
        shutdown: Shutdown,
        connect_timeout: float,
        watch: Callable[[Exchange], KeyWatch | None] = lambda x: None,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._upstream = upstream
        self._metering = metering
        self._idle = idle_timeout
        self._first_byte = first_byte_timeout
        self._metrics = metrics
        self._shutdown = shutdown
        # A session's key, looked at again as it runs, and its longest life.
        self._watch = watch

    async def start(
        self,
        request: web.Request,
        x: Exchange,
        admitted: Admitted[Any],
        path: str,
        query: str,
        headers: RequestHeaders,
        client_chain: SignatureChain | None,
    ) -> web.StreamResponse:
        """Open the session upstream, to the admitted call's one member, signed for the
        server's chain; then relay it (``run``)."""
        op = x.operation
        assert op is not None
        upstream = admitted.targets[0].upstream
        signed, unsigned = headers.signed, headers.unsigned
        signed["host"] = upstream.host
        signed.pop("x-amz-content-sha256", None)
        raw_path = upstream.base_path + path
        server_chain = await self._upstream.authorize_stream(
            signed, raw_path=raw_path, raw_query=query, admitted=admitted, service=op.service
        )
        signed.update(unsigned)
        x.upstream_started = time.perf_counter()
        try:
            up = await Http2Stream.open(
                upstream.origin,
                "POST",
                raw_path + ("?" + query if query else ""),
                list(signed.items()),
                self._connect_timeout,
            )
        except http1.UpstreamError as exc:
            raise errors.service_unavailable(str(exc)) from None
        out_headers = CIMultiDict({"x-bedrock-proxy-request-id": x.request_id})
        if x.upstream is not None:
            out_headers[UPSTREAM_HEADER] = x.upstream
        return await self.run(request, x, up, client_chain, server_chain, out_headers)

    async def run(
        self,
        request: web.Request,
        x: Exchange,
        up: Http2Stream,
        client_chain: SignatureChain | None,
        server_chain: SignatureChain,
        out_headers: CIMultiDict[str],
    ) -> web.StreamResponse:
        watch = self._watch(x)
        pump = asyncio.create_task(self._send_events(request, up, client_chain, server_chain, x))
        # A session may be quiet for a long time: its key is looked at on a timer.
        guard = asyncio.create_task(_guard(watch, up)) if watch is not None else None
        # However the client side ends early, the upstream stream is reset: the reader of
        # the answers wakes, and finds out why from this task.
        pump.add_done_callback(_reset_on_failure(up))
        response: web.StreamResponse | None = None
        try:
            status, headers = await self._response_head(up, pump)
            x.upstream_headers_at = time.perf_counter()
            x.status = status
            if status >= 400:
                return await self._error_response(up, status, headers, x)
            out_headers.extend(response_headers(_fields(headers)))
            response = web.StreamResponse(status=status, headers=out_headers)
            await response.prepare(request)
            self._metrics.active_streams += 1
            try:
                await self._pump_down(up, pump, response, x, watch)
            finally:
                self._metrics.active_streams -= 1
            return response
        except asyncio.CancelledError:
            if response is not None and self._shutdown.stopping:
                await write_quietly(response, SHUTTING_DOWN)
            raise
        finally:
            x.upstream_done = time.perf_counter()
            if guard is not None:
                guard.cancel()
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
            if not x.incomplete and x.error is None:
                up.close()
            else:
                up.reset()

    # ------------------------------------------------------------------ up

    async def _send_events(
        self,
        request: web.Request,
        up: Http2Stream,
        client_chain: SignatureChain | None,
        server_chain: SignatureChain,
        x: Exchange,
    ) -> None:
        """Client frames, checked and re-signed, until the client's final empty frame."""
        splitter = eventstream.FrameSplitter()
        content = request.content
        received = 0
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    data = await content.readany()
            except TimeoutError:
                raise _Refused(
                    "ValidationException",
                    f"No event arrived from the client for {self._idle:g} s",
                ) from None
            if not data:
                if splitter.pending:
                    raise _Refused("ValidationException", "The event stream ended mid-frame")
                break  # the client half-closed without a final frame: end ours
            try:
                whole = splitter.feed(data)
                frames = list(eventstream.iter_frames(whole)) if whole else []
            except eventstream.EventStreamError as exc:
                raise _Refused("ValidationException", f"Not a valid event stream: {exc}") from None
            for frame in frames:
                if client_chain is not None:
                    try:
                        payload = client_chain.verify(frame)
                    except ChunkSignatureError as exc:
                        raise _Refused("InvalidSignatureException", str(exc)) from None
                else:
                    payload = frame.payload
                if not payload:
                    await up.send(server_chain.sign(b""))
                    up.end()
                    return
                received += len(payload)
                x.bytes_in = received
                await up.send(server_chain.sign(payload))
        await up.send(server_chain.sign(b""))
        up.end()

    # ------------------------------------------------------------------ down

    async def _response_head(
        self, up: Http2Stream, pump: asyncio.Task[None]
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        head = asyncio.ensure_future(up.response(self._first_byte))
        try:
            while True:
                done, _ = await asyncio.wait({head, pump}, return_when=asyncio.FIRST_COMPLETED)
                failure = _failure_of(pump)
                if isinstance(failure, _Refused):  # before the answer (which it reset)
                    status = 403 if failure.code == "InvalidSignatureException" else 400
                    raise errors.AwsError(status, failure.code, failure.message)
                if head in done:
                    return _upstream_result(head)
                if failure is not None:
                    raise _as_unavailable(failure)
                # The client finished sending before any answer: wait for the answer alone.
                await asyncio.wait({head})
                return _upstream_result(head)
        finally:
            if not head.done():
                head.cancel()

    async def _pump_down(
        self,
        up: Http2Stream,
        pump: asyncio.Task[None],
        response: web.StreamResponse,
        x: Exchange,
        watch: KeyWatch | None,
    ) -> None:
        meter = x.meter
        so_far = meter.so_far if isinstance(meter, BidirectionalStreamMeter) else None

        async def read() -> bytes:
            data = await up.read(self._idle)
            usage = so_far() if so_far is not None else None
            if usage is not None:  # a new usage event went by: reserve what it cost
                await self._metering.grow(x, usage)
            return data

        try:
            failure = await self._upstream.copy(
                response, read, eventstream.FrameSplitter(), meter, x
            )
        except errors.AwsError as exc:  # the budget ran out, or the key went, mid-session
            up.reset()
            x.error, x.incomplete, x.refusal = exc.code, True, exc.reason
            await write_quietly(response, eventstream.exception_frame(exc.code, exc.message))
            return
        if failure is CLIENT_GONE:
            return
        refused = _failure_of(pump)
        ended = watch.refusal if watch is not None else None
        if ended is not None:  # the key was revoked, or the session's time is up
            x.error, x.incomplete = ended.code, True
            frame = eventstream.exception_frame(ended.code, ended.message)
        elif isinstance(refused, _Refused):  # the upstream was reset because of it
            x.error, x.incomplete = refused.code, True
            frame = eventstream.exception_frame(refused.code, refused.message)
        elif failure is not None:
            x.error, x.incomplete = "UpstreamStreamError", True
            frame = eventstream.exception_frame("internalServerException", str(failure))
        else:
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return
        await write_quietly(response, frame)

    async def _error_response(
        self, up: Http2Stream, status: int, headers: list[tuple[bytes, bytes]], x: Exchange
    ) -> web.Response:
        """An upstream refusal, passed on as AWS sent it."""
        chunks = []
        with contextlib.suppress(http1.UpstreamError):
            while chunk := await up.read(self._idle):
                chunks.append(chunk)
        out = response_headers(_fields(headers))
        x.upstream_error = out.get("x-amzn-ErrorType", "").split(":")[0] or str(status)
        return web.Response(status=status, body=b"".join(chunks), headers=out)


async def _guard(watch: KeyWatch, up: Http2Stream) -> None:
    """Look at the session's key every period; once it may not go on, say why (for the
    exception frame) and reset the upstream stream, which ends both directions."""
    while True:
        await asyncio.sleep(watch.period)
        try:
            await watch.check()
        except errors.AwsError as exc:
            watch.refusal = exc
            up.reset()
            return


def _fields(headers: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """An HTTP/2 response's regular fields, as the HTTP/1.1 client would give them."""
    return CIMultiDict(
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
        if not name.startswith(b":")
    )


def _upstream_result(
    head: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]],
) -> tuple[int, list[tuple[bytes, bytes]]]:
    try:
        return head.result()
    except http1.ReadTimeout as exc:
        raise errors.upstream_timeout(str(exc)) from None
    except http1.UpstreamError as exc:
        raise errors.service_unavailable(str(exc)) from None


def _as_unavailable(failure: BaseException) -> errors.AwsError:
    return errors.service_unavailable(f"The upstream stream failed: {failure}")


def _reset_on_failure(up: Http2Stream) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        if _failure_of(task) is not None:
            up.reset()

    return done


def _failure_of(pump: asyncio.Task[None]) -> BaseException | None:
    if not pump.done() or pump.cancelled():
        return None
    return pump.exception()
