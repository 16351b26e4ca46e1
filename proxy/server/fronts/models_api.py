"""``GET /v1/models``: the models a key may use, in the OpenAI API's list shape (what the
OpenAI SDK's ``client.models.list()`` and LiteLLM users ask first). A key's allow-list
names models or patterns; patterns, and a key with none, are read against the models
the proxy knows prices for."""

from __future__ import annotations

import fnmatch
import time

import orjson
from aiohttp import web

from ...access.auth import Authenticator
from ...exchange import Exchange, Identity
from ...metering.pricing import PriceTable
from ...wire import compat, errors
from ..gate import Gate, LocalDoor

_GLOB = frozenset("*?[")


class ModelsDoor(LocalDoor):
    """Any valid key (its own list), or the master key (every model)."""

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

    async def credential(self, request: web.Request, x: Exchange) -> Identity | None:
        return await self._auth.authenticate(request)


class ModelsApi:
    def __init__(self, auth: Authenticator, prices: PriceTable, gate: Gate) -> None:
        self._door, self._gate = ModelsDoor(auth), gate
        self._known = sorted({*prices.shipped, *prices.overrides})

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self._gate.guard(self.list, self._door))

    async def list(self, request: web.Request) -> web.Response:
        x = Exchange(errors.new_request_id(), request.method, time.perf_counter())
        try:
            admitted = await self._gate.admit(request, x, self._door)
        except errors.AwsError as exc:
            status = 401 if exc.status == 403 and x.identity is None else exc.status
            refused = errors.AwsError(status, exc.code, exc.message)
            return web.Response(
                status=status,
                body=compat.error_body(compat.OPENAI, refused),
                content_type="application/json",
            )
        spec = admitted.identity.spec
        patterns = spec.models if spec is not None and spec.models else ["*"]
        names = [p for p in patterns if not _GLOB & set(p)]
        for pattern in patterns:
            if _GLOB & set(pattern):
                names += [m for m in self._known if fnmatch.fnmatchcase(m, pattern)]
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "bedrock"}
            for name in dict.fromkeys(names)
        ]
        body = orjson.dumps({"object": "list", "data": data})
        return web.Response(body=body, content_type="application/json")
