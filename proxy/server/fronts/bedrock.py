"""The Bedrock front: ``/bedrock/...`` to bedrock-runtime, bedrock-agent-runtime and the
control plane, byte for byte.

It prepares each request: the operation from the raw path, the caller, the body (read once,
since SigV4 hashes it, and sent as the same bytes), the key's allow-lists, job ownership,
admission by the limits, the upstream's headers. The upstream call and the relay are
``upstream``'s; tracking and completion are the pipeline's.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import ClassVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from ...access import policy
from ...access.auth import Authenticator, SignedRequest
from ...access.jobs import JOB_LABELS, LISTINGS, STARTS, JobRegistry
from ...access.keywatch import KeyWatch
from ...access.modelrefs import LOOKUPS_PER_MINUTE, ModelRefs, resolvable
from ...access.owned import OWNED_BODIES, Claim, OwnedSessions
from ...access.unverified import UnverifiedBodies
from ...exchange import Exchange, Identity
from ...metering.annotations import read_annotations
from ...metering.service import Metering
from ...metering.usage import Meter, meter_for
from ...observe.metrics import Metrics
from ...wire import errors, eventsig, eventstream, h2pool, http1
from ...wire.clock import SYSTEM_CLOCK, Clock
from ...wire.compat import ROLES, CompatRouter
from ...wire.h2client import Http2Stream
from ...wire.headers import RequestHeaders, response_headers, sort_request_headers
from ...wire.modelids import parse_arn
from ...wire.redact import redact_principals
from ...wire.routing import Operation, Router
from ..config import Settings
from ..fleet import Target
from ..fleet.affinity import AFFINITY_HEADER, affinity_key
from ..listen.aiohttp_adapter import drop_idle_timer
from ..listen.responses import aws_response
from ..upstream import EVENT_STREAM, Framing, UpstreamClient
from . import duplex
from .bodies import RequestBody, read_body

# Which pool member served the request ("account/region"), when upstreams are configured.
UPSTREAM_HEADER = "x-bedrock-proxy-upstream"

BASE_PATH = "/bedrock"
# Bedrock AgentCore's data plane and control plane, each as its SDK's endpoint_url.
AGENTCORE_PATH = "/bedrock-agentcore"
AGENTCORE_CONTROL_PATH = "/bedrock-agentcore-control"
# Responses of known length up to this size are read whole and sent in one write.
_SMALL_RESPONSE = 256 * 1024
# Operations whose model is named in the body rather than the path.
_MODEL_IN_BODY = frozenset({"StartAsyncInvoke", "CreateModelInvocationJob"})


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
        clock: Clock = SYSTEM_CLOCK,
        owned: OwnedSessions | None = None,
        base_path: str = BASE_PATH,
    ) -> None:
        self._clock = clock
        # AgentCore's sessions, owned per key (the AgentCore front's), and the path prefix
        # the front serves (/bedrock, /bedrock-agentcore).
        self._owned = owned
        self._base = base_path
        self._settings = settings
        self._duplex = duplex_relay
        self._router = router
        self._auth = authenticator
        self._upstream = upstream
        self._metering = metering
        self._metrics = metrics
        self._jobs = jobs
        self._model_refs = model_refs
        self._max_body = settings.max_body_bytes
        self._unverified = UnverifiedBodies(settings.max_unverified_body_bytes)
        # What fronts vary by data rather than code (attributes, not methods: no Python
        # call per request): how the request's headers go upstream, and which meter reads
        # an operation's answer.
        self.sort_headers: Callable[[CIMultiDictProxy[str]], RequestHeaders] = sort_request_headers
        self.meter_for: Callable[[str], Meter] = meter_for

    def render(self, exc: errors.AwsError, x: Exchange, request: web.Request) -> web.Response:
        return aws_response(exc, x.request_id)

    async def expect_handler(self, request: web.Request) -> web.StreamResponse | None:
        """Answer ``Expect: 100-continue`` with 413 at once when the body is too large."""
        length = request.content_length
        if length is not None and length > self._max_body:
            return aws_response(errors.payload_too_large(self._max_body))
        if request.version != aiohttp.HttpVersion11:
            return None
        expect = request.headers.get("Expect", "")
        if expect.lower() != "100-continue":
            return aws_response(
                errors.AwsError(417, "ValidationException", f"Unsupported Expect header: {expect}")
            )
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the response proper
        return None

    # ------------------------------------------------------------------ what fronts vary

    # Whether the front reads bodies and answers through the hooks below (``inspect``,
    # ``answered``, ``streamed``): they run only then, so the native fronts make no
    # coroutine per request for a hook that does nothing.
    hooked: ClassVar[bool] = False
    # The operations whose successful, non-streamed answer is read whole and handed to
    # ``answered`` (data, not a method: it is asked of every answer).
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

    # ------------------------------------------------------------------ request

    async def forward(self, request: web.Request, x: Exchange) -> web.StreamResponse:
        """Send, then answer with what came back. The request's side (headers, body,
        signature, targets) lives in ``_send``'s frame, which is gone before the response
        streams: held for a stream's life, it was ~1.5 KB of every open stream. (The
        answer is not a coroutine of its own either: one frame less per open stream.)"""
        sent = await self._send(request, x)
        if isinstance(sent, web.StreamResponse):  # the bidirectional relay, already run
            return sent
        upstream, job_request, claim = sent
        completed = False
        meter = x.meter
        try:
            if upstream.status >= 400:
                x.upstream_error = upstream.headers.get("x-amzn-ErrorType", "").split(":")[
                    0
                ] or str(upstream.status)
            x.upstream_request_id = upstream.headers.get("x-amzn-RequestId")
            out_headers = response_headers(upstream.headers)
            out_headers["x-bedrock-proxy-request-id"] = x.request_id
            if x.upstream is not None:
                out_headers[UPSTREAM_HEADER] = x.upstream
            if meter is not None:
                meter.on_headers(upstream.status, upstream.headers)
            framing = self.framing(x, upstream.headers.get("Content-Type", ""))
            is_event_stream = framing is not None
            length = upstream.content_length
            op = x.operation
            identity = x.identity
            # A job or session listing a virtual key sees filtered is read whole, whatever
            # its size.
            owned_listing = (
                upstream.status == 200
                and op is not None
                and (op.name in LISTINGS or (claim is not None and claim.listing))
                and identity is not None
                and identity.record is not None
            )
            if (
                claim is not None
                and claim.from_header is not None
                and identity is not None
                and upstream.status == 200
            ):  # a session AWS named in the answer's head
                await self._owned_remember(identity, claim, upstream.headers, None)
                claim = None
            failed = upstream.status >= 400
            hooked_answer = (
                upstream.status == 200 and op is not None and op.name in self.reads_answers
            )
            if not is_event_stream and (
                owned_listing
                or failed
                or hooked_answer
                or claim is not None  # a start's answer names the session it started
                or (length is not None and length <= _SMALL_RESPONSE)
            ):
                data = await self._upstream.read_whole(upstream)
                completed = True
                x.upstream_done = time.perf_counter()
                if failed:  # an error names the server's principal: not to the client
                    data = redact_principals(data)
                if claim is not None and identity is not None and upstream.status == 200:
                    if claim.listing:
                        assert self._owned is not None and op is not None
                        data = await self._owned.filter_listing(identity, op, claim, data)
                    else:
                        await self._owned_remember(identity, claim, upstream.headers, data)
                if identity is not None and op is not None:
                    if owned_listing and op.name in LISTINGS:
                        data = await self._jobs.filter_listing(identity, op, data)
                    elif upstream.status == 200 and job_request is not None:
                        await self._jobs.remember(
                            identity, op, x.model, data, job_request, x.region
                        )
                if hooked_answer:
                    data = await self.answered(x, data)
                x.bytes_out = len(data)
                if meter is not None:
                    meter.feed(data)
                    self._cost_headers(x, out_headers)
                return web.Response(status=upstream.status, body=data, headers=out_headers)
            if meter is not None and not is_event_stream and meter.usage.found:
                self._cost_headers(x, out_headers)  # InvokeModel: usage came in the headers
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            del out_headers  # copied into the response: not held for the stream's life
            if length is not None and not is_event_stream:
                response.content_length = length
            await response.prepare(request)
            if is_event_stream:
                drop_idle_timer(request)
                upstream.forget_headers()
                self._metrics.active_streams += 1
            try:
                completed = await self._upstream.relay(
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
            if self.hooked and upstream.status == 200:
                await self.streamed(x)
            return response
        finally:
            upstream.finish(completed)

    async def _send(
        self, request: web.Request, x: Exchange
    ) -> tuple[h2pool.UpstreamResponse, bytes | None, Claim | None] | web.StreamResponse:
        """Route, authenticate, check and send: the upstream's response, and the request
        body when the proxy must remember a job it starts (the bidirectional relay runs
        here whole, and returns its response)."""
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
            return await self._bidirectional(request, x, match.labels, match.path, query, headers)
        # The credential is judged from the headers before any body is read, so a refusal
        # costs no body and keeps nothing.
        identity = await self._auth.identify(request)
        if identity is None:  # SigV4 by a known key: its signature covers the body
            with self._unverified.hold(request.content_length, self._max_body):
                body = await self._read_body(request)
                client_path, _, _ = request.raw_path.partition("?")
                identity = await self._auth.authenticate(
                    request,
                    SignedRequest(
                        request.method,
                        client_path,
                        query,
                        body.sha256,
                        service=op.service.signing_name,  # bedrock, or bedrock-agentcore
                    ),
                )
        else:
            body = await self._read_body(request)
        x.bytes_in = body.size
        x.identity = identity  # before the policy, so a refusal is attributed to the key
        if self.hooked:
            owner_check = self.inspect(x, match.labels, headers, body)
            if owner_check is not None:
                x.pinned = await owner_check
        await self._resolve_model(x)
        spec = identity.spec
        if spec is not None:
            # A body read in one piece is checked as it is; a large one is joined (a copy)
            # only when the key's allow-lists need it read.
            data = body.data if isinstance(body.data, bytes) else None
            if data is None and policy.needs_body(spec, op):
                data = body.joined()
            policy.check(spec, op, match.labels, headers.signed, data, query, _aliases(x))
        await self._jobs.check(identity, op, match.labels)
        claim = None
        if self._owned is not None:
            claim = await self._owned.check(
                identity,
                op,
                match.labels,
                headers.signed,
                query,
                body.joined() if op.name in OWNED_BODIES else None,
            )
        if x.model is None and op.name in _MODEL_IN_BODY:
            x.model = policy.body_model(op, body.joined())
        targets = await self._targets(request, x, match.labels, body)
        if headers.annotations:
            x.annotations = read_annotations(headers.annotations)
        meter = x.meter = self.meter_for(op.name)
        if meter.reads_request:  # what is billed is in the request (Rerank's queries)
            meter.on_request(body.joined())
        await self._metering.admit(x, body.size)
        signed, unsigned = headers.signed, headers.unsigned
        if body.size or not isinstance(body.data, bytes):
            unsigned["content-length"] = str(body.size)
        reply = await self._upstream.exchange(
            request.method,
            targets,
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
        return reply, body.joined() if op.name in STARTS else None, claim

    async def _bidirectional(
        self,
        request: web.Request,
        x: Exchange,
        labels: dict[str, str],
        path: str,
        query: str,
        headers: RequestHeaders,
    ) -> web.StreamResponse:
        """InvokeModelWithBidirectionalStream: the same checks as any call, on the headers
        alone (the body is the session), then the full-duplex relay (``duplex``)."""
        op = x.operation
        assert op is not None
        identity = await self._auth.identify(request)
        client_chain = None
        if identity is None:  # SigV4 by a known key: the frames are signed on its chain
            client_path, _, _ = request.raw_path.partition("?")
            identity = await self._auth.authenticate(
                request,
                SignedRequest(request.method, client_path, query, eventsig.STREAMING_EVENTS),
            )
            client_chain = await self._auth.event_chain(request)
        x.identity = identity
        await self._resolve_model(x)
        if identity.spec is not None:
            policy.check(identity.spec, op, labels, headers.signed, None, query, _aliases(x))
        # A session is one long request: it goes to the first member, and is never moved.
        target = (await self._targets(request, x, labels, None))[0]
        upstream = target.upstream
        if self._upstream.fleet.configured:
            x.account, x.upstream = target.member.account.name, target.member.name
        if request.version.major != 2:
            raise errors.validation(f"{op.name} requires HTTP/2")
        if headers.annotations:
            x.annotations = read_annotations(headers.annotations)
        x.meter = meter_for(op.name)
        await self._metering.admit(x, 0)
        signed, unsigned = headers.signed, headers.unsigned
        signed["host"] = upstream.host
        signed.pop("x-amz-content-sha256", None)
        raw_path = upstream.base_path + path
        server_chain = await self._upstream.authorize_stream(
            signed,
            raw_path=raw_path,
            raw_query=query,
            target=target,
            service=op.service,
            identity=identity,
        )
        signed.update(unsigned)
        x.upstream_started = time.perf_counter()
        try:
            up = await Http2Stream.open(
                upstream.origin,
                "POST",
                raw_path + ("?" + query if query else ""),
                list(signed.items()),
                self._settings.connect_timeout,
            )
        except http1.UpstreamError as exc:
            raise errors.service_unavailable(str(exc)) from None
        out_headers = CIMultiDict({"x-bedrock-proxy-request-id": x.request_id})
        if x.upstream is not None:
            out_headers[UPSTREAM_HEADER] = x.upstream
        return await self._duplex.run(request, x, up, client_chain, server_chain, out_headers)

    async def _owned_remember(
        self, identity: Identity, claim: Claim, headers: Mapping[str, str], data: bytes | None
    ) -> None:
        assert self._owned is not None  # a claim comes from it
        await self._owned.remember(identity, claim, headers, data)

    def watch(self, x: Exchange, max_seconds: float | None = None) -> KeyWatch | None:
        """A long request's key, looked at again as it runs (a virtual key only)."""
        identity = x.identity
        if identity is None or identity.record is None:
            return None
        return KeyWatch(self._auth, identity, self._clock, max_seconds=max_seconds)

    async def _resolve_model(self, x: Exchange) -> None:
        """The model an application-profile or provisioned-model ARN runs (the policy
        checks both), looked up in the account and region the ARN names."""
        if x.model is None or not resolvable(x.model):
            return
        identity = x.identity
        if not self._upstream.fleet.holds(identity, x.model):
            return  # not in the key's pool: never looked up there (routing refuses it)
        spec = identity.spec if identity is not None else None
        per_minute = LOOKUPS_PER_MINUTE
        if spec is not None and spec.rpm_limit is not None:
            per_minute = max(1, min(per_minute, spec.rpm_limit))
        caller = identity.key_id if identity is not None and not identity.is_master else None
        resolved = await self._model_refs.resolve(x.model, caller, per_minute)
        if resolved is not None:
            x.model_ref, x.model = x.model, resolved

    async def _targets(
        self, request: web.Request, x: Exchange, labels: dict[str, str], body: RequestBody | None
    ) -> list[Target]:
        """The members to try: where the named model (or job) may go, in the pool the
        key's route picks, the conversation's member first."""
        op = x.operation
        assert op is not None
        named = x.model_ref or x.model
        if not self._upstream.fleet.configured:  # one member: nothing to choose between
            targets = self._upstream.targets(op.service, request, x.identity, named)
            x.region = targets[0].upstream.region
            return targets
        if x.pinned is not None:
            # Stored state lives in the member that made it: only there (a member since
            # taken out of the configuration: routed as usual, and answered not found).
            pinned = self._upstream.fleet.member_target(op.service, x.pinned)
            if pinned is not None:
                x.region = pinned.upstream.region
                return [pinned]
        if op.name in JOB_LABELS:
            named = await self._jobs.arn(labels.get(JOB_LABELS[op.name], ""))
            parsed = parse_arn(named) if named else None
            if parsed is not None and parsed.region:
                # A job is read and stopped in the account and region that run it, whatever
                # pool its key (or its team) is routed to now (its ownership is checked).
                target = self._upstream.fleet.owner_target(op.service, parsed.region, named)
                x.region = target.upstream.region
                return [target]
        key_id = x.identity.key_id if x.identity is not None else None

        def affinity() -> bytes | None:
            data = body.data if body is not None and isinstance(body.data, bytes) else None
            return affinity_key(key_id, request.headers.get(AFFINITY_HEADER), data)

        targets = self._upstream.targets(
            op.service, request, x.identity, named, affinity, route_model=x.model
        )
        x.region = targets[0].upstream.region
        return targets

    async def _read_body(self, request: web.Request) -> RequestBody:
        return await read_body(request, self._max_body, self._settings.body_timeout)

    # ------------------------------------------------------------------ response

    def _cost_headers(self, x: Exchange, headers: CIMultiDict[str]) -> None:
        """Non-stream responses can carry their cost; streams' costs are in the ledger."""
        cost = self._metering.price(x)
        if self._metering.cost_headers and x.usage is not None and x.usage.found:
            headers["x-bedrock-proxy-tokens"] = str(x.usage.total_tokens)
            if cost is not None:
                headers["x-bedrock-proxy-cost"] = f"{cost:.10f}".rstrip("0").rstrip(".") or "0"


