"""The admin API, LiteLLM-compatible so people can move over: /key/generate, /key/info,
/key/update, /key/delete, /key/list, /key/regenerate; spend reports (/spend/logs,
/spend/report), named limits (/limit/*) and teams' upstream pools (/team/*). Master key
only, except that a virtual key may read its own /key/info, totals included."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from typing import Any

import orjson
from aiohttp import web

from ...access.auth import Authenticator
from ...access.keyservice import KeyService
from ...exchange import MASTER, Exchange, Identity
from ...metering.named import NamedLimitAdmin
from ...metering.reports import Reports
from ...store import StoreUnavailable
from ...store.spend import LOG_FILTERS
from ...wire import errors
from ...wire.params import paging
from ..gate import Admitted, Gate, LocalDoor
from ..listen.bodies import RequestBody, read_body
from ..listen.responses import aws_response

log = logging.getLogger("bedrock_proxy.admin")

Handler = Callable[[web.Request], Awaitable[Any]]
# The call the gate admitted, for the route's handler.
ADMITTED: web.RequestKey[Admitted[None]] = web.RequestKey("admin_admitted", Admitted)
_MAX_BODY = 1024 * 1024


class AdminDoor(LocalDoor):
    """The admin API's callers, at the gate: the master key (checked in constant time, no
    store lookup), or any valid key where a key may read itself; a JSON body read only
    once the caller is known, within the body deadline."""

    def __init__(self, auth: Authenticator, master_only: bool, body_timeout: float) -> None:
        self._auth = auth
        self._master_only = master_only
        self._body_timeout = body_timeout

    async def credential(self, request: web.Request, x: Exchange) -> Identity | None:
        if self._master_only:
            await self._auth.master_only(request)
            return MASTER
        return await self._auth.authenticate(request)

    async def read(self, request: web.Request, x: Exchange) -> RequestBody | None:
        if not request.body_exists:
            return None
        # aiohttp's own limit (client_max_size) would answer in text/plain.
        return await read_body(request, _MAX_BODY, self._body_timeout)


class AdminApi:
    def __init__(
        self,
        service: KeyService | None,
        auth: Authenticator,
        reports: Reports,
        limits: NamedLimitAdmin,
        gate: Gate,
        on_limit_change: Callable[[str], None] | None = None,
        body_timeout: float = 120.0,
    ) -> None:
        self._service = service
        self._auth = auth
        self._gate = gate
        self._doors = {
            master_only: AdminDoor(auth, master_only, body_timeout) for master_only in (True, False)
        }
        self._reports = reports
        self._limits = limits
        self._on_limit_change = on_limit_change

    def add_routes(self, app: web.Application) -> None:
        wrap = self._wrap
        app.router.add_post("/key/generate", wrap(self.generate))
        app.router.add_get("/key/info", wrap(self.info, ("key",), master_only=False))
        app.router.add_post("/key/update", wrap(self.update))
        app.router.add_post("/key/delete", wrap(self.delete))
        app.router.add_get("/key/list", wrap(self.list, _LIST_PARAMS))
        app.router.add_post("/key/regenerate", wrap(self.regenerate))
        app.router.add_get("/spend/logs", wrap(self.spend_logs, _LOG_PARAMS))
        app.router.add_get("/spend/report", wrap(self.spend_report, _REPORT_PARAMS))
        app.router.add_post("/limit/new", wrap(self.limit_new))
        app.router.add_post("/limit/update", wrap(self.limit_update))
        app.router.add_post("/limit/delete", wrap(self.limit_delete))
        app.router.add_get("/limit/info", wrap(self.limit_info, ("limit_id",)))
        app.router.add_get("/limit/list", wrap(self.limit_list))
        app.router.add_post("/team/update", wrap(self.team_update))
        app.router.add_get("/team/info", wrap(self.team_info, ("team_id",)))
        app.router.add_get("/team/list", wrap(self.team_list))

    def _wrap(
        self, handler: Handler, params: tuple[str, ...] = (), master_only: bool = True
    ) -> Handler:
        """A JSON route: its handler's result, as JSON, once the gate has admitted it."""

        async def answer(request: web.Request) -> web.StreamResponse:
            result = await handler(request)
            return web.Response(body=orjson.dumps(result), content_type="application/json")

        return self.gated(answer, params, master_only)

    def gated(
        self,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        params: tuple[str, ...] = (),
        master_only: bool = True,
    ) -> Handler:
        """``handler`` behind the gate (the admin door): refusals and failures AWS-shaped,
        never aiohttp's text page or a trace."""
        door = self._doors[master_only]

        async def gated(request: web.Request) -> web.StreamResponse:
            x = Exchange(errors.new_request_id(), request.method, time.perf_counter())
            try:
                _check_query(request, params)
                if self._service is None:
                    raise errors.access_denied("The admin API needs a master key to be configured")
                request[ADMITTED] = await self._gate.admit(request, x, door)
                return await handler(request)
            except errors.AwsError as exc:
                return aws_response(exc)
            except Exception:
                log.exception("admin API error on %s %s", request.method, request.path)
                return aws_response(errors.internal())

        return self._gate.guard(gated, door)

    @property
    def service(self) -> KeyService:
        assert self._service is not None
        return self._service

    async def generate(self, request: web.Request) -> Any:
        return await self.service.generate(await _json_body(request))

    async def info(self, request: web.Request) -> Any:
        ref = request.query.get("key")
        identity = request[ADMITTED].identity
        if identity.is_master:
            if not ref:
                raise errors.validation("key is required")
            record = await self.service.find(ref)
        else:
            assert identity.key_id is not None
            # One refusal whether or not another key exists: no probing for keys.
            try:
                record = await self.service.find(ref or identity.key_id)
            except StoreUnavailable:
                raise
            except errors.AwsError:
                record = None
            if record is None or record.key_id != identity.key_id:
                raise errors.access_denied("A virtual key may only read its own info")
        assert record is not None  # find() raises when there is none
        info = record.public()
        info.update(await self._reports.key_totals(record))
        return {"key": record.key_id, "info": info}

    async def team_update(self, request: web.Request) -> Any:
        return await self.service.set_team(await _json_body(request))

    async def team_info(self, request: web.Request) -> Any:
        team_id = request.query.get("team_id")
        if not team_id:
            raise errors.validation("team_id is required")
        return await self.service.team_info(team_id)

    async def team_list(self, request: web.Request) -> Any:
        return await self.service.teams()

    async def update(self, request: web.Request) -> Any:
        body = await _json_body(request)
        return await self.service.update(_ref(body), body)

    async def regenerate(self, request: web.Request) -> Any:
        return await self.service.regenerate(_ref(await _json_body(request)))

    async def delete(self, request: web.Request) -> Any:
        body = await _json_body(request)
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
        deleted = await self.service.delete(named.get("keys", []), named.get("key_aliases", []))
        return {"deleted_keys": deleted}

    async def list(self, request: web.Request) -> Any:
        query = request.query
        page, size = paging(query)
        filters = {k: query[k] for k in ("user_id", "team_id", "key_alias") if k in query}
        full = query.get("return_full_object", "false").lower() == "true"
        return await self.service.list(filters, page, size, full)

    async def spend_logs(self, request: web.Request) -> Any:
        query = _litellm_dates(dict(request.query))
        api_key = query.pop("api_key", None)
        if api_key is not None:
            # LiteLLM's filter: a key's token or id (or here any reference to it).
            try:
                query["key_id"] = (await self.service.find(api_key)).key_id
            except StoreUnavailable:
                raise
            except errors.AwsError:
                query["key_id"] = "(no such key)"  # an empty page, as LiteLLM answers
        return await self._reports.logs(query)

    async def spend_report(self, request: web.Request) -> Any:
        query = _litellm_dates(dict(request.query))
        return await self._reports.report(
            query.get("group_by", "key"), query.get("start"), query.get("end")
        )

    async def limit_new(self, request: web.Request) -> Any:
        result = await self._limits.upsert_limit(await _json_body(request), create=True)
        self._limit_changed(result["limit_id"])
        return result

    async def limit_update(self, request: web.Request) -> Any:
        result = await self._limits.upsert_limit(await _json_body(request), create=False)
        self._limit_changed(result["limit_id"])
        return result

    async def limit_delete(self, request: web.Request) -> Any:
        limit_id = (await _json_body(request)).get("limit_id")
        if not isinstance(limit_id, str):
            raise errors.validation("limit_id is required")
        result = await self._limits.delete_limit(limit_id)
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


def _check_query(request: web.Request, accepted: tuple[str, ...]) -> None:
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


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The body the gate read, as a JSON object."""
    read = request[ADMITTED].body
    try:
        body = orjson.loads(read.joined() if read is not None and read.size else b"{}")
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
