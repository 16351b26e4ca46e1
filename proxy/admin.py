"""The admin API, LiteLLM-compatible so people can move over: /key/generate, /key/info,
/key/update, /key/delete, /key/list, /key/regenerate. Master key only, except that a
virtual key may read its own /key/info."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from . import errors
from .auth import Authenticator
from .keyservice import KeyService

Handler = Callable[[web.Request], Awaitable[Any]]


class AdminApi:
    def __init__(self, service: KeyService | None, auth: Authenticator) -> None:
        self._service = service
        self._auth = auth

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/key/generate", self._wrap(self.generate))
        app.router.add_get("/key/info", self._wrap(self.info, master_only=False))
        app.router.add_post("/key/update", self._wrap(self.update))
        app.router.add_post("/key/delete", self._wrap(self.delete))
        app.router.add_get("/key/list", self._wrap(self.list))
        app.router.add_post("/key/regenerate", self._wrap(self.regenerate))

    def _wrap(self, handler: Handler, master_only: bool = True) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                if self._service is None:
                    raise errors.access_denied("The admin API needs a master key to be configured")
                if master_only:
                    await self._auth.master_only(request)
                result = await handler(request)
            except errors.AwsError as exc:
                return exc.to_response()
            return web.Response(body=orjson.dumps(result), content_type="application/json")

        return wrapped

    @property
    def service(self) -> KeyService:
        assert self._service is not None
        return self._service

    async def generate(self, request: web.Request) -> Any:
        return await self.service.generate(await _json_body(request))

    async def info(self, request: web.Request) -> Any:
        ref = request.query.get("key")
        identity = await self._auth.authenticate(request)
        if identity.is_master:
            if not ref:
                raise errors.validation("key is required")
            return await self.service.info(ref)
        assert identity.key_id is not None
        if ref and (await self.service.find(ref)).key_id != identity.key_id:
            raise errors.access_denied("A virtual key may only read its own info")
        return await self.service.info(identity.key_id)

    async def update(self, request: web.Request) -> Any:
        body = await _json_body(request)
        return await self.service.update(_ref(body), body)

    async def regenerate(self, request: web.Request) -> Any:
        return await self.service.regenerate(_ref(await _json_body(request)))

    async def delete(self, request: web.Request) -> Any:
        body = await _json_body(request)
        refs = body.get("keys") or []
        refs += body.get("key_aliases") or []
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise errors.validation("keys must be a non-empty list of keys or key ids")
        return {"deleted_keys": await self.service.delete(refs)}

    async def list(self, request: web.Request) -> Any:
        query = request.query
        try:
            page = int(query.get("page", "1"))
            size = int(query.get("size", "100"))
        except ValueError:
            raise errors.validation("page and size must be whole numbers") from None
        filters = {k: query[k] for k in ("user_id", "team_id", "key_alias") if k in query}
        full = query.get("return_full_object", "false").lower() == "true"
        return await self.service.list(filters, page, size, full)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read() if request.body_exists else b"{}"
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise errors.validation("The request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise errors.validation("The request body must be a JSON object")
    return body


def _ref(body: dict[str, Any]) -> str:
    ref = body.get("key")
    if not isinstance(ref, str) or not ref:
        raise errors.validation("key is required")
    return ref
