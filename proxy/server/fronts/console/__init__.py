"""The operator's console at ``/ui``: keys, spend, limits and live traffic, rendered on the
server (Jinja2) with SVG charts drawn by ``charts``; one small script of ours for copy
buttons and the live page's refresh. Nothing is fetched from elsewhere, and every page
sends a strict Content-Security-Policy.

It reuses the admin API's own services (``KeyService``, ``Reports``), so what it shows and
changes is what the API and the CLI show and change. Its routes are ordinary ``/ui``
routes: the Bedrock path does not pass through any of it.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

import jinja2
from aiohttp import web

from ....access.auth import Authenticator
from ....access.keyservice import KeyService
from ....exchange import Identity
from ....metering.limits import usd
from ....metering.reports import Reports
from ....observe.metrics import Metrics
from ....store import Store, StoreUnavailable
from ....store.records import ALLOW_LIST_FIELDS
from ....wire import errors
from ....wire.clock import SYSTEM_CLOCK, Clock
from ....wire.params import MAX_PAGE
from ...listen.forwarded import TrustedProxies
from . import charts
from .sessions import COOKIE, ConsoleSession, SessionStore, SignInThrottle, csrf_ok

PREFIX = "/ui"
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # (no-referrer would make a form's Origin "null")
    "Cache-Control": "no-store",
}
_STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
# The key fields the edit form carries, as the admin API names them.
_TEXT_FIELDS = ("key_alias", "user_id", "team_id", "budget_duration", "upstream")
_LIST_FIELDS = ("models", "operation_groups", *ALLOW_LIST_FIELDS)
_NUMBER_FIELDS = {
    "max_budget": float,
    "rpm_limit": int,
    "tpm_limit": int,
    "max_parallel_requests": int,
}
_GROUPS = ("model", "team", "key")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A POST's form, read (and its CSRF token checked) before the page's handler runs.
FORM: web.RequestKey[dict[str, str]] = web.RequestKey("console_form", dict)


class Console:
    def __init__(
        self,
        keys: KeyService | None,
        auth: Authenticator,
        reports: Reports,
        store: Store,
        metrics: Metrics,
        live: Callable[[], dict[str, Any]],
        idle_timeout: float = 1800.0,
        simulated: bool = False,
        clock: Clock = SYSTEM_CLOCK,
        current: Callable[[str, str], Awaitable[dict[str, int]]] | None = None,
        alerts: dict[str, str] | None = None,
        master_key: str | None = None,
        body_timeout: float = 120.0,
        trusted_proxies: TrustedProxies | None = None,
    ) -> None:
        self._proxies = trusted_proxies or TrustedProxies()
        self._current = current
        self._alerts = alerts or {}
        self._keys = keys
        self._auth = auth
        self._reports = reports
        self._store = store
        self._metrics = metrics
        self._live = live
        self.sessions = SessionStore(store, idle_timeout, clock, master_key)
        self._body_timeout = body_timeout
        self.throttle = SignInThrottle()
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("proxy.server.fronts.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._env.globals["simulated"] = simulated
        # Money with the digits a small amount needs to read as non-zero ($0.00055).
        self._env.filters["usd"] = usd
        self._static = {
            name: resources.files(__package__).joinpath("static", name).read_bytes()
            for name in _STATIC
        }

    def add_routes(self, app: web.Application) -> None:
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "", self._root),
            ("GET", "/", self._root),
            ("GET", "/static/{name}", self._static_file),
            ("GET", "/signin", self._signin_page),
            ("POST", "/signin", self._signin),
            ("POST", "/signout", self._page(self._signout, master=False)),
            ("GET", "/me", self._page(self._me, master=False)),
            ("GET", "/keys", self._page(self._key_list)),
            ("GET", "/keys.csv", self._page(self._key_csv)),
            ("GET", "/keys/new", self._page(self._key_new)),
            ("POST", "/keys/new", self._page(self._key_create)),
            ("GET", "/keys/{key_id}", self._page(self._key_edit)),
            ("POST", "/keys/{key_id}", self._page(self._key_update)),
            ("POST", "/keys/{key_id}/{action}", self._page(self._key_action)),
            ("GET", "/spend", self._page(self._spend)),
            ("GET", "/spend.csv", self._page(self._spend_csv)),
            ("GET", "/limits", self._page(self._limits)),
            ("GET", "/live", self._page(self._live_page)),
            ("GET", "/live.json", self._page(self._live_json)),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, PREFIX + path, self._outage_page(handler))

    def _outage_page(self, handler: Handler) -> Handler:
        """Every console page: a store outage is a page saying so (503, Retry-After), not
        an aiohttp 500, wherever in the page the store was needed (the session first)."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except FormRefused as exc:
                page = "signin.html" if request.path.endswith("/signin") else "error.html"
                return self._form_refused(exc, page)
            except StoreUnavailable:
                response = self._render(
                    "error.html",
                    503,
                    message="The key store is unavailable; try again in a moment.",
                )
                response.headers["Retry-After"] = "1"
                return response

        return guarded

    # ------------------------------------------------------------------ plumbing

    def _render(
        self, name: str, status: int = 200, session: ConsoleSession | None = None, **values: Any
    ) -> web.Response:
        template = self._env.get_template(name)
        body = template.render(session=session, prefix=PREFIX, **values)
        return web.Response(
            status=status,
            text=body,
            content_type="text/html",
            charset="utf-8",
            headers=_SECURITY_HEADERS,
        )

    def _page(
        self, handler: Callable[..., Awaitable[web.StreamResponse]], master: bool = True
    ) -> Handler:
        """A signed-in page: a session (else the sign-in page), the master's unless
        ``master`` is False, and a valid CSRF token on every POST."""

        async def page(request: web.Request) -> web.StreamResponse:
            session = await self.sessions.get(request.cookies.get(COOKIE))
            if session is None:
                if request.method == "GET" and not request.path.endswith((".json", ".csv")):
                    raise web.HTTPSeeOther(PREFIX + "/signin", headers=_SECURITY_HEADERS)
                return self._render("error.html", 401, message="Sign in first.")
            if master and session.kind != "master":
                return self._render(
                    "error.html", 403, session, message="This page is for the master key."
                )
            if request.method == "POST":
                if not self._same_origin(request):
                    return self._render(
                        "error.html", 403, session, message="Cross-site form refused."
                    )
                form = await _read_form(request, _FORM_BYTES, self._body_timeout)
                token = form.get("csrf")
                if not isinstance(token, str) or not csrf_ok(session, token):
                    return self._render(
                        "error.html", 403, session, message="The form expired; reload the page."
                    )
                request[FORM] = form
            try:
                return await handler(request, session)
            except errors.AwsError as exc:
                return self._render("error.html", exc.status, session, message=str(exc))

        return page

    def _same_origin(self, request: web.Request) -> bool:
        """A browser's POST names its page's origin; another site's is refused (the CSRF
        token is the main defence, this one also covers the sign-in form). Behind a
        trusted TLS-terminating proxy the page's scheme is the one it forwards."""
        origin = request.headers.get("Origin")
        return origin is None or origin == f"{self._proxies.scheme(request)}://{request.host}"

    def _base_url(self, request: web.Request) -> str:
        """The proxy's Bedrock endpoint as the browser reaches it (for the snippets)."""
        return f"{self._proxies.scheme(request)}://{request.host}/bedrock"

    def _form_refused(self, exc: FormRefused, page: str = "error.html") -> web.Response:
        if page == "signin.html":
            return self._render(page, exc.status, error=exc.message)
        return self._render(page, exc.status, message=exc.message)

    async def _static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._static:
            raise web.HTTPNotFound()
        return web.Response(
            body=self._static[name],
            content_type=_STATIC[name],
            headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    @property
    def keys(self) -> KeyService:
        if self._keys is None:
            raise errors.access_denied("The console needs a master key to be configured")
        return self._keys

    # ------------------------------------------------------------------ sign-in

    async def _root(self, request: web.Request) -> web.StreamResponse:
        session = await self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            raise web.HTTPSeeOther(PREFIX + "/signin")
        raise web.HTTPSeeOther(PREFIX + ("/keys" if session.kind == "master" else "/me"))

    async def _signin_page(self, request: web.Request) -> web.Response:
        return self._render("signin.html", error=None)

    async def _signin(self, request: web.Request) -> web.StreamResponse:
        if not self._same_origin(request):  # no signing a victim in to someone else's
            return self._render("signin.html", 403, error="Sign in from the console itself.")
        address = self._proxies.client(request)
        attempt = self.throttle.attempt(address)  # counted before the key is looked at
        if attempt is None:
            return self._render(
                "signin.html", 429, error="Too many failed sign-ins; wait a minute and try again."
            )
        form = await _read_form(request, _SIGNIN_FORM_BYTES, self._body_timeout)
        key = form.get("key")
        identity: Identity | None = None
        if isinstance(key, str) and key:
            try:
                identity = await self._auth.identify_key(key.strip())
            except StoreUnavailable:
                raise  # not a wrong key: the outage page
            except errors.AwsError:
                identity = None
        if identity is None or identity.kind not in ("master", "virtual"):
            return self._render("signin.html", 401, error="That key is not valid.")
        self.throttle.succeeded(address, attempt)
        token_hash = identity.record.token_hash if identity.record is not None else None
        sid, _ = await self.sessions.create(identity.kind, identity.key_id, token_hash)
        response = web.HTTPSeeOther(PREFIX + ("/keys" if identity.is_master else "/me"))
        response.set_cookie(
            COOKIE,
            sid,
            path=PREFIX,
            httponly=True,
            samesite="Strict",
            secure=self._proxies.scheme(request) == "https",
        )
        raise response

    async def _signout(self, request: web.Request, session: ConsoleSession) -> web.StreamResponse:
        await self.sessions.end(request.cookies.get(COOKIE))
        # no-store alone leaves the signed-in pages in Chromium's back/forward cache:
        # Clear-Site-Data evicts them (and console.js reloads a page restored from it).
        response = web.HTTPSeeOther(PREFIX + "/signin", headers={"Clear-Site-Data": '"cache"'})
        response.del_cookie(COOKIE, path=PREFIX)
        raise response

    # ------------------------------------------------------------------ a key's own view

    async def _me(self, request: web.Request, session: ConsoleSession) -> web.StreamResponse:
        if session.kind == "master":
            raise web.HTTPSeeOther(PREFIX + "/keys")
        assert session.key_id is not None
        record = await self._store.keys.by("key_id", session.key_id)
        if record is None or record.refusal(time.time()) is not None:
            await self.sessions.end(request.cookies.get(COOKIE))
            raise web.HTTPSeeOther(PREFIX + "/signin")
        totals = await self._reports.key_totals(record)
        rows = await self._reports.daily("model", _days_ago(30), None, key_id=record.key_id)
        chart, names = _chart(rows, "cost")
        logs = await self._reports.logs({"key_id": record.key_id, "size": "20"})
        return self._render(
            "me.html",
            session=session,
            key=record.public(),
            totals=totals,
            chart=chart,
            legend=charts.legend(names),
            logs=logs["logs"],
            base=self._base_url(request),
        )

    # ------------------------------------------------------------------ keys

    async def _all_logs(self, query: dict[str, str]) -> list[dict[str, Any]]:
        """Every ledger row a query matches, page by page (an export is not a page)."""
        rows: list[dict[str, Any]] = []
        for page in range(1, _EXPORT_ROWS // MAX_PAGE + 1):
            found = await self._reports.logs({**query, "page": str(page), "size": str(MAX_PAGE)})
            rows += found["logs"]
            if page >= found["total_pages"]:
                return rows
        raise errors.validation(
            f"More than {_EXPORT_ROWS} requests match: narrow the dates, or use /spend/logs"
        )

    async def _filtered_keys(self, request: web.Request) -> list[dict[str, Any]]:
        q = request.query
        filters = {k: q[k] for k in ("team_id", "user_id") if q.get(k)}
        keys: list[dict[str, Any]] = []
        page = 1
        while True:  # every key, page by page: the filters below run on all of them
            found = await self.keys.list(filters, page, MAX_PAGE, full=True)
            keys += found["keys"]
            if page >= found["total_pages"]:
                break
            page += 1
        text = q.get("q", "").strip().lower()
        if text:
            fields = ("key_alias", "key_id", "user_id", "team_id")
            keys = [k for k in keys if any(text in str(k.get(f) or "").lower() for f in fields)]
        if q.get("blocked") in ("yes", "no"):
            keys = [k for k in keys if k["blocked"] == (q["blocked"] == "yes")]
        if q.get("expiring"):
            horizon = (datetime.now(UTC) + timedelta(days=7)).isoformat()
            keys = [
                k for k in keys if k["expires"] and k["expires"].replace("Z", "+00:00") <= horizon
            ]
        return keys

    async def _key_list(self, request: web.Request, session: ConsoleSession) -> web.Response:
        keys = await self._filtered_keys(request)
        pages = max(1, (len(keys) + _KEYS_PER_PAGE - 1) // _KEYS_PER_PAGE)
        text = request.query.get("page", "1")
        page = min(int(text), pages) if text.isdigit() and text != "0" else 1
        query = {k: v for k, v in request.query.items() if k != "page"}
        return self._render(
            "keys.html",
            session=session,
            keys=keys[(page - 1) * _KEYS_PER_PAGE : page * _KEYS_PER_PAGE],
            total=len(keys),
            page=page,
            pages=pages,
            query=query,
        )

    async def _key_csv(self, request: web.Request, session: ConsoleSession) -> web.Response:
        columns = ("key_id", "key_alias", "user_id", "team_id", "max_budget", "rpm_limit",
                   "tpm_limit", "expires", "blocked")  # fmt: skip
        keys = await self._filtered_keys(request)
        return _csv("keys", columns, [[k.get(c) for c in columns] for k in keys])

    async def _key_new(self, request: web.Request, session: ConsoleSession) -> web.Response:
        return self._render("key_edit.html", session=session, key=None, error=None)

    async def _key_create(self, request: web.Request, session: ConsoleSession) -> web.Response:
        try:
            body = _key_form(request[FORM], creating=True)
            created = await self.keys.generate(body)
        except errors.AwsError as exc:
            return self._render(
                "key_edit.html",
                400,
                session,
                key=None,
                error=str(exc),
                values=request[FORM].copy(),
            )
        return self._render(
            "key_created.html",
            session=session,
            key=created,
            base=self._base_url(request),
        )

    async def _key_edit(self, request: web.Request, session: ConsoleSession) -> web.Response:
        record = await self.keys.find(request.match_info["key_id"])
        totals = await self._reports.key_totals(record)
        return self._render(
            "key_edit.html", session=session, key=record.public(), totals=totals, error=None
        )

    async def _key_update(
        self, request: web.Request, session: ConsoleSession
    ) -> web.StreamResponse:
        key_id = request.match_info["key_id"]
        record = await self.keys.find(key_id)
        try:
            await self.keys.update(record.key_id, _key_form(request[FORM], creating=False))
        except errors.AwsError as exc:
            return self._render(
                "key_edit.html", 400, session, key=record.public(), totals={}, error=str(exc)
            )
        raise web.HTTPSeeOther(f"{PREFIX}/keys/{record.key_id}")

    async def _key_action(
        self, request: web.Request, session: ConsoleSession
    ) -> web.StreamResponse:
        action = request.match_info["action"]
        record = await self.keys.find(request.match_info["key_id"])
        form = request[FORM]
        if action in ("block", "unblock"):
            await self.keys.update(record.key_id, {"blocked": action == "block"})
            raise web.HTTPSeeOther(f"{PREFIX}/keys/{record.key_id}")
        if form.get("confirm") != record.key_id:
            return self._render(
                "error.html",
                400,
                session,
                message=f"To {action} a key, type its id ({record.key_id}) to confirm.",
            )
        if action == "delete":
            await self.keys.delete([record.key_id])
            await self.sessions.end_key(record.key_id)
            raise web.HTTPSeeOther(PREFIX + "/keys")
        if action == "regenerate":
            fresh = await self.keys.regenerate(record.key_id)
            await self.sessions.end_key(record.key_id)
            return self._render(
                "key_created.html",
                session=session,
                key=fresh,
                base=self._base_url(request),
            )
        raise web.HTTPNotFound()

    # ------------------------------------------------------------------ spend

    async def _spend_view(self, request: web.Request) -> dict[str, Any]:
        q = request.query
        by = q.get("by", "model")
        if by not in _GROUPS:
            raise errors.validation(f"by must be one of {', '.join(_GROUPS)}")
        metric = q.get("metric", "cost")
        if metric not in ("cost", "total_tokens"):
            raise errors.validation("metric must be cost or total_tokens")
        start = q.get("start") or _days_ago(30)
        end = q.get("end") or None
        where = {k: q[k] for k in ("team_id", "key_id") if q.get(k)}
        daily = await self._reports.daily(by, start, end, **where)
        chart, names = _chart(daily, metric)
        top: dict[str, dict[str, Any]] = {}
        for row in daily:
            name = row["group"] or "-"
            total = top.setdefault(
                name, {"group": name, "requests": 0, "total_tokens": 0, "cost": 0.0}
            )
            if row.get("key_alias"):  # shown beside the key's id
                total["alias"] = row["key_alias"]
            total["requests"] += row["requests"] or 0
            total["total_tokens"] += row["total_tokens"] or 0
            total["cost"] += row["cost"] or 0.0
        table = sorted(top.values(), key=lambda r: (-r["cost"], r["group"]))
        return {
            "by": by,
            "metric": metric,
            "start": start,
            "end": end or "",
            "where": where,
            "chart": chart,
            "legend": charts.legend(names),
            "table": table,
            "total": sum(r["cost"] for r in table),
        }

    async def _spend(self, request: web.Request, session: ConsoleSession) -> web.Response:
        view = await self._spend_view(request)
        logs = None
        if "key_id" in view["where"]:
            logs = (
                await self._reports.logs(
                    {"key_id": view["where"]["key_id"], "start": view["start"], "size": "100"}
                )
            )["logs"]
        return self._render("spend.html", session=session, logs=logs, **view)

    async def _spend_csv(self, request: web.Request, session: ConsoleSession) -> web.Response:
        view = await self._spend_view(request)
        if request.query.get("table") == "requests" and "key_id" in view["where"]:
            columns = ("time", "request_id", "operation", "model", "status", "input_tokens",
                       "output_tokens", "total_tokens", "cost", "account", "region")  # fmt: skip
            rows = [
                [r.get(c) for c in columns]
                for r in await self._all_logs(
                    {"key_id": view["where"]["key_id"], "start": view["start"]}
                )
            ]
            return _csv(f"requests-{view['where']['key_id']}", columns, rows)
        return _csv(
            f"spend-by-{view['by']}",
            (view["by"], "requests", "total_tokens", "cost_usd"),
            [
                [r["group"], r["requests"], r["total_tokens"], f"{r['cost']:.10f}"]
                for r in view["table"]
            ],
        )

    # ------------------------------------------------------------------ limits and live

    async def _limits(self, request: web.Request, session: ConsoleSession) -> web.Response:
        listing = await self.keys.list({}, 1, 500, full=True)
        budgets = []
        for key in listing["keys"]:
            if key.get("max_budget") is None:
                continue
            record = await self.keys.find(key["key_id"])
            totals = await self._reports.key_totals(record)
            spent = totals.get("budget_period_spend", 0.0) or 0.0
            budgets.append(
                {
                    "key": key,
                    "spent": spent,
                    "limit": key["max_budget"],
                    "share": min(1.0, spent / key["max_budget"]) if key["max_budget"] else 1.0,
                    "resets": totals.get("budget_resets_at"),
                }
            )
        named = await self._store.limits.list()
        for limit in named:
            if limit.get("max_budget"):
                totals = await self._reports.limit_totals(limit)
                spent = totals.get("budget_period_spend", 0.0) or 0.0
                budgets.append(
                    {
                        "key": {"key_id": None, "key_alias": "limit " + limit["limit_id"]},
                        "spent": spent,
                        "limit": limit["max_budget"],
                        "share": min(1.0, spent / limit["max_budget"]),
                        "resets": totals.get("budget_resets_at"),
                    }
                )
        rates = []
        for key in listing["keys"]:
            if key.get("rpm_limit") or key.get("tpm_limit") or key.get("max_parallel_requests"):
                now = await self._current("key", key["key_id"]) if self._current else {}
                rates.append({"key": key, "now": now})
        return self._render(
            "limits.html",
            session=session,
            budgets=budgets,
            named=named,
            rates=rates,
            alerts=self._alerts,
        )

    async def _live_page(self, request: web.Request, session: ConsoleSession) -> web.Response:
        return self._render("live.html", session=session, live=self._live())

    async def _live_json(self, request: web.Request, session: ConsoleSession) -> web.Response:
        recent = await self._reports.logs({"size": "20"})
        data = {**self._live(), "recent": recent["logs"]}
        return web.json_response(data, headers=_SECURITY_HEADERS)


# ---------------------------------------------------------------------- helpers


def _key_form(form: Any, creating: bool) -> dict[str, Any]:
    """The edit form → the admin API's body (the same validation as the API's)."""
    body: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        value = str(form.get(name, "")).strip()
        if value or not creating:
            body[name] = value or None
    for name in _LIST_FIELDS:
        text = str(form.get(name, "")).strip()
        items = [v.strip() for v in text.replace("\n", ",").split(",") if v.strip()]
        if name == "operation_groups":
            if items:
                body[name] = items
        elif items or not creating:
            body[name] = items or None
    for name, kind in _NUMBER_FIELDS.items():
        text = str(form.get(name, "")).strip()
        if text:
            try:
                body[name] = kind(text)
            except ValueError:
                raise errors.validation(f"{name}: {text!r} is not a number") from None
        elif not creating:
            body[name] = None
    metadata = str(form.get("metadata", "")).strip()
    if metadata:
        try:
            body["metadata"] = json.loads(metadata)
        except ValueError:
            raise errors.validation("metadata: not a JSON object") from None
    elif not creating:
        body["metadata"] = {}
    expires = str(form.get("duration", "")).strip()
    if expires:
        body["duration"] = expires
    if body.get("models") is None:
        body.pop("models", None)
        if not creating:
            body["models"] = []
    return body


# A console form is a few fields: anything larger is refused, and a body must arrive
# within body_timeout, whoever sends it (the sign-in form is read before any key is known).
_SIGNIN_FORM_BYTES = 4096
_FORM_BYTES = 64 * 1024


class FormRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _read_form(request: web.Request, limit: int, timeout: float) -> dict[str, str]:
    """A URL-encoded form, read within ``limit`` bytes and ``timeout`` seconds (aiohttp's
    ``post()`` reads up to 1 MiB with no deadline: 40 anonymous HTTP/2 streams trickling
    a megabyte each held ~55 MiB for as long as they liked)."""
    if (request.content_length or 0) > limit:
        raise FormRefused(413, "The form is too large.")
    if request.body_exists and request.content_type != "application/x-www-form-urlencoded":
        raise FormRefused(415, "Send the form as the page does.")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                body += chunk
                if len(body) > limit:
                    raise FormRefused(413, "The form is too large.")
    except TimeoutError:
        raise FormRefused(408, "The form took too long to arrive.") from None
    fields = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    return dict(fields)


def _csv(name: str, columns: tuple[str, ...], rows: list[list[Any]]) -> web.Response:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    writer.writerows([_cell(v) for v in row] for row in rows)
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        headers={**_SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


# Keys shown per page of the list (its CSV has them all), and the most rows a request
# export gathers before it asks for a narrower range.
_KEYS_PER_PAGE = 200
_EXPORT_ROWS = 100_000

# What a spreadsheet reads as a formula at the start of a cell (OWASP's list).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A value as an export cell. Text a key holder chose (an alias, a user, a model id the
    ledger kept although AWS refused it) must not run as a formula in the operator's
    spreadsheet: text that starts like one is prefixed with a quote, shown as text."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _chart(rows: list[dict[str, Any]], metric: str) -> tuple[str, list[str]]:
    days = sorted({r["day"] for r in rows})
    series: dict[str, dict[str, float]] = {}
    for row in rows:
        name = row["group"] or "-"
        value = float(row[metric] or 0)
        series.setdefault(name, {})[row["day"]] = series.get(name, {}).get(row["day"], 0.0) + value
    names = sorted(series, key=lambda n: -sum(series[n].values()))[:9]
    ordered = {n: series[n] for n in names}  # bars coloured in the legend's order
    if len(series) > len(names):  # the rest, as one series
        other: dict[str, float] = {}
        for name in series:
            if name not in ordered:
                for day, value in series[name].items():
                    other[day] = other.get(day, 0.0) + value
        ordered["other"] = other
        names.append("other")
    return charts.stacked_bars(days, ordered, "$" if metric == "cost" else "tokens"), names


def _days_ago(days: int) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%d")
