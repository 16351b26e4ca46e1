"""The admin API's routes for admin API tokens (/token/new, /token/list, /token/revoke)
and the audit log (/audit/logs, filtered and paged; /audit/export, every matching row
as JSON lines or CSV)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...access import roles
from ...access.admin_tokens import AdminTokens
from ...metering.reports import parse_time
from ...store import Store
from ...store.audit import FILTERS
from ...wire import errors
from ...wire.params import paging
from .admin_door import CALL, AdminRoutes, json_body
from .exports import audit_file, audit_rows

_LOG_PARAMS = ("page", "size", "start", "end", *FILTERS)
_EXPORT_PARAMS = ("format", "start", "end", *FILTERS)


class AuditApi:
    def __init__(self, store: Store, tokens: AdminTokens, routes: AdminRoutes) -> None:
        self._store, self._tokens, self._routes = store, tokens, routes

    def add_routes(self, app: web.Application) -> None:
        json = self._routes.json
        app.router.add_post("/token/new", json(self.token_new, roles.TOKENS))
        app.router.add_get("/token/list", json(self.token_list, roles.TOKENS))
        app.router.add_post("/token/revoke", json(self.token_revoke, roles.TOKENS))
        app.router.add_get("/audit/logs", json(self.logs, roles.AUDIT, _LOG_PARAMS))
        export = self._routes.gated(self.export, roles.AUDIT, _EXPORT_PARAMS)
        app.router.add_get("/audit/export", export)

    async def token_new(self, request: web.Request) -> Any:
        return await self._tokens.mint(json_body(request), request[CALL].actor)

    async def token_list(self, request: web.Request) -> Any:
        return await self._tokens.list()

    async def token_revoke(self, request: web.Request) -> Any:
        token_id = json_body(request).get("token_id")
        if not isinstance(token_id, str) or not token_id:
            raise errors.validation("token_id is required")
        return await self._tokens.revoke(token_id, request[CALL].actor)

    async def logs(self, request: web.Request) -> Any:
        query = dict(request.query)
        page, size = paging(query)
        rows, total = await self._store.audit.page(
            {k: query[k] for k in FILTERS if k in query},
            parse_time("start", query.get("start")),
            parse_time("end", query.get("end")),
            size,
            page,
        )
        return {
            "logs": rows,
            "total": total,
            "page": page,
            "page_size": size,
            "total_pages": (total + size - 1) // size,
        }

    async def export(self, request: web.Request) -> web.StreamResponse:
        kind = request.query.get("format", "jsonl")
        if kind not in ("jsonl", "csv"):
            raise errors.validation("format must be jsonl or csv")
        body, media = audit_file(await audit_rows(self._store, request.query), kind)
        return web.Response(
            body=body,
            content_type=media,
            headers={"Content-Disposition": f'attachment; filename="audit.{kind}"'},
        )
