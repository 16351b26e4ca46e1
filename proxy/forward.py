"""The passthrough: authenticate, re-sign with the server's credentials, stream both ways.

Bodies are never parsed or re-serialised. The request body is read once (it must be hashed
for SigV4) and sent as the same bytes. Responses stream back as they arrive; event streams
are cut at frame boundaries, so a failure mid-stream can be reported with an exception frame
after the last whole frame, never after half of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from . import errors, eventstream, http1, policy, sigv4
from .accesslog import AccessLog
from .annotations import read_annotations
from .auth import Authenticator, SignedRequest
from .config import Settings
from .credentials import CredentialProvider, NoCredentialsError
from .endpoints import Endpoints, Upstream, valid_region
from .headers import check_request_headers, response_headers, split_request_headers
from .jobs import LISTINGS, STARTS, JobRegistry
from .metering import Exchange, Metering
from .metrics import Metrics
from .modelrefs import ModelRefs, resolvable
from .routing import RouteMatch, Router, Service
from .tracing import Tracing
from .unverified import UnverifiedBodies
from .usage import Meter, meter_for

log = logging.getLogger("bedrock_proxy.forward")
S3_SERVICE = Service(name="s3", endpoint_prefix="s3", signing_name="s3")

BASE_PATH = "/bedrock"
# Responses of known length up to this size are read whole and sent in one write.
_SMALL_RESPONSE = 256 * 1024
# Request bodies are read in one piece up to this size.
_SMALL_BODY = 1024 * 1024
# Operations whose model is named in the body rather than the path.
_MODEL_IN_BODY = frozenset({"StartAsyncInvoke", "CreateModelInvocationJob"})


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


class Forwarder:
    """Owns the upstream connection pool and forwards every /bedrock request."""

    def __init__(
        self,
        settings: Settings,
        router: Router,
        endpoints: Endpoints,
        credentials: CredentialProvider,
        authenticator: Authenticator,
        access_log: AccessLog,
        metering: Metering | None = None,
    ) -> None:
        self._settings = settings
        self._metering = metering
        self._router = router
        self._endpoints = endpoints
        self._credentials = credentials
        self._auth = authenticator
        self._access_log = access_log
        self._max_body = settings.max_body_bytes
        self._bearer = settings.upstream_bearer_token
        self._unverified = UnverifiedBodies(settings.max_unverified_body_bytes)
        self._pool: http1.Pool | None = None
        # Handlers in flight, so a shutdown past its deadline can end them cleanly.
        self._active: set[asyncio.Task[object]] = set()
        self.stopping = False
        self.metrics: Metrics | None = None
        self.tracing: Tracing | None = None
        self.jobs: JobRegistry | None = None
        self.model_refs: ModelRefs | None = None

    @property
    def in_flight(self) -> int:
        return len(self._active)

    @property
    def started(self) -> bool:
        return self._pool is not None

    @property
    def pool(self) -> http1.Pool:
        assert self._pool is not None
        return self._pool

    @property
    def metering(self) -> Metering | None:
        return self._metering

    async def upstream_credentials(self) -> sigv4.Credentials:
        try:
            return await self._credentials.get()
        except NoCredentialsError:
            raise errors.service_unavailable(
                "The proxy has no AWS credentials configured for the upstream"
            ) from None

    def abort_all(self) -> None:
        """Shutdown deadline: end every request now; streams get an exception frame."""
        for task in list(self._active):
            task.cancel()

    async def start(self) -> None:
        s = self._settings
        self._pool = http1.Pool(
            connect_timeout=s.connect_timeout,
            read_timeout=s.first_byte_timeout,
            keepalive_timeout=30,
            limit_per_host=s.pool_size,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        self._access_log.flush()

    # ------------------------------------------------------------------ handler

    async def expect_handler(self, request: web.Request) -> web.StreamResponse | None:
        """Answer ``Expect: 100-continue`` with 413 at once when the body is too large."""
        length = request.content_length
        if length is not None and length > self._max_body:
            return errors.payload_too_large(self._max_body).to_response()
        if request.version != aiohttp.HttpVersion11:
            return None
        expect = request.headers.get("Expect", "")
        if expect.lower() != "100-continue":
            return errors.AwsError(
                417, "ValidationException", f"Unsupported Expect header: {expect}"
            ).to_response()
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the response proper
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self._forward, _json_error)

    async def serve(
        self,
        request: web.Request,
        forward: Callable[[web.Request, Exchange], Awaitable[web.StreamResponse]],
        render: Callable[[errors.AwsError, Exchange, web.Request], web.StreamResponse],
    ) -> web.StreamResponse:
        """One request's bookkeeping, whatever it forwards to: the refusal in the caller's
        error format, shutdown tracking, the ledger, metrics, the access log, tracing."""
        x = Exchange(errors.new_request_id(), request.method, time.perf_counter())
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        try:
            response = await forward(request, x)
            x.status = response.status
            if not response.prepared:
                # Sent before the bookkeeping below, which the client need not wait for.
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
            return render(exc, x, request)
        except asyncio.CancelledError:
            x.error = "ProxyShutdown" if self.stopping else "ClientDisconnected"
            x.status = 499
            x.incomplete = True
            raise
        except Exception:
            log.exception("unexpected error forwarding request %s", x.request_id)
            exc = errors.internal()
            x.error = exc.code
            x.status = exc.status
            return render(exc, x, request)
        finally:
            if task is not None:
                self._active.discard(task)
            self._complete(x)
            if self.tracing is not None:
                self.tracing.record(x, request.headers, time.perf_counter() - x.started)

    def _complete(self, x: Exchange) -> None:
        latency_ms = round((time.perf_counter() - x.started) * 1000, 3)
        if self._metering is not None:
            self._metering.complete(x, latency_ms)
        if self.metrics is not None:
            self.metrics.observe(x, latency_ms / 1000)
        if not self._access_log.enabled:
            return
        op = x.operation
        entry: dict[str, object] = {
            "request_id": x.request_id,
            "method": x.method,
            "status": x.status,
            "latency_ms": latency_ms,
            "bytes_in": x.bytes_in,
            "bytes_out": x.bytes_out,
        }
        if op is not None:
            entry["operation"] = op.name
            entry["service"] = op.service.name
        if x.model is not None:
            entry["model"] = x.model
        if x.identity is not None:
            entry["identity"] = x.identity.key_id or x.identity.kind
        if x.usage is not None and x.usage.found:
            entry["tokens"] = x.usage.total_tokens
            entry["cost"] = x.cost
        if x.upstream_request_id:
            entry["upstream_request_id"] = x.upstream_request_id
        if x.error:
            entry["error"] = x.error
        if x.incomplete:
            entry["incomplete"] = True
        self._access_log.write(entry)

    async def _forward(self, request: web.Request, x: Exchange) -> web.StreamResponse:
        raw = request.raw_path[len(BASE_PATH) :]
        path, _, query = raw.partition("?")
        match = self._router.match(request.method, path or "/")
        if match is None:
            raise errors.unknown_operation(request.method, path or "/")
        op = x.operation = match.operation
        x.model = match.labels.get("modelId")
        refuse_other_providers(request)
        check_request_headers(request.headers.items())
        # The credential is judged from the headers before any body is read, so a refusal
        # costs no body and keeps nothing.
        identity = await self._auth.identify(request)
        if identity is None:  # SigV4 by a known key: its signature covers the body
            with self._unverified.hold(request.content_length, self._max_body):
                body = await self._read_body(request)
                client_path, _, _ = request.raw_path.partition("?")
                identity = await self._auth.authenticate(
                    request, SignedRequest(request.method, client_path, query, body.sha256)
                )
        else:
            body = await self._read_body(request)
        x.bytes_in = body.size
        x.identity = identity  # before the policy, so a refusal is attributed to the key
        upstream = self._endpoints.resolve(op.service, self.client_region(request))
        x.region = upstream.region
        if x.model is not None and self.model_refs is not None and resolvable(x.model):
            resolved = await self.model_refs.resolve(x.model)
            if resolved is not None:
                x.model_ref, x.model = x.model, resolved
        spec = identity.spec
        if spec is not None:
            # A body read in one piece is checked as it is; a large one is joined (a copy)
            # only when the key's allow-lists need it read.
            data = body.data if isinstance(body.data, bytes) else None
            if data is None and policy.needs_body(spec, op):
                data = body.joined()
            aliases = {x.model_ref: x.model} if x.model_ref and x.model else None
            policy.check(spec, op, match.labels, request.headers, data, query, aliases)
        if self.jobs is not None:
            await self.jobs.check(identity, op, match.labels)
        if x.model is None and op.name in _MODEL_IN_BODY:
            x.model = policy.body_model(op, body.joined())
        x.annotations = read_annotations(request.headers)
        if self._metering is not None:
            x.meter = meter_for(op.name)
            await self._metering.admit(x, body.size)
        headers = await self._upstream_headers(request, match, upstream, query, body)
        target = upstream.base_path + match.path + ("?" + query if query else "")
        return await self._exchange(request, upstream.origin, target, headers, body, x)

    async def control_get(self, region: str, path: str) -> tuple[int, bytes]:
        """A GET on the Bedrock control plane, signed with the server's credentials."""
        return await self._signed_get(self._router.service("bedrock"), region, path)

    async def s3_get(self, region: str, bucket: str, key: str) -> tuple[int, bytes]:
        """An S3 object (path-style), read with the server's credentials."""
        path = "/" + quote(bucket, safe="") + "/" + quote(key, safe="/-_.~")
        return await self._signed_get(S3_SERVICE, region, path)

    async def _signed_get(self, service: Service, region: str, path: str) -> tuple[int, bytes]:
        upstream = self._endpoints.resolve(service, region)
        headers = {"host": upstream.host, "accept": "application/json"}
        raw_path = upstream.base_path + path
        if service is S3_SERVICE:
            headers["x-amz-content-sha256"] = sigv4.EMPTY_SHA256
        if self._bearer and service is not S3_SERVICE:
            headers["authorization"] = "Bearer " + self._bearer
        else:
            credentials = await self.upstream_credentials()
            headers["authorization"] = sigv4.sign(
                method="GET",
                raw_path=raw_path,
                raw_query="",
                headers=headers,
                payload_hash=sigv4.EMPTY_SHA256,
                credentials=credentials,
                region=region,
                service=service.signing_name,
                date=sigv4.amz_date(),
                double_encode=service is not S3_SERVICE,
            )
        response = await self.pool.request("GET", upstream.origin, raw_path, headers)
        try:
            return response.status, await response.read()
        finally:
            response.release()

    # ------------------------------------------------------------------ request

    def client_region(self, request: web.Request) -> str | None:
        """The region in the client's own SigV4 scope, if it signed and we honour it."""
        if not self._settings.client_region:
            return None
        authorization = request.headers.get("Authorization")
        if not authorization or not authorization.startswith(sigv4.ALGORITHM):
            return None
        region = sigv4.scope_region(authorization)
        if region is None:
            return None
        if not valid_region(region):
            raise errors.validation(f"{region!r} is not a valid AWS region")
        return region

    async def _read_body(self, request: web.Request) -> RequestBody:
        length = request.content_length
        content = request.content
        if length and length <= _SMALL_BODY and length <= self._max_body and content.is_eof():
            # Already here whole (a small body comes in the headers' packet): no waiting,
            # so no deadline to arm.
            data = content.read_nowait()
            if len(data) != length:
                raise errors.validation("The request body ended before its Content-Length")
            return RequestBody(data, length, hashlib.sha256(data).hexdigest())
        try:
            async with asyncio.timeout(self._settings.body_timeout):
                return await self._read_body_unbounded(request)
        except TimeoutError:
            raise errors.AwsError(
                408,
                "RequestTimeoutException",
                f"The request body was not received within {self._settings.body_timeout:g} s",
            ) from None
        except (asyncio.IncompleteReadError, aiohttp.ClientPayloadError, ConnectionError):
            raise errors.validation("The request body ended before its Content-Length") from None

    async def _read_body_unbounded(self, request: web.Request) -> RequestBody:
        limit = self._max_body
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

    async def _upstream_headers(
        self,
        request: web.Request,
        match: RouteMatch,
        upstream: Upstream,
        query: str,
        body: RequestBody,
    ) -> dict[str, str]:
        signed, unsigned = split_request_headers(request.headers)
        signed["host"] = upstream.host
        if body.size or not isinstance(body.data, bytes):
            unsigned["content-length"] = str(body.size)
        if self._bearer:
            signed["authorization"] = "Bearer " + self._bearer
        else:
            credentials = await self.upstream_credentials()
            signed["authorization"] = sigv4.sign(
                method=request.method,
                raw_path=upstream.base_path + match.path,
                raw_query=query,
                headers=signed,
                payload_hash=body.sha256,
                credentials=credentials,
                region=upstream.region,
                service=match.operation.service.signing_name,
                date=sigv4.amz_date(),
            )
        signed.update(unsigned)
        return signed

    # ------------------------------------------------------------------ response

    async def _exchange(
        self,
        request: web.Request,
        origin: str,
        target: str,
        headers: dict[str, str],
        body: RequestBody,
        x: Exchange,
    ) -> web.StreamResponse:
        assert self._pool is not None
        x.upstream_started = time.perf_counter()
        try:
            upstream = await self._pool.request(
                request.method, origin, target, headers, body.payload()
            )
        except http1.ReadTimeout:
            raise errors.upstream_timeout(
                "The upstream service did not respond within "
                f"{self._settings.first_byte_timeout:g} s"
            ) from None
        except http1.UpstreamError as exc:
            raise errors.service_unavailable(str(exc)) from None
        completed = False
        meter = x.meter
        try:
            x.status = upstream.status
            x.upstream_headers_at = time.perf_counter()
            if upstream.status >= 400:
                x.upstream_error = upstream.headers.get("x-amzn-ErrorType", "").split(":")[
                    0
                ] or str(upstream.status)
            x.upstream_request_id = upstream.headers.get("x-amzn-RequestId")
            out_headers = response_headers(upstream.headers)
            out_headers["x-bedrock-proxy-request-id"] = x.request_id
            if meter is not None:
                meter.on_headers(upstream.status, upstream.headers)
            content_type = upstream.headers.get("Content-Type", "")
            is_event_stream = content_type.startswith(eventstream.CONTENT_TYPE)
            length = upstream.content_length
            # A job listing a virtual key sees filtered is read whole, whatever its size.
            owned_listing = (
                upstream.status == 200
                and x.operation is not None
                and x.operation.name in LISTINGS
                and x.identity is not None
                and x.identity.record is not None
            )
            if not is_event_stream and (
                owned_listing or (length is not None and length <= _SMALL_RESPONSE)
            ):
                data = await self._read_small(upstream)
                completed = True
                x.upstream_done = time.perf_counter()
                if self.jobs is not None and x.identity is not None and x.operation is not None:
                    if owned_listing:
                        data = await self.jobs.filter_listing(x.identity, x.operation, data)
                    elif upstream.status == 200 and x.operation.name in STARTS:
                        # (A start's body is small JSON: joining it copies nothing big.)
                        await self.jobs.remember(
                            x.identity, x.operation, x.model, data, body.joined(), x.region
                        )
                x.bytes_out = len(data)
                if meter is not None:
                    meter.feed(data)
                    self._cost_headers(x, out_headers)
                return web.Response(status=upstream.status, body=data, headers=out_headers)
            if meter is not None and not is_event_stream and meter.usage.found:
                self._cost_headers(x, out_headers)  # InvokeModel: usage came in the headers
            # Headers are in: from now on the limit is the idle time between chunks.
            upstream.set_read_timeout(self._settings.idle_timeout)
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            if length is not None and not is_event_stream:
                response.content_length = length
            await response.prepare(request)
            if self.metrics is not None and is_event_stream:
                self.metrics.active_streams += 1
            try:
                completed = await self.relay(request, upstream, response, x, is_event_stream)
            finally:
                x.upstream_done = time.perf_counter()
                if self.metrics is not None and is_event_stream:
                    self.metrics.active_streams -= 1
            return response
        finally:
            if completed:
                upstream.release()
            else:
                upstream.close()

    def _cost_headers(self, x: Exchange, headers: CIMultiDict[str]) -> None:
        """Non-stream responses can carry their cost; streams' costs are in the ledger."""
        assert self._metering is not None
        cost = self._metering.price(x)
        if self._metering.cost_headers and x.usage is not None and x.usage.found:
            headers["x-bedrock-proxy-tokens"] = str(x.usage.total_tokens)
            if cost is not None:
                headers["x-bedrock-proxy-cost"] = f"{cost:.10f}".rstrip("0").rstrip(".") or "0"

    async def _read_small(self, upstream: http1.Response) -> bytes:
        try:
            return await upstream.read()
        except http1.ReadTimeout:
            raise errors.upstream_timeout(
                "The upstream service stopped sending its response"
            ) from None
        except http1.UpstreamError as exc:
            raise errors.service_unavailable(
                f"The upstream response was cut short: {exc}"
            ) from None

    async def relay(
        self,
        request: web.Request,
        upstream: http1.Response,
        response: web.StreamResponse,
        x: Exchange,
        is_event_stream: bool,
    ) -> bool:
        """Copy the body as it arrives, teeing it to the meter; True when copied whole."""
        splitter = eventstream.FrameSplitter() if is_event_stream else None
        meter = x.meter
        try:
            failure = await self._copy(response, upstream, splitter, meter, x)
        except asyncio.CancelledError:
            if splitter is not None and self.stopping:
                await _write_quietly(
                    response,
                    eventstream.exception_frame(
                        "internalServerException", "The proxy is shutting down; retry the request"
                    ),
                )
            raise
        if failure is _CLIENT_GONE:
            return False
        if failure is None:
            await _finish(response)
            return True
        x.error = "UpstreamStreamError"
        x.incomplete = True
        if splitter is None:
            # No frame format to report the failure in: cut the connection so the client
            # sees a truncated body instead of a complete-looking one.
            _abort(request)
            return False
        try:
            await response.write(eventstream.exception_frame("internalServerException", failure))
            await response.write_eof()
        except ConnectionError:
            pass
        return False

    async def _copy(
        self,
        response: web.StreamResponse,
        upstream: http1.Response,
        splitter: eventstream.FrameSplitter | None,
        meter: Meter | None,
        x: Exchange,
    ) -> str | None:
        """Copy until the end; the failure to report, _CLIENT_GONE, or None when complete."""
        sent = 0
        failure: str | None = None
        while True:
            try:
                data = await upstream.readany()
            except http1.ReadTimeout:
                failure = (
                    f"The upstream stream was idle for more than {self._settings.idle_timeout:g} s"
                )
                break
            except http1.UpstreamError:
                failure = "The upstream stream was cut off"
                break
            if not data:
                if splitter is not None and splitter.pending:
                    failure = "The upstream event stream ended in the middle of a frame"
                break
            if splitter is not None:
                try:
                    data = splitter.feed(data)
                except eventstream.EventStreamError:
                    failure = "The upstream sent bytes that are not a valid event stream"
                    break
                if not data:
                    continue
            if meter is not None:
                meter.feed(data)
            try:
                await response.write(data)
            except ConnectionError:
                x.error = "ClientDisconnected"
                x.bytes_out = sent
                x.incomplete = True
                return _CLIENT_GONE
            if not sent:
                x.first_byte_at = time.perf_counter()
            sent += len(data)
            x.bytes_out = sent
        return failure


def _json_error(exc: errors.AwsError, x: Exchange, request: web.Request) -> web.StreamResponse:
    return exc.to_response(x.request_id)


def refuse_other_providers(request: web.BaseRequest) -> None:
    """Other gateways route ``x-model-provider: openai|gemini`` by translating payloads."""
    provider = request.headers.get("x-model-provider")
    if provider is not None and provider.strip().lower() != "bedrock":
        raise errors.validation(
            f"x-model-provider {provider!r} is not supported: this proxy passes Bedrock "
            "requests through unchanged and never translates them to another provider's API"
        )


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


_CLIENT_GONE = "client gone"


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    """Best effort, bounded: the client may already be gone."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(response.write(data), 1.0)
        await asyncio.wait_for(response.write_eof(), 1.0)


async def _finish(response: web.StreamResponse) -> None:
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
