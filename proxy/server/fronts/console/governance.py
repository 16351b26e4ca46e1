"""The console's governance pages: the audit log (filtered, paged, exported as CSV or JSON
lines) and admin API tokens (made, shown once, revoked)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ....metering.reports import parse_time
from ....store.audit import FILTERS
from ....wire import errors
from ..exports import audit_file, audit_rows
from .base import ConsoleBase
from .doors import FORM
from .security import PREFIX, SECURITY_HEADERS
from .sessions import ConsoleSession

_ROWS_PER_PAGE = 100


class GovernancePages(ConsoleBase):
    async def _audit_page(self, request: web.Request, session: ConsoleSession) -> web.Response:
        q = request.query
        filters = {k: q[k] for k in FILTERS if q.get(k)}
        text = q.get("page", "1")
        page = int(text) if text.isdigit() and text != "0" else 1
        rows, total = await self._store.audit.page(
            filters,
            parse_time("start", q.get("start") or None),
            parse_time("end", q.get("end") or None),
            _ROWS_PER_PAGE,
            page,
        )
        query = {k: v for k, v in q.items() if k != "page" and v}
        return self._render(
            "audit.html",
            session=session,
            rows=rows,
            total=total,
            page=page,
            pages=max(1, (total + _ROWS_PER_PAGE - 1) // _ROWS_PER_PAGE),
            query=query,
        )

    async def _audit_export(self, request: web.Request, session: ConsoleSession) -> web.Response:
        kind = "jsonl" if request.path.endswith(".jsonl") else "csv"
        body, media = audit_file(await audit_rows(self._store, request.query), kind)
        headers = {
            **SECURITY_HEADERS,
            "Content-Disposition": f'attachment; filename="audit.{kind}"',
        }
        return web.Response(body=body, content_type=media, headers=headers)

    async def _token_list(self, request: web.Request, session: ConsoleSession) -> web.Response:
        return await self._tokens_page(session)

    async def _tokens_page(
        self, session: ConsoleSession, status: int = 200, **values: Any
    ) -> web.Response:
        listing = await self._token_service.list()
        values.setdefault("error", None)
        values.setdefault("created", None)
        return self._render("tokens.html", status, session, tokens=listing["tokens"], **values)

    async def _token_create(self, request: web.Request, session: ConsoleSession) -> web.Response:
        form = request[FORM]
        body: dict[str, Any] = {
            name: form[name].strip()
            for name in ("name", "role", "team_id", "duration")
            if form.get(name, "").strip()
        }
        try:
            created = await self._token_service.mint(body, self._actor(request, session))
        except errors.AwsError as exc:
            return await self._tokens_page(session, 400, error=exc.message)
        return await self._tokens_page(session, created=created)

    async def _token_revoke(
        self, request: web.Request, session: ConsoleSession
    ) -> web.StreamResponse:
        token_id = request.match_info["token_id"]
        await self._token_service.revoke(token_id, self._actor(request, session))
        raise web.HTTPSeeOther(PREFIX + "/tokens")
