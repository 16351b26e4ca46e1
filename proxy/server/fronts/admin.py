"""The admin API, LiteLLM-compatible so people can move over: /key/generate, /key/info,
/key/update, /key/delete, /key/list, /key/regenerate; spend reports (/spend/logs,
/spend/report) and named limits (/limit/*); teams and users are ``directory_api``'s.

For the master key and admin API tokens, each route by what it needs (``access.roles``):
a team-admin reaches its teams' keys and spend, an auditor reads. A virtual key may read
its own /key/info, totals included. Every change is audited (``store.audit``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

from aiohttp import web

from ...access import roles
from ...access.keyservice import KeyService
from ...metering.named import NamedLimitAdmin
from ...metering.reports import Reports
from ...store import StoreUnavailable
from ...store.records import KeyRecord
from ...store.spend import LOG_FILTERS
from ...wire import errors
from ...wire.params import paging
from .admin_door import CALL, AdminRoutes, json_body


class AdminApi:
    def __init__(
        self,
        service: KeyService | None,
        routes: AdminRoutes,
        reports: Reports,
        limits: NamedLimitAdmin,
        on_limit_change: Callable[[str], None] | None = None,
    ) -> None:
        self._service = service
        self._routes = routes
        self._reports = reports
        self._limits = limits
        self._on_limit_change = on_limit_change

    def add_routes(self, app: web.Application) -> None:
        json = self._routes.json
        get, post = app.router.add_get, app.router.add_post
        post("/key/generate", json(self.generate, roles.KEYS))
        get("/key/info", json(self.info, roles.READ, ("key",), own_key=True))
        post("/key/update", json(self.update, roles.KEYS))
        post("/key/delete", json(self.delete, roles.KEYS))
        get("/key/list", json(self.list, roles.READ, _LIST_PARAMS))
        post("/key/regenerate", json(self.regenerate, roles.KEYS))
        get("/spend/logs", json(self.spend_logs, roles.READ, _LOG_PARAMS))
        get("/spend/report", json(self.spend_report, roles.READ_ALL, _REPORT_PARAMS))
        post("/limit/new", json(self.limit_new, roles.LIMITS))
        post("/limit/update", json(self.limit_update, roles.LIMITS))
        post("/limit/delete", json(self.limit_delete, roles.LIMITS))
        get("/limit/info", json(self.limit_info, roles.READ_ALL, ("limit_id",)))
        get("/limit/list", json(self.limit_list, roles.READ_ALL))

    @property
    def service(self) -> KeyService:
        assert self._service is not None
        return self._service

    async def generate(self, request: web.Request) -> Any:
        call = request[CALL]
        body = call.reach.check_key_body(json_body(request), creating=True)
        return await self.service.generate(body, call.actor, call.reach.user)

    async def info(self, request: web.Request) -> Any:
        ref = request.query.get("key")
        call = request[CALL]
        identity = call.identity
        if identity.kind != "virtual":
            if not ref:
                raise errors.validation("key is required")
            record = await self._find(call.reach, ref)
        else:
            assert identity.key_id is not None
            # One refusal whether or not another key exists: no probing for keys.
            found = await self._find_quietly(ref or identity.key_id)
            if found is None or found.key_id != identity.key_id:
                raise errors.access_denied("A virtual key may only read its own info")
            record = found
        info = record.public()
        info.update(await self._reports.key_totals(record))
        return {"key": record.key_id, "info": info}

    async def _find_quietly(self, ref: str) -> KeyRecord | None:
        try:
            return await self.service.find(ref)
        except StoreUnavailable:
            raise
        except errors.AwsError:
            return None

    async def _find(self, reach: roles.Reach, ref: str) -> KeyRecord:
        """A key by any reference; for a scoped caller, one refusal whether it is out of
        reach or unknown."""
        if not reach.scoped:
            return await self.service.find(ref)
        return reach.check_key(await self._find_quietly(ref))

    async def update(self, request: web.Request) -> Any:
        call = request[CALL]
        body = json_body(request)
        record = await self._find(call.reach, _ref(body))
        body = call.reach.check_key_body(body, creating=False)
        return await self.service.update(record.key_id, body, call.actor)

    async def regenerate(self, request: web.Request) -> Any:
        call = request[CALL]
        record = await self._find(call.reach, _ref(json_body(request)))
        return await self.service.regenerate(record.key_id, call.actor)

    async def delete(self, request: web.Request) -> Any:
        call = request[CALL]
        body = json_body(request)
        named: dict[str, list[str]] = {}
        for name in ("keys", "key_aliases"):
            value = body.get(name)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(r, str) and r for r in value):
                raise errors.validation(f"{name} must be a list of keys, key ids or aliases")
            named[name] = value
        if not named:
            raise errors.validation("keys must be a non-empty list of keys or key ids")
        refs, aliases = named.get("keys", []), named.get("key_aliases", [])
        if call.reach.scoped:  # every key named must be within reach, or none is deleted
            reach = call.reach
            refs = [reach.check_delete(await self._find(reach, ref)).key_id for ref in refs]
            for alias in aliases:
                reach.check_delete(reach.check_key(await self._find_quietly(alias)))
        deleted = await self.service.delete(refs, aliases, call.actor)
        return {"deleted_keys": deleted}

    async def list(self, request: web.Request) -> Any:
        query = request.query
        page, size = paging(query)
        filters = {k: query[k] for k in ("user_id", "team_id", "key_alias") if k in query}
        filters = request[CALL].reach.narrow(filters)
        full = query.get("return_full_object", "false").lower() == "true"
        return await self.service.list(filters, page, size, full)

    async def spend_logs(self, request: web.Request) -> Any:
        query = _litellm_dates(dict(request.query))
        reach = request[CALL].reach
        api_key = query.pop("api_key", None)
        if api_key is not None:
            # LiteLLM's filter: a key's token or id (or here any reference to it).
            found = await self._find_quietly(api_key)
            if found is not None and reach.scoped:
                reach.check_key(found)
            # (No such key: an empty page, as LiteLLM answers.)
            query["key_id"] = found.key_id if found is not None else "(no such key)"
        query.update(reach.narrow({k: v for k, v in query.items() if k in ("team_id", "user_id")}))
        return await self._reports.logs(query)

    async def spend_report(self, request: web.Request) -> Any:
        query = _litellm_dates(dict(request.query))
        return await self._reports.report(
            query.get("group_by", "key"), query.get("start"), query.get("end")
        )

    async def limit_new(self, request: web.Request) -> Any:
        result = await self._limits.upsert_limit(json_body(request), True, request[CALL].actor)
        self._limit_changed(result["limit_id"])
        return result

    async def limit_update(self, request: web.Request) -> Any:
        result = await self._limits.upsert_limit(json_body(request), False, request[CALL].actor)
        self._limit_changed(result["limit_id"])
        return result

    async def limit_delete(self, request: web.Request) -> Any:
        limit_id = (json_body(request)).get("limit_id")
        if not isinstance(limit_id, str):
            raise errors.validation("limit_id is required")
        result = await self._limits.delete_limit(limit_id, request[CALL].actor)
        self._limit_changed(limit_id)
        return result

    async def limit_info(self, request: web.Request) -> Any:
        return await self._limits.limit_info(request.query.get("limit_id", ""))

    async def limit_list(self, request: web.Request) -> Any:
        return await self._limits.list_limits()

    def _limit_changed(self, limit_id: str) -> None:
        if self._on_limit_change is not None:
            self._on_limit_change(limit_id)


_LIST_PARAMS = ("page", "size", "user_id", "team_id", "key_alias", "return_full_object")
_DATES = ("start", "end", "start_date", "end_date")
_LOG_PARAMS = ("page", "size", *_DATES, "api_key", *LOG_FILTERS)
_REPORT_PARAMS = ("group_by", *_DATES)


def _litellm_dates(query: dict[str, str]) -> dict[str, str]:
    """LiteLLM's ``start_date``/``end_date`` (days, the end day included) as our
    ``start``/``end`` (times, the end excluded)."""
    start, end = query.pop("start_date", None), query.pop("end_date", None)
    for ours, theirs in (("start", start), ("end", end)):
        if theirs is not None and ours in query:
            raise errors.validation(f"Give {ours} or {ours}_date, not both")
    if start is not None:
        query["start"] = start
    if end is not None:
        try:
            day = date.fromisoformat(end)
        except ValueError:
            query["end"] = end  # a time: taken as it is
        else:
            query["end"] = (day + timedelta(days=1)).isoformat()
    return query


def _ref(body: dict[str, Any]) -> str:
    ref = body.get("key")
    if not isinstance(ref, str) or not ref:
        raise errors.validation("key is required")
    return ref