# Operations that run only models (or read a knowledge base): moving one that was throttled
# or failed to another member repeats nothing. Writes, jobs and agents (which may have run
# actions, and keep sessions in one account) are never moved.
_MOVABLE_AGENT_RUNTIME = frozenset(
    {
        "Retrieve",
        "Rerank",
        "GenerateQuery",
        "OptimizePrompt",
        "RetrieveAndGenerate",
        "RetrieveAndGenerateStream",
    }
)


def may_failover(op: Operation, method: str) -> bool:
    role = ROLES.get(op.name)
    if role is not None:  # the compatible APIs: stored state lives where it was made
        return role in ("model", "models", "")
    if method in ("GET", "HEAD"):
        return True
    if op.service.name == "bedrock-runtime":
        return op.name != "StartAsyncInvoke"
    return op.service.name == "bedrock-agent-runtime" and op.name in _MOVABLE_AGENT_RUNTIME


def _aliases(x: Exchange) -> dict[str, str] | None:
    return {x.model_ref: x.model} if x.model_ref and x.model else None


def refuse_other_providers(request: web.BaseRequest) -> None:
    """Other gateways route ``x-model-provider: openai|gemini`` by translating payloads."""
    provider = request.headers.get("x-model-provider")
    if provider is not None and provider.strip().lower() != "bedrock":
        raise errors.validation(
            f"x-model-provider {provider!r} is not supported: this proxy passes Bedrock "
            "requests through unchanged and never translates them to another provider's API"
        )
