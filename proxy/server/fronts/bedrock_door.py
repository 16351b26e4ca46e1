"""How the Bedrock front's requests are read at the gate (``gate.Door``): the caller's key
(a bearer key from the headers, or a SigV4 signature over the body), the resources the
call names (models, resolved from their ARNs; jobs; AgentCore sessions; what a compatible
API's body names), and the members it may go to. One door per request: it holds what
routing read from the raw path, and is gone before the answer streams.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from aiohttp import web

from ...access import policy
from ...access.auth import SignedRequest
from ...access.jobs import JOB_LABELS
from ...access.modelrefs import LOOKUPS_PER_MINUTE, resolvable
from ...access.owned import OWNED_BODIES, Claim
from ...exchange import Exchange, Identity
from ...metering.usage import Meter
from ...wire import errors, eventsig
from ...wire.compat import ROLES
from ...wire.headers import RequestHeaders
from ...wire.modelids import parse_arn
from ...wire.routing import Operation
from ..fleet import Target
from ..fleet.affinity import AFFINITY_HEADER, affinity_key
from ..listen.bodies import RequestBody, read_body

if TYPE_CHECKING:
    from .bedrock import BedrockFront

# Operations whose model is named in the body rather than the path.
_MODEL_IN_BODY = frozenset({"StartAsyncInvoke", "CreateModelInvocationJob"})


class BedrockDoor:
    """A call on the Bedrock front's routes (native, AgentCore, the compatible APIs)."""

    __slots__ = ("front", "headers", "labels", "path", "query")
    upstream = True

    def __init__(
        self,
        front: BedrockFront,
        labels: dict[str, str],
        path: str,
        query: str,
        headers: RequestHeaders,
    ) -> None:
        self.front = front
        self.labels = labels
        self.path = path  # the operation's path, below the front's base
        self.query = query
        self.headers = headers

    def credential(self, request: web.Request, x: Exchange) -> Awaitable[Identity | None]:
        # A refusal costs no body: a bearer key is judged whole, a SigV4 key id must exist.
        return self.front.auth.identify(request)

    def read(self, request: web.Request, x: Exchange) -> Awaitable[RequestBody | None]:
        settings = self.front.settings  # (the reader's own coroutine: no second frame)
        return read_body(request, settings.max_body_bytes, settings.body_timeout)

    async def verify(self, request: web.Request, x: Exchange, body: RequestBody | None) -> Identity:
        assert body is not None and x.operation is not None
        client_path, _, _ = request.raw_path.partition("?")
        return await self.front.auth.authenticate(
            request,
            SignedRequest(
                request.method,
                client_path,
                self.query,
                body.sha256,
                service=x.operation.service.signing_name,  # bedrock, or bedrock-agentcore
            ),
        )

    async def authorize(
        self, request: web.Request, x: Exchange, body: RequestBody | None
    ) -> Claim | None:
        """The key's allow-lists on every resource the call names; its jobs' and stored
        sessions' owners. The decision is the claim on the AgentCore session the call
        starts or continues, which the answer completes."""
        op, identity, front = x.operation, x.identity, self.front
        assert op is not None and identity is not None and body is not None
        labels, signed = self.labels, self.headers.signed
        if front.hooked:
            owner_check = front.inspect(x, labels, self.headers, body)
            if owner_check is not None:
                x.pinned = await owner_check
        # (Guards inline: a coroutine awaited for nothing costs ~1.2k instructions, and
        # most calls name a model id, not an ARN, and no job.)
        if x.model is not None and resolvable(x.model):
            await self._resolve_model(x)
        spec = identity.spec
        if spec is not None:
            # A body read in one piece is checked as it is; a large one is joined (a copy)
            # only when the key's allow-lists need it read.
            data = body.data if isinstance(body.data, bytes) else None
            if data is None and policy.needs_body(spec, op):
                data = body.joined()
            policy.check(spec, op, labels, signed, data, self.query, aliases(x))
        if op.name in JOB_LABELS:
            await front.jobs.check(identity, op, labels)
        claim = None
        if front.owned is not None:
            joined = body.joined() if op.name in OWNED_BODIES else None
            claim = await front.owned.check(identity, op, labels, signed, self.query, joined)
        if x.model is None and op.name in _MODEL_IN_BODY:
            x.model = policy.body_model(op, body.joined())
        return claim

    def route(
        self, request: web.Request, x: Exchange, body: RequestBody | None
    ) -> Awaitable[list[Target]]:
        return self._targets(request, x, body)

    def meter(self, x: Exchange, body: RequestBody | None) -> Meter | None:
        assert x.operation is not None and body is not None
        front = self.front
        meter = front.meter_for(x.operation.name)
        if meter.reads_request:  # what is billed is in the request (Rerank's queries)
            meter.on_request(body.joined())
        if front.hooked:
            front.metered(x, meter)
        return meter

    async def _resolve_model(self, x: Exchange) -> None:
        """The model an application-profile or provisioned-model ARN runs (the policy
        checks both), looked up in the account and region the ARN names."""
        if x.model is None or not resolvable(x.model):
            return
        identity, front = x.identity, self.front
        if not front.upstream.fleet.holds(identity, x.model):
            return  # not in the key's pool: never looked up there (routing refuses it)
        spec = identity.spec if identity is not None else None
        per_minute = LOOKUPS_PER_MINUTE
        if spec is not None and spec.rpm_limit is not None:
            per_minute = max(1, min(per_minute, spec.rpm_limit))
        caller = identity.key_id if identity is not None and not identity.is_master else None
        resolved = await front.model_refs.resolve(x.model, caller, per_minute)
        if resolved is not None:
            x.model_ref, x.model = x.model, resolved

    async def _targets(
        self, request: web.Request, x: Exchange, body: RequestBody | None
    ) -> list[Target]:
        """The members to try: where the named model (or job) may go, in the pool the
        key's route picks, the conversation's member first."""
        op = x.operation
        assert op is not None
        upstream = self.front.upstream
        fleet = upstream.fleet
        named = x.model_ref or x.model
        if not fleet.configured:  # one member: nothing to choose between
            targets = upstream.targets(op.service, request, x.identity, named)
            x.region = targets[0].upstream.region
            return targets
        if x.pinned is not None:
            # Stored state lives in the member that made it: only there (a member since
            # taken out of the configuration: routed as usual, and answered not found).
            pinned = fleet.member_target(op.service, x.pinned)
            if pinned is not None:
                x.region = pinned.upstream.region
                return [pinned]
        if op.name in JOB_LABELS:
            named = await self.front.jobs.arn(self.labels.get(JOB_LABELS[op.name], ""))
            parsed = parse_arn(named) if named else None
            if parsed is not None and parsed.region:
                # A job is read and stopped in the account and region that run it, whatever
                # pool its key (or its team) is routed to now (its ownership is checked).
                target = fleet.owner_target(op.service, parsed.region, named)
                x.region = target.upstream.region
                return [target]
        key_id = x.identity.key_id if x.identity is not None else None

        def affinity() -> bytes | None:
            data = body.data if body is not None and isinstance(body.data, bytes) else None
            return affinity_key(key_id, request.headers.get(AFFINITY_HEADER), data)

        targets = upstream.targets(
            op.service, request, x.identity, named, affinity, route_model=x.model
        )
        x.region = targets[0].upstream.region
        return targets


