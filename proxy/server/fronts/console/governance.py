"""The console's governance pages: the audit log (filtered, paged, exported as CSV or JSON
lines) and admin API tokens (made, shown once, revoked)."""

from __future__ import annotations

import csv
import io
from typing import Any

import orjson
from aiohttp import web

from ....metering.reports import parse_time
from ....store.audit import FILTERS
from ....wire import errors
from ..exports import csv_cell
from .base import ConsoleBase
from .doors import FORM
from .security import PREFIX, SECURITY_HEADERS
from .sessions import ConsoleSession

_ROWS_PER_PAGE = 100
_EXPORT_PAGE = 500
_EXPORT_ROWS = 100_000
_COLUMNS = (
    "seq", "ts", "actor", "actor_kind", "email", "source", "request_id", "action", "target",
    "before", "after", "prev_hash", "hash",
)  # fmt: skip


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
        q = request.query
        kind = "jsonl" if request.path.endswith(".jsonl") else "csv"
        filters = {k: q[k] for k in FILTERS if q.get(k)}
        since = parse_time("start", q.get("start") or None)
        until = parse_time("end", q.get("end") or None)
        rows: list[dict[str, Any]] = []
        for page in range(1, _EXPORT_ROWS // _EXPORT_PAGE + 2):
            found, total = await self._store.audit.page(filters, since, until, _EXPORT_PAGE, page)
            rows += found
            if len(rows) >= total:
                break
        else:
            raise errors.validation(f"More than {_EXPORT_ROWS} rows match: narrow the dates")
        if kind == "jsonl":
            body = b"".join(orjson.dumps(r) + b"\n" for r in rows)
            media = "application/x-ndjson"
        else:
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerow(_COLUMNS)
            writer.writerows([csv_cell(r.get(c)) for c in _COLUMNS] for r in rows)
            body, media = out.getvalue().encode(), "text/csv"
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
