"""The OpenAI- and Anthropic-compatible fronts: Bedrock's own OpenAI and Anthropic APIs,
passed through as the native ones are (the Bedrock front's steps, with what differs here).

- ``/bedrock/openai/v1/...`` and ``/bedrock/anthropic/v1/...`` go to bedrock-runtime's
  same paths; ``/bedrock-mantle/...`` to bedrock-mantle's.
- The SDKs' own credentials: ``Authorization: Bearer`` (the OpenAI SDK,
  ``ANTHROPIC_AUTH_TOKEN``) and ``x-api-key`` (the Anthropic SDK). Neither goes upstream.
- The APIs' own headers (``anthropic-version``, ``anthropic-beta``, ``openai-*`` and the
  SDKs' ``x-stainless-*``) go upstream unchanged.
- The model, server-side tools and stored state are read from the body (``access.compat``);
  usage from the answer or the event stream (``metering.compat_usage``).
- Refusals in the API's own shape and, mid-stream, as the API's own error event.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from ...access import compat as access
from ...exchange import Exchange
from ...metering import compat_usage
from ...metering.usage import Meter
from ...wire import compat, errors
from ...wire.headers import RequestHeaders, sort_request_headers
from ..listen.bodies import RequestBody
from ..relay import SHUTTING_DOWN_MESSAGE, Framing
from .bedrock import BedrockFront

# The base paths, each as its SDK's base URL (``/openai/v1`` and ``/anthropic`` below the
# first; the second as bedrock-mantle's host).
RUNTIME_PATHS = ("/bedrock/openai/v1", "/bedrock/anthropic/v1")
MANTLE_PATH = "/bedrock-mantle"
RUNTIME_ROOTS = {"/openai/v1": compat.OPENAI, "/anthropic/v1": compat.ANTHROPIC}
# bedrock-mantle serves most OpenAI-API models under /v1 and some under /openai/v1.
MANTLE_ROOTS = {
    "/v1": compat.OPENAI,
    "/openai/v1": compat.OPENAI,
    "/anthropic/v1": compat.ANTHROPIC,
}
# Signed, so no hop changes them: the APIs' versions, betas, organisation and project.
_SIGNED_PREFIXES = ("anthropic-", "openai-")
# The SDKs' own description of themselves (retry count, timeout, runtime).
_UNSIGNED_PREFIXES = ("x-stainless-",)
_SSE = "text/event-stream"


def _framing(dialect: str) -> Framing:
    def failure(message: str) -> bytes:
        return compat.stream_error(dialect, errors.internal(message))

    return Framing(
        compat.SseSplitter,
        lambda exc: compat.stream_error(dialect, exc),
        failure,
        compat.stream_error(dialect, errors.service_unavailable(SHUTTING_DOWN_MESSAGE)),
    )


_FRAMINGS = {d: _framing(d) for d in (compat.OPENAI, compat.ANTHROPIC)}
# The operations whose answer the front reads: a listing of models (filtered), and what
# creates stored state (recorded for the key).
_READ_ANSWERS = frozenset(
    name for name, role in compat.ROLES.items() if role in ("models", "create", "conversation")
)


class CompatFront(BedrockFront):
    """The Bedrock front's steps, on a compatible API's routes (see the module's doc)."""

    hooked = True
    reads_answers = _READ_ANSWERS

    def __init__(self, *args: Any, owned_state: access.OwnedState, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._state = owned_state
        self.sort_headers = functools.partial(
            sort_request_headers,
            signed_prefixes=_SIGNED_PREFIXES,
            unsigned_prefixes=_UNSIGNED_PREFIXES,
        )
        self.meter_for = compat_usage.meter_for

    def render(self, exc: errors.AwsError, x: Exchange, request: web.Request) -> web.Response:
        dialect = (
            compat.dialect_of(x.operation)
            if x.operation is not None
            else (compat.ANTHROPIC if "/anthropic/" in request.path else compat.OPENAI)
        )
        status = exc.status
        if status == 403 and x.identity is None:
            status = 401  # no key was accepted: the SDKs' AuthenticationError
        headers = {
            "Content-Type": "application/json",
            "x-bedrock-proxy-request-id": x.request_id,
            **exc.headers,
        }
        body = compat.error_body(dialect, errors.AwsError(status, exc.code, exc.message))
        return web.Response(status=status, body=body, headers=headers)

    def inspect(
        self, x: Exchange, labels: dict[str, str], headers: RequestHeaders, body: RequestBody
    ) -> Awaitable[str | None] | None:
        op = x.operation
        identity = x.identity
        assert op is not None and identity is not None
        inspected = access.inspect(op, body.joined(), headers.signed)
        if inspected.needs_grant is not None:
            access.check_grant(identity, inspected)
        x.single_answer = not inspected.streams
        # (Most calls name no stored state, in the path or the body: no call for them.)
        refs = access.stored_refs(op, labels, inspected) if labels or inspected.continues else ()
        if inspected.model is not None:
            labels[compat.MODEL_LABEL] = x.model = inspected.model
        return self._state.check(identity, refs) if refs else None

    def framing(self, x: Exchange, content_type: str) -> Framing | None:
        if _SSE not in content_type or x.operation is None:  # (no str method call)
            return None
        return _FRAMINGS[compat.dialect_of(x.operation)]

    async def answered(self, x: Exchange, data: bytes) -> bytes:
        op, identity = x.operation, x.identity
        if op is None or identity is None:
            return data
        role = compat.ROLES.get(op.name, "")
        if role == "models" and identity.spec is not None:
            return access.filter_models(identity.spec.models, data)
        if role in ("create", "conversation"):
            await self._state.remember(identity, op, access.created_id(data), x.upstream)
        return data

    async def streamed(self, x: Exchange) -> None:
        meter = x.meter
        if isinstance(meter, compat_usage.ResponsesMeter):
            meter.on_created = None  # (it held the exchange: no cycle outlives the call)

    def metered(self, x: Exchange, meter: Meter) -> None:
        """A streamed response is the key's from the event that names it, before the
        client reads that event: a retrieve sent at once finds it. (Responses only: the
        other APIs store nothing, and their calls keep no closure.)"""
        op, identity = x.operation, x.identity
        if (
            isinstance(meter, compat_usage.ResponsesMeter)
            and op is not None
            and identity is not None
        ):

            async def record(created: str) -> None:
                await self._state.remember(identity, op, created, x.upstream)

            meter.on_created = record