class BidirectionalDoor(BedrockDoor):
    """InvokeModelWithBidirectionalStream: the same checks on the headers alone (the body
    is the session, signed frame by frame); it goes to one member and is never moved."""

    __slots__ = ()

    async def credential(self, request: web.Request, x: Exchange) -> Identity | None:
        identity = await self.front.auth.identify(request)
        if identity is not None:
            return identity
        # SigV4 by a known key: the request's signature covers the frames' chain only.
        client_path, _, _ = request.raw_path.partition("?")
        return await self.front.auth.authenticate(
            request,
            SignedRequest(request.method, client_path, self.query, eventsig.STREAMING_EVENTS),
        )

    async def read(self, request: web.Request, x: Exchange) -> RequestBody | None:
        return None

    async def authorize(
        self, request: web.Request, x: Exchange, body: RequestBody | None
    ) -> Claim | None:
        op, identity = x.operation, x.identity
        assert op is not None and identity is not None
        await self._resolve_model(x)
        if identity.spec is not None:
            policy.check(
                identity.spec, op, self.labels, self.headers.signed, None, self.query, aliases(x)
            )
        if request.version.major != 2:
            raise errors.validation(f"{op.name} requires HTTP/2")
        return None

    async def route(
        self, request: web.Request, x: Exchange, body: RequestBody | None
    ) -> list[Target]:
        target = (await self._targets(request, x, None))[0]
        if self.front.upstream.fleet.configured:
            x.account, x.upstream = target.member.account.name, target.member.name
        return [target]

    def meter(self, x: Exchange, body: RequestBody | None) -> Meter | None:
        assert x.operation is not None
        return self.front.meter_for(x.operation.name)


def aliases(x: Exchange) -> dict[str, str] | None:
    return {x.model_ref: x.model} if x.model_ref and x.model else None


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


def refuse_other_providers(request: web.BaseRequest) -> None:
    """Other gateways route ``x-model-provider: openai|gemini`` by translating payloads."""
    provider = request.headers.get("x-model-provider")
    if provider is not None and provider.strip().lower() != "bedrock":
        raise errors.validation(
            f"x-model-provider {provider!r} is not supported: this proxy passes Bedrock "
            "requests through unchanged and never translates them to another provider's API"
        )
