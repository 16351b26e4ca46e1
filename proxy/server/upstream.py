"""The upstream call every front shares: resolve, sign with the server's credentials, send
on the pooled HTTP/1.1 client (event streams on shared HTTP/2 connections, ``h2pool``),
and relay the response body as it arrives.

Fronts prepare a request (path, headers, body) and decide how to answer; this module never
calls back into them. Event streams are cut at frame boundaries, so a failure mid-stream
is reported with an exception frame after the last whole frame, never after half of one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web

from ..exchange import Exchange, Identity
from ..observe.metrics import Metrics
from ..wire import errors, h2pool, http1, sigv4
from ..wire.endpoints import Upstream, valid_region
from ..wire.routing import Service
from .config import Settings
from .fleet import Fleet, Member, Target
from .gate import Admitted
from .pipeline import Shutdown
from .relay import BodyRelay
from .signer import S3_SERVICE, UpstreamSigner

log = logging.getLogger("bedrock_proxy.upstreams")


def _NO_AFFINITY() -> bytes | None:
    return None


BEDROCK_CONTROL = Service(name="bedrock", endpoint_prefix="bedrock", signing_name="bedrock")


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
        self._pool: http1.Pool | None = None
        self._h2: h2pool.Http2Pool | None = None
        # The answer's body, copied to the client (attributes: no extra call per request).
        body = BodyRelay(settings.idle_timeout, shutdown)
        self.relay, self.copy = body.relay, body.copy
        signer = UpstreamSigner(fleet, settings.upstream_bearer_token)
        self.authorize, self.authorize_stream = signer.authorize, signer.authorize_stream

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

    # ------------------------------------------------------------------ the call

    async def exchange(
        self,
        method: str,
        admitted: Admitted[Any],
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
        """Sign for and send an admitted call to its first member; on a throttle, a 5xx or
        a failed connection, the same bytes go to the next (when ``failover``): nothing
        has reached the client yet. The last member's answer is the one returned."""
        last = len(admitted.targets) - 1 if failover else 0
        for i, target in enumerate(admitted.targets):
            member = target.member
            if self.fleet.configured:
                x.account, x.upstream = member.account.name, member.name
            upstream = target.upstream
            x.region = upstream.region
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
                    identity=admitted.identity,
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
