"""The admin API, LiteLLM-compatible so people can move over: /key/generate, /key/info,
/key/update, /key/delete, /key/list, /key/regenerate; spend reports (/spend/logs,
/spend/report) and named limits (/limit/*). Master key only, except that a virtual key may
read its own /key/info, totals included."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from . import errors
from .auth import Authenticator
from .keyservice import KeyService
from .reports import Reports, paging

Handler = Callable[[web.Request], Awaitable[Any]]
_MAX_BODY = 1024 * 1024


class AdminApi:
    def __init__(
        self,
        service: KeyService | None,
        auth: Authenticator,
        reports: Reports,
        on_limit_change: Callable[[str], None] | None = None,
    ) -> None:
        self._service = service
        self._auth = auth
        self._reports = reports
        self._on_limit_change = on_limit_change

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/key/generate", self._wrap(self.generate))
        app.router.add_get("/key/info", self._wrap(self.info, master_only=False))
        app.router.add_post("/key/update", self._wrap(self.update))
        app.router.add_post("/key/delete", self._wrap(self.delete))
        app.router.add_get("/key/list", self._wrap(self.list))
        app.router.add_post("/key/regenerate", self._wrap(self.regenerate))
        app.router.add_get("/spend/logs", self._wrap(self.spend_logs))
        app.router.add_get("/spend/report", self._wrap(self.spend_report))
        app.router.add_post("/limit/new", self._wrap(self.limit_new))
        app.router.add_post("/limit/update", self._wrap(self.limit_update))
        app.router.add_post("/limit/delete", self._wrap(self.limit_delete))
        app.router.add_get("/limit/info", self._wrap(self.limit_info))
        app.router.add_get("/limit/list", self._wrap(self.limit_list))

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
            record = await self.service.find(ref)
        else:
            assert identity.key_id is not None
            # One refusal whether or not another key exists: no probing for keys.
            try:
                record = await self.service.find(ref or identity.key_id)
            except errors.AwsError:
                record = None
            if record is None or record.key_id != identity.key_id:
                raise errors.access_denied("A virtual key may only read its own info")
        info = record.public()
        info.update(await self._reports.key_totals(record))
        return {"key": record.key_id, "info": info}

    async def update(self, request: web.Request) -> Any:
        body = await _json_body(request)
        return await self.service.update(_ref(body), body)

    async def regenerate(self, request: web.Request) -> Any:
        return await self.service.regenerate(_ref(await _json_body(request)))

    async def delete(self, request: web.Request) -> Any:
        body = await _json_body(request)
        refs: list[Any] = []
        for name in ("keys", "key_aliases"):
            value = body.get(name)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(r, str) and r for r in value):
                raise errors.validation(f"{name} must be a list of keys, key ids or aliases")
            refs += value
        if not refs:
            raise errors.validation("keys must be a non-empty list of keys or key ids")
        return {"deleted_keys": await self.service.delete(refs)}

    async def list(self, request: web.Request) -> Any:
        query = request.query
        page, size = paging(query)
        filters = {k: query[k] for k in ("user_id", "team_id", "key_alias") if k in query}
        full = query.get("return_full_object", "false").lower() == "true"
        return await self.service.list(filters, page, size, full)

    async def spend_logs(self, request: web.Request) -> Any:
        return await self._reports.logs(dict(request.query))

    async def spend_report(self, request: web.Request) -> Any:
        query = request.query
        return await self._reports.report(
            query.get("group_by", "key"), query.get("start"), query.get("end")
        )

    async def limit_new(self, request: web.Request) -> Any:
        result = await self._reports.upsert_limit(await _json_body(request), create=True)
        self._limit_changed(result["limit_id"])
        return result

    async def limit_update(self, request: web.Request) -> Any:
        result = await self._reports.upsert_limit(await _json_body(request), create=False)
        self._limit_changed(result["limit_id"])
        return result

    async def limit_delete(self, request: web.Request) -> Any:
        limit_id = (await _json_body(request)).get("limit_id")
        if not isinstance(limit_id, str):
            raise errors.validation("limit_id is required")
        result = await self._reports.delete_limit(limit_id)
        self._limit_changed(limit_id)
        return result

    async def limit_info(self, request: web.Request) -> Any:
        return await self._reports.limit_info(request.query.get("limit_id", ""))

    async def limit_list(self, request: web.Request) -> Any:
        return await self._reports.list_limits()

    def _limit_changed(self, limit_id: str) -> None:
        if self._on_limit_change is not None:
            self._on_limit_change(limit_id)


async def _json_body(request: web.Request) -> dict[str, Any]:
    # aiohttp's own limit (client_max_size, 1 MiB by default) would answer in text/plain.
    if (request.content_length or 0) > _MAX_BODY:
        raise errors.payload_too_large(_MAX_BODY)
    try:
        raw = await request.read() if request.body_exists else b"{}"
    except web.HTTPRequestEntityTooLarge:
        raise errors.payload_too_large(_MAX_BODY) from None
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
