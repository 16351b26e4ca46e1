"""The admin API at the gate (``gate.Door``), and what its routes share.

Its callers: the master key (checked in constant time, no store lookup), an admin API
token (``access.admin_tokens``), or, where a key may read itself, any valid virtual key.
Each route names what it needs (``access.roles``), which the caller's role must grant. A
JSON body is read only once the caller is known, within the body deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from ...access.admin_tokens import TOKEN_PREFIX, AdminTokens
from ...access.auth import Authenticator
from ...access.roles import Reach, actor_of, reach_of
from ...exchange import MASTER, Exchange, Identity
from ...store.audit import Actor
from ...wire import errors
from ..gate import Admitted, Gate, LocalDoor
from ..listen.bodies import RequestBody, read_body
from ..listen.forwarded import TrustedProxies
from ..listen.responses import aws_response

log = logging.getLogger("bedrock_proxy.admin")

Handler = Callable[[web.Request], Awaitable[Any]]
_MAX_BODY = 1024 * 1024


@dataclass(frozen=True, slots=True)
class AdminCall:
    """An admitted admin call, as its handler reads it."""

    identity: Identity
    reach: Reach
    actor: Actor
    body: RequestBody | None


# The admitted call, for the route's handler.
CALL: web.RequestKey[AdminCall] = web.RequestKey("admin_call", AdminCall)


class AdminDoor(LocalDoor):
    def __init__(
        self,
        auth: Authenticator,
        tokens: AdminTokens,
        need: str,
        keys_read_themselves: bool,
        body_timeout: float,
    ) -> None:
        self._auth, self._tokens = auth, tokens
        self.need = need
        self._keys_read_themselves = keys_read_themselves
        self._body_timeout = body_timeout

    async def credential(self, request: web.Request, x: Exchange) -> Identity | None:
        key = self._auth.presented_key(request.headers)
        if key is not None and self._auth.is_master_key(key):
            return MASTER
        if key is not None and key.startswith(TOKEN_PREFIX):
            return await self._tokens.identify(key)
        if self._keys_read_themselves:
            return await self._auth.authenticate(request)
        raise errors.access_denied("This route requires the master key or an admin API token")

    async def read(self, request: web.Request, x: Exchange) -> RequestBody | None:
        if not request.body_exists:
            return None
        # aiohttp's own limit (client_max_size) would answer in text/plain.
        return await read_body(request, _MAX_BODY, self._body_timeout)

    async def authorize(self, request: web.Request, x: Exchange, body: RequestBody | None) -> None:
        identity = x.identity
        assert identity is not None
        if self._keys_read_themselves and identity.kind == "virtual":
            return  # a key reading itself: the handler checks it is its own
        reach_of(identity).require(self.need)


class AdminRoutes:
    """Admin routes behind the gate: each with the door for what it needs."""

    def __init__(
        self,
        auth: Authenticator,
        tokens: AdminTokens,
        gate: Gate,
        proxies: TrustedProxies,
        body_timeout: float,
        enabled: bool,
    ) -> None:
        self._auth, self._tokens, self._gate = auth, tokens, gate
        self._proxies, self._body_timeout = proxies, body_timeout
        self._enabled = enabled

    def json(
        self, handler: Handler, need: str, params: tuple[str, ...] = (), own_key: bool = False
    ) -> Handler:
        """A JSON route: its handler's result, as JSON, once the gate has admitted it."""

        async def answer(request: web.Request) -> web.StreamResponse:
            result = await handler(request)
            return web.Response(body=orjson.dumps(result), content_type="application/json")

        return self.gated(answer, need, params, own_key)

    def gated(
        self,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        need: str,
        params: tuple[str, ...] = (),
        own_key: bool = False,
    ) -> Handler:
        """``handler`` behind the gate: refusals and failures AWS-shaped, never aiohttp's
        text page or a trace."""
        door = AdminDoor(self._auth, self._tokens, need, own_key, self._body_timeout)

        async def gated(request: web.Request) -> web.StreamResponse:
            x = Exchange(errors.new_request_id(), request.method, time.perf_counter())
            try:
                check_query(request, params)
                if not self._enabled:
                    raise errors.access_denied("The admin API needs a master key to be configured")
                admitted: Admitted[None] = await self._gate.admit(request, x, door)
                identity = admitted.identity
                actor = actor_of(identity, self._proxies.client(request), x.request_id)
                request[CALL] = AdminCall(identity, reach_of(identity), actor, admitted.body)
                return await handler(request)
            except errors.AwsError as exc:
                return aws_response(exc)
            except Exception:
                log.exception("admin API error on %s %s", request.method, request.path)
                return aws_response(errors.internal())

        return self._gate.guard(gated, door)


def check_query(request: web.Request, accepted: tuple[str, ...]) -> None:
    """An unknown or repeated query parameter is a 400 naming the accepted ones: a filter
    silently ignored would answer a question nobody asked (every key's rows)."""
    query = request.query
    for name in query:
        if name not in accepted:
            allowed = ", ".join(accepted) if accepted else "none"
            raise errors.validation(
                f"Unknown query parameter {name!r} for {request.path} (accepted: {allowed})"
            )
        if len(query.getall(name)) > 1:
            raise errors.validation(f"The query parameter {name!r} appears more than once")


def json_body(request: web.Request) -> dict[str, Any]:
    """The body the gate read, as a JSON object."""
    read = request[CALL].body
    try:
        body = orjson.loads(read.joined() if read is not None and read.size else b"{}")
    except orjson.JSONDecodeError:
        raise errors.validation("The request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise errors.validation("The request body must be a JSON object")
    return body
