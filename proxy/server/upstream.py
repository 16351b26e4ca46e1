"""The upstream call every front shares: resolve, sign with the server's credentials, send
on the pooled HTTP/1.1 client (event streams on shared HTTP/2 connections, ``h2pool``),
and relay the response body as it arrives.

Fronts prepare a request (path, headers, body) and decide how to answer; this module never
calls back into them. Event streams are cut at frame boundaries, so a failure mid-stream
is reported with an exception frame after the last whole frame, never after half of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from aiohttp import web

from ..access.keywatch import KeyWatch
from ..exchange import Exchange, Identity
from ..metering.usage import Meter
from ..observe.metrics import Metrics
from ..wire import errors, eventsig, eventstream, h2pool, http1, sigv4
from ..wire.endpoints import Upstream, valid_region
from ..wire.eventsig import SignatureChain
from ..wire.routing import Service
from .config import Settings
from .credentials import NoCredentialsError
from .fleet import Fleet, Member, Target
from .fleet.config import DEFAULT_ACCOUNT
from .pipeline import Shutdown

log = logging.getLogger("bedrock_proxy.upstreams")


def _NO_AFFINITY() -> bytes | None:
    return None


S3_SERVICE = Service(name="s3", endpoint_prefix="s3", signing_name="s3")
BEDROCK_CONTROL = Service(name="bedrock", endpoint_prefix="bedrock", signing_name="bedrock")
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


class UpstreamClient:
    """Owns the connection pool; signs with each member's credentials (``fleet``)."""

    def __init__(
        self,
        settings: Settings,
        fleet: Fleet,
        shutdown: Shutdown,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self.fleet = fleet
        self._shutdown = shutdown
        self._metrics = metrics
        self._bearer = settings.upstream_bearer_token
        self._pool: http1.Pool | None = None
        self._h2: h2pool.Http2Pool | None = None

    @property
    def started(self) -> bool:
        return self._pool is not None

    @property
    def pool(self) -> http1.Pool:
        assert self._pool is not None, "UpstreamClient.start() was not awaited"
        return self._pool

    async def start(self) -> None:
        s = self._settings
        self._pool = http1.Pool(
            connect_timeout=s.connect_timeout,
            read_timeout=s.first_byte_timeout,
            keepalive_timeout=30,
            limit_per_host=s.pool_size,
        )
        if s.upstream_http2_streams:
            self._h2 = h2pool.Http2Pool(
                connect_timeout=s.connect_timeout,
                read_timeout=s.first_byte_timeout,
                keepalive_timeout=30,
                max_streams=s.upstream_http2_streams,
            )
        await self.fleet.start()

    @property
    def open_connections(self) -> int:
        """Upstream connections open, on both protocols."""
        if self._pool is None:
            return 0
        return self._pool.open_connections + (self._h2.open_connections if self._h2 else 0)

    async def close(self) -> None:
        await self.fleet.close()
        if self._h2 is not None:
            await self._h2.close()
        if self._pool is not None:
            await self._pool.close()

    # ------------------------------------------------------------------ where and how

    def targets(
        self,
        service: Service,
        request: web.BaseRequest,
        identity: Identity | None,
        model: str | None,
        affinity: Callable[[], bytes | None] = _NO_AFFINITY,
        route_model: str | None = None,
    ) -> list[Target]:
        """The pool members to try, in order; ``model`` as the request names it (where it
        may go), ``route_model`` as it resolves (which route it takes). The client's SigV4
        region counts only without ``upstreams`` (a pool's members name their regions)."""
        region = None if self.fleet.configured else self._client_region(request)
        return self.fleet.targets(service, region, identity, model, affinity, route_model or model)

    def _client_region(self, request: web.BaseRequest) -> str | None:
        """The region in the client's own SigV4 scope, if it signed and we honour it."""
        if not self._settings.client_region:
            return None
        authorization = request.headers.get("Authorization")
        # (A slice, not startswith: this runs on every call a Bearer key makes.)
        if not authorization or authorization[: len(sigv4.ALGORITHM)] != sigv4.ALGORITHM:
            return None
        region = sigv4.scope_region(authorization)
        if region is None:
            return None
        if not valid_region(region):
            raise errors.validation(f"{region!r} is not a valid AWS region")
        return region

    async def _aws_credentials(
        self, member: Member, identity: Identity | None, patient: bool = True
    ) -> sigv4.Credentials:
        try:
            return await self.fleet.credentials_for(member, identity, patient)
        except NoCredentialsError as exc:
            raise errors.service_unavailable(
                "The proxy has no AWS credentials for the upstream"
                + ("" if member.account.name == DEFAULT_ACCOUNT else f" {member.name}")
                + ("" if str(exc).startswith("no AWS") else f": {exc}")
            ) from None

    async def authorize(
        self,
        headers: dict[str, str],
        *,
        method: str,
        raw_path: str,
        raw_query: str,
        payload_hash: str,
        target: Target,
        service: Service,
        identity: Identity | None = None,
        patient: bool = True,
    ) -> None:
        """Add the server's authorization to ``headers`` (which must hold ``host`` and only
        headers no hop changes): the upstream bearer token, or a SigV4 signature with the
        target member's credentials (not ``patient``: another member can take the request,
        so a slow first fetch of credentials is not waited for)."""
        if self._bearer and service is not S3_SERVICE:
            headers["authorization"] = "Bearer " + self._bearer
            return
        headers["authorization"] = sigv4.sign(
            method=method,
            raw_path=raw_path,
            raw_query=raw_query,
            headers=headers,
            payload_hash=payload_hash,
            credentials=await self._aws_credentials(target.member, identity, patient),
            region=target.upstream.region,
            service=service.signing_name,
            date=sigv4.amz_date(),
            double_encode=service is not S3_SERVICE,  # S3 paths are encoded once
        )

    async def authorize_stream(
        self,
        headers: dict[str, str],
        *,
        raw_path: str,
        raw_query: str,
        target: Target,
        service: Service,
        identity: Identity | None = None,
    ) -> SignatureChain:
        """Sign a request whose body is a signed event stream, and return the chain its
        frames are signed on (the server's key, seeded with this signature)."""
        if self._bearer:
            raise errors.validation(
                "InvokeModelWithBidirectionalStream needs AWS credentials upstream: its "
                "events are signed with them, and the proxy is configured with a Bedrock API key"
            )
        credentials = await self._aws_credentials(target.member, identity)
        region = target.upstream.region
        headers["x-amz-content-sha256"] = eventsig.STREAMING_EVENTS
        date = sigv4.amz_date()
        authorization = headers["authorization"] = sigv4.sign(
            method="POST",
            raw_path=raw_path,
            raw_query=raw_query,
            headers=headers,
            payload_hash=eventsig.STREAMING_EVENTS,
            credentials=credentials,
            region=region,
            service=service.signing_name,
            date=date,
        )
        signature = authorization.rpartition("Signature=")[2]
        return SignatureChain.for_credentials(
            credentials.secret_key, date[:8], region, service.signing_name, signature
        )

    # ------------------------------------------------------------------ the call

    async def exchange(
        self,
        method: str,
        targets: list[Target],
        path: str,
        query: str,
        signed: dict[str, str],
        unsigned: dict[str, str],
        payload_hash: str,
        body: http1.Body,
        x: Exchange,
        service: Service,
        failover: bool,
    ) -> h2pool.UpstreamResponse:
        """Sign for and send to the first target; on a throttle, a 5xx or a failed
        connection, the same bytes go to the next (when ``failover``). Nothing of the
        response has reached the client yet, so a user sees only the latency. The last
        target's answer, whatever it is, is the one returned."""
        identity = x.identity
        last = len(targets) - 1 if failover else 0
        for i, target in enumerate(targets):
            member = target.member
            if self.fleet.configured:
                x.account, x.upstream = member.account.name, member.name
            x.region = target.upstream.region
            upstream = target.upstream
            # Each attempt signs its own copy; a single one can take the caller's dict.
            headers = dict(signed) if last else signed
            headers["host"] = upstream.host
            raw_path = upstream.base_path + path
            try:
                await self.authorize(
                    headers,
                    method=method,
                    raw_path=raw_path,
                    raw_query=query,
                    payload_hash=payload_hash,
                    target=target,
                    service=service,
                    identity=identity,
                    patient=i >= last,
                )
                headers.update(unsigned)
                response = await self.send(
                    method, upstream, raw_path + ("?" + query if query else ""), headers, body, x
                )
            except errors.AwsError as exc:
                # No credentials for the member, or no connection to it; a read timeout
                # (the request may be running upstream) is never moved.
                if i >= last or exc.code == "ModelTimeoutException":
                    raise
                self._moved(member, "failure", str(exc.code))
                continue
            if i < last and (response.status == 429 or response.status >= 500):
                code = response.headers.get("x-amzn-ErrorType", "").split(":")[0]
                response.close()
                self._moved(member, "throttle" if response.status == 429 else "failure", code)
                continue
            if self.fleet.configured and response.status < 500 and response.status != 429:
                self.fleet.health.succeeded(member.name)
            return response
        raise AssertionError("unreachable: the last target returns or raises")

    def _moved(self, member: Member, kind: str, code: str) -> None:
        self.fleet.health.failed(member.name)
        if self._metrics is not None:
            self._metrics.upstream_event(member.name, kind + "s")
            self._metrics.upstream_event(member.name, "failovers")
        log.info("moved a request off %s after %s %s", member.name, kind, code)

    async def send(
        self,
        method: str,
        upstream: Upstream,
        target: str,
        headers: dict[str, str],
        body: http1.Body,
        x: Exchange,
    ) -> h2pool.UpstreamResponse:
        """Send and wait for the response's head; failures become AWS-shaped errors.
        An event stream goes on a shared HTTP/2 connection where the upstream speaks it."""
        if x.upstream_started is None:  # a failover's time counts as upstream time
            x.upstream_started = time.perf_counter()
        op = x.operation
        origin = upstream.origin
        h2 = self._h2
        response: h2pool.UpstreamResponse
        try:
            if (
                h2 is not None
                and op is not None
                and op.streaming_output
                and not x.single_answer
                and not h2.refuses(origin)
            ):
                try:
                    response = await h2.request(method, origin, target, headers, body)
                except h2pool.NotHttp2:  # found out before anything was sent
                    log.info("%s does not speak HTTP/2: event streams go on HTTP/1.1", origin)
                    response = await self.pool.request(method, origin, target, headers, body)
            else:
                response = await self.pool.request(method, origin, target, headers, body)
        except http1.ReadTimeout:
            raise errors.upstream_timeout(
                "The upstream service did not respond within "
                f"{self._settings.first_byte_timeout:g} s"
            ) from None
        except http1.UpstreamError as exc:
            raise errors.service_unavailable(str(exc)) from None
        # The head is in: from now on the limit is the silence between chunks, for a
        # small answer read whole as for a stream (first_byte_timeout is for the head).
        response.set_read_timeout(self._settings.idle_timeout)
        x.upstream_headers_at = time.perf_counter()
        x.status = response.status
        return response

    async def read_whole(self, upstream: h2pool.UpstreamResponse) -> bytes:
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

    async def signed_get(
        self, service: Service, region: str, path: str, arn: str | None = None
    ) -> tuple[int, bytes]:
        """A GET with the server's credentials, read whole: (status, body). It goes to
        the account and region that own ``arn`` (a job, a profile) when one is named."""
        target = self.fleet.owner_target(service, region, arn)
        upstream = target.upstream
        headers = {"host": upstream.host, "accept": "application/json"}
        raw_path = upstream.base_path + path
        if service is S3_SERVICE:
            headers["x-amz-content-sha256"] = sigv4.EMPTY_SHA256
        await self.authorize(
            headers,
            method="GET",
            raw_path=raw_path,
            raw_query="",
            payload_hash=sigv4.EMPTY_SHA256,
            target=target,
            service=service,
        )
        response = await self.pool.request("GET", upstream.origin, raw_path, headers)
        try:
            return response.status, await response.read()
        finally:
            response.release()

    async def control_get(
        self, region: str, path: str, arn: str | None = None
    ) -> tuple[int, bytes]:
        """A GET on the Bedrock control plane (model references, batch jobs)."""
        return await self.signed_get(BEDROCK_CONTROL, region, path, arn)

    async def s3_get(
        self, region: str, bucket: str, key: str, arn: str | None = None
    ) -> tuple[int, bytes]:
        """An S3 object (path-style), read with the server's credentials."""
        path = "/" + quote(bucket, safe="") + "/" + quote(key, safe="/-_.~")
        return await self.signed_get(S3_SERVICE, region, path, arn)

    # ------------------------------------------------------------------ the body

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
        """Copy what ``read`` returns (an HTTP/1.1 body, or an HTTP/2 stream's: both raise
        ``http1``'s errors) until it ends; the failure to report (the proxy's own refusal,
        when ``watch`` found the key revoked), CLIENT_GONE, or None when complete. Event
        streams are cut at frame boundaries."""
        sent = 0
        failure: str | errors.AwsError | None = None
        while True:
            try:
                data = await read()
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
            try:
                await response.write(data)
            except ConnectionError:
                x.error = "ClientDisconnected"
                x.bytes_out = sent
                x.incomplete = True
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
