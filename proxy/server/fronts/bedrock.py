"""The Bedrock front: ``/bedrock/...`` to bedrock-runtime, bedrock-agent-runtime and the
control plane, byte for byte.

Each request: the operation from the raw path; the gate (``gate``, with this front's
``bedrock_door``): the caller, the body (read once, since SigV4 hashes it, and sent as the
same bytes), the key's allow-lists, job and session ownership, the route, admission by
the limits; then the call, and the answer as the client gets it (listings filtered, what
a start made remembered). Signing and the relay are ``upstream``'s; tracking and
completion are the pipeline's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import ClassVar

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from ...access.auth import Authenticator
from ...access.jobs import LISTINGS, STARTS, JobRegistry
from ...access.keywatch import KeyWatch
from ...access.modelrefs import ModelRefs
from ...access.owned import Claim, OwnedSessions
from ...exchange import Exchange, Identity
from ...metering.service import Metering
from ...metering.usage import Meter, meter_for
from ...observe.metrics import Metrics
from ...wire import errors, eventstream, h2pool
from ...wire.clock import SYSTEM_CLOCK, Clock
from ...wire.compat import CompatRouter
from ...wire.headers import RequestHeaders, response_headers, sort_request_headers
from ...wire.redact import redact_principals
from ...wire.routing import Router
from ..config import Settings
from ..gate import Admitted, Gate
from ..listen.aiohttp_adapter import drop_idle_timer
from ..listen.bodies import RequestBody
from ..listen.responses import aws_response, expect_continue
from ..relay import EVENT_STREAM, Framing
from ..upstream import UpstreamClient
from . import duplex
from .bedrock_door import BedrockDoor, BidirectionalDoor, may_failover, refuse_other_providers
from .duplex import UPSTREAM_HEADER

BASE_PATH = "/bedrock"
# Bedrock AgentCore's data plane and control plane, each as its SDK's endpoint_url.
AGENTCORE_PATH = "/bedrock-agentcore"
AGENTCORE_CONTROL_PATH = "/bedrock-agentcore-control"
# Responses of known length up to this size are read whole and sent in one write.
_SMALL_RESPONSE = 256 * 1024


class BedrockFront:
    def __init__(
        self,
        settings: Settings,
        router: Router | CompatRouter,
        authenticator: Authenticator,
        upstream: UpstreamClient,
        metering: Metering,
        metrics: Metrics,
        jobs: JobRegistry,
        model_refs: ModelRefs,
        duplex_relay: duplex.DuplexRelay,
        gate: Gate,
        clock: Clock = SYSTEM_CLOCK,
        owned: OwnedSessions | None = None,
        base_path: str = BASE_PATH,
    ) -> None:
        self._clock = clock
        # AgentCore's sessions, owned per key (the AgentCore front's), and the path prefix
        # the front serves (/bedrock, /bedrock-agentcore).
        self.owned = owned
        self._base = base_path
        self.settings = settings
        self._duplex = duplex_relay
        self._router = router
        self.auth = authenticator
        self.upstream = upstream
        self._metering = metering
        self._metrics = metrics
        self.jobs = jobs
        self.model_refs = model_refs
        self.gate = gate
        # What fronts vary by data rather than code (attributes, not methods: no Python
        # call per request): how the request's headers go upstream, and which meter reads
        # an operation's answer.
        self.sort_headers: Callable[[CIMultiDictProxy[str]], RequestHeaders] = sort_request_headers
        self.meter_for: Callable[[str], Meter] = meter_for
        self.expect_handler = functools.partial(expect_continue, max_body=settings.max_body_bytes)

    def render(self, exc: errors.AwsError, x: Exchange, request: web.Request) -> web.Response:
        return aws_response(exc, x.request_id)

    # ------------------------------------------------------------------ what fronts vary

    # Whether the hooks below run (``inspect``, ``answered``, ``streamed``, ``metered``):
    # the native fronts make no call per request for a hook that does nothing.
    hooked: ClassVar[bool] = False
    # The operations whose successful, non-streamed answer is read whole for ``answered``.
    reads_answers: ClassVar[frozenset[str]] = frozenset()

    def inspect(
        self, x: Exchange, labels: dict[str, str], headers: RequestHeaders, body: RequestBody
    ) -> Awaitable[str | None] | None:
        """What a front reads from an authenticated request before the policy checks it
        (the compatible APIs' model is in the body). When the request names stored state,
        the check of its owner, to await: the pool member that holds it, if known. (Not a
        coroutine itself: most requests name no stored state, and need none.)"""
        return None

    def framing(self, x: Exchange, content_type: str) -> Framing | None:
        """How a streamed answer is cut and ended early, or None for a plain body."""
        return EVENT_STREAM if content_type.startswith(eventstream.CONTENT_TYPE) else None

    async def answered(self, x: Exchange, data: bytes) -> bytes:
        """A successful answer read whole, as the client gets it."""
        return data

    async def streamed(self, x: Exchange) -> None:
        """A successful streamed answer has been relayed."""

    def metered(self, x: Exchange, meter: Meter) -> None:
        """The call's meter, made (the compatible APIs record stored state as it streams)."""

    # ------------------------------------------------------------------ request

    async def forward(self, request: web.Request, x: Exchange) -> web.StreamResponse:
        """Send, then answer. The request's side (headers, body, signature, targets) lives
        in ``_send``'s frame, gone before the response streams (~1.5 KB an open stream);
        a stream is relayed here, not in a coroutine of its own: one frame less each."""
        sent = await self._send(request, x)
        if isinstance(sent, web.StreamResponse):  # the bidirectional relay, already run
            return sent
        upstream, job_request, claim = sent
        completed = False
        try:
            out_headers = self._answer_head(upstream, x)
            framing = self.framing(x, upstream.headers.get("Content-Type", ""))
            is_event_stream = framing is not None
            length = upstream.content_length
            status, op, identity = upstream.status, x.operation, x.identity
            # A job or session listing a virtual key sees filtered is read whole, whatever
            # its size.
            owned_listing = (
                status == 200
                and op is not None
                and (op.name in LISTINGS or (claim is not None and claim.listing))
                and identity is not None
                and identity.record is not None
            )
            if claim is not None and claim.from_header is not None and status == 200:
                # a session AWS named in the answer's head
                assert identity is not None
                await self._owned_remember(identity, claim, upstream.headers, None)
                claim = None
            hooked_answer = status == 200 and op is not None and op.name in self.reads_answers
            if not is_event_stream and (
                owned_listing
                or status >= 400
                or hooked_answer
                or claim is not None  # a start's answer names the session it started
                or (length is not None and length <= _SMALL_RESPONSE)
            ):
                data = await self.upstream.read_whole(upstream)
                completed = True
                x.upstream_done = time.perf_counter()
                if status != 200 or claim or job_request or owned_listing or hooked_answer:
                    data = await self._answer_whole(
                        x, upstream, data, claim, job_request, owned_listing, hooked_answer
                    )
                return self._whole_response(x, status, data, out_headers)
            meter = x.meter
            if meter is not None and not is_event_stream and meter.usage.found:
                self._cost_headers(x, out_headers)  # InvokeModel: usage came in the headers
            response = web.StreamResponse(status=status, headers=out_headers)
            del out_headers  # copied into the response: not held for the stream's life
            if length is not None and not is_event_stream:
                response.content_length = length
            await response.prepare(request)
            if is_event_stream:
                drop_idle_timer(request)
                upstream.forget_headers()
                self._metrics.active_streams += 1
            try:
                completed = await self.upstream.relay(
                    request,
                    upstream,
                    response,
                    x,
                    framing,
                    self.watch(x) if is_event_stream else None,
                )
            finally:
                x.upstream_done = time.perf_counter()
                if is_event_stream:
                    self._metrics.active_streams -= 1
            if self.hooked and status == 200:
                await self.streamed(x)
            return response
        finally:
            upstream.finish(completed)

    def _answer_head(self, upstream: h2pool.UpstreamResponse, x: Exchange) -> CIMultiDict[str]:
        """The answer's headers, as the client gets them; what the log and meter read."""
        headers = upstream.headers
        if upstream.status >= 400:
            x.upstream_error = headers.get("x-amzn-ErrorType", "").split(":")[0] or str(
                upstream.status
            )
        x.upstream_request_id = headers.get("x-amzn-RequestId")
        out_headers = response_headers(headers)
        out_headers["x-bedrock-proxy-request-id"] = x.request_id
        if x.upstream is not None:
            out_headers[UPSTREAM_HEADER] = x.upstream
        if x.meter is not None:
            x.meter.on_headers(upstream.status, headers)
        return out_headers

    async def _answer_whole(
        self,
        x: Exchange,
        upstream: h2pool.UpstreamResponse,
        data: bytes,
        claim: Claim | None,
        job_request: bytes | None,
        owned_listing: bool,
        hooked_answer: bool,
    ) -> bytes:
        """An answer read whole, as the client gets it: an error without the server's
        principal, listings filtered to the key's own jobs and sessions, what a start
        created remembered as the key's."""
        op, identity, status = x.operation, x.identity, upstream.status
        if status >= 400:  # an error names the server's principal: not to the client
            return redact_principals(data)
        if op is None or identity is None or status != 200:
            return data
        if claim is not None:
            if claim.listing:
                assert self.owned is not None
                data = await self.owned.filter_listing(identity, op, claim, data)
            else:
                await self._owned_remember(identity, claim, upstream.headers, data)
        if owned_listing and op.name in LISTINGS:
            data = await self.jobs.filter_listing(identity, op, data)
        elif job_request is not None:
            await self.jobs.remember(identity, op, x.model, data, job_request, x.region)
        if hooked_answer:
            data = await self.answered(x, data)
        return data

    def _whole_response(
        self, x: Exchange, status: int, data: bytes, out_headers: CIMultiDict[str]
    ) -> web.Response:
        x.bytes_out = len(data)
        if x.meter is not None:
            x.meter.feed(data)
            self._cost_headers(x, out_headers)
        return web.Response(status=status, body=data, headers=out_headers)

    async def _send(
        self, request: web.Request, x: Exchange
    ) -> tuple[h2pool.UpstreamResponse, bytes | None, Claim | None] | web.StreamResponse:
        """Route, pass the gate and send: the upstream's response, and the request body
        when the proxy must remember a job it starts (the bidirectional relay runs here
        whole, and returns its response)."""
        raw = request.raw_path[len(self._base) :]
        path, _, query = raw.partition("?")
        match = self._router.match(request.method, path or "/")
        if match is None:
            raise errors.unknown_operation(request.method, path or "/")
        op = x.operation = match.operation
        x.model = match.labels.get("modelId")
        refuse_other_providers(request)
        headers = self.sort_headers(request.headers)
        if op.name == duplex.OPERATION:
            door = BidirectionalDoor(self, match.labels, match.path, query, headers)
            admitted = await self.gate.admit(request, x, door, headers.annotations)
            return await self._bidirectional(request, x, admitted, door)
        admitted = await self.gate.admit(
            request,
            x,
            BedrockDoor(self, match.labels, match.path, query, headers),
            headers.annotations,
        )
        body = admitted.body
        assert body is not None
        signed, unsigned = headers.signed, headers.unsigned
        if body.size or not isinstance(body.data, bytes):
            unsigned["content-length"] = str(body.size)
        reply = await self.upstream.exchange(
            request.method,
            admitted,
            match.path,
            query,
            signed,
            unsigned,
            body.sha256,
            body.payload(),
            x,
            op.service,
            may_failover(op, request.method),
        )
        # (A start's body is small JSON: joining it copies nothing big.)
        return reply, body.joined() if op.name in STARTS else None, admitted.decision

    async def _bidirectional(
        self,
        request: web.Request,
        x: Exchange,
        admitted: Admitted[Claim | None],
        door: BidirectionalDoor,
    ) -> web.StreamResponse:
        """InvokeModelWithBidirectionalStream, admitted on its headers alone: the
        full-duplex relay (``duplex``) to its one member."""
        client_chain = None
        if (
            admitted.identity.record is not None
            and self.auth.presented_key(request.headers) is None
        ):
            client_chain = await self.auth.event_chain(request)  # SigV4: its frames' chain
        return await self._duplex.start(
            request, x, admitted, door.path, door.query, door.headers, client_chain
        )

    async def _owned_remember(
        self, identity: Identity, claim: Claim, headers: Mapping[str, str], data: bytes | None
    ) -> None:
        assert self.owned is not None  # a claim comes from it
        await self.owned.remember(identity, claim, headers, data)

    def watch(self, x: Exchange, max_seconds: float | None = None) -> KeyWatch | None:
        """A long request's key, looked at again as it runs (a virtual key only)."""
        identity = x.identity
        if identity is None or identity.record is None:
            return None
        return KeyWatch(self.auth, identity, self._clock, max_seconds=max_seconds)

    # ------------------------------------------------------------------ response

    def _cost_headers(self, x: Exchange, headers: CIMultiDict[str]) -> None:
        """Non-stream responses can carry their cost; streams' costs are in the ledger."""
        cost = self._metering.price(x)
        if self._metering.cost_headers and x.usage is not None and x.usage.found:
            headers["x-bedrock-proxy-tokens"] = str(x.usage.total_tokens)
            if cost is not None:
                headers["x-bedrock-proxy-cost"] = f"{cost:.10f}".rstrip("0").rstrip(".") or "0"
