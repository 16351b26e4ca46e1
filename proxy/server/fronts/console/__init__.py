"""The operator's console at ``/ui``: keys, spend, limits and live traffic, rendered on the
server (Jinja2) with SVG charts drawn by ``charts``; one small script of ours for copy
buttons and the live page's refresh. Nothing is fetched from elsewhere, and every page
sends a strict Content-Security-Policy.

It reuses the admin API's own services (``KeyService``, ``Reports``), so what it shows and
changes is what the API and the CLI show and change. Its routes are ordinary ``/ui``
routes: the Bedrock path does not pass through any of it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from ....access import roles
from ....exchange import Exchange
from ....store import StoreUnavailable
from ....wire import errors
from ...sso import PENDING_COOKIE, PENDING_SECONDS
from . import charts
from .base import _STATIC, Handler, _may
from .cli_login import CLI_LOGIN, CliLogin
from .doors import (
    FORM,
    REFRESH,
    SESSION,
    SIGNIN_FORM_BYTES,
    FormRefused,
    callback_url,
    console_page,
)
from .governance import GovernancePages
from .keys import KeyPages
from .security import PREFIX, SECURITY_HEADERS
from .sessions import COOKIE, ConsoleSession
from .spend import SpendPages, _chart, _days_ago
from .teams import TeamPages

__all__ = ["FORM", "PREFIX", "Console", "alert_target"]


class Console(KeyPages, SpendPages, GovernancePages, TeamPages, CliLogin):
    def add_routes(self, app: web.Application) -> None:
        """Every route: the public ones (the way in, and what it is drawn with), and the
        signed-in pages, each behind the gate with what its role must grant."""
        page = self._page
        public: list[tuple[str, str, Handler]] = [
            ("GET", "", self._root),
            ("GET", "/", self._root),
            ("GET", "/static/{name}", self._static_file),
            ("GET", "/signin", self._signin_page),
        ]
        gated: list[tuple[str, str, Handler]] = [
            ("POST", "/signin", self._signin),
            ("POST", "/signout", page(self._signout, None)),
            ("GET", "/me", page(self._me, None)),
            ("GET", "/keys", page(self._key_list, roles.READ)),
            ("GET", "/keys.csv", page(self._key_csv, roles.READ)),
            ("GET", "/keys/new", page(self._key_new, roles.KEYS)),
            ("POST", "/keys/new", page(self._key_create, roles.KEYS)),
            ("GET", "/keys/{key_id}", page(self._key_edit, roles.READ)),
            ("POST", "/keys/{key_id}", page(self._key_update, roles.KEYS)),
            ("POST", "/keys/{key_id}/{action}", page(self._key_action, roles.KEYS)),
            ("GET", "/spend", page(self._spend, roles.READ)),
            ("GET", "/spend.csv", page(self._spend_csv, roles.READ)),
            ("GET", "/limits", page(self._limits, roles.READ_ALL)),
            ("GET", "/live", page(self._live_page, roles.READ_ALL)),
            ("GET", "/live.json", page(self._live_json, roles.READ_ALL)),
            ("GET", "/teams", page(self._teams_page, roles.READ)),
            ("POST", "/teams", page(self._team_create, roles.TEAMS)),
            ("GET", "/teams/{team_id}", page(self._team_page, roles.READ)),
            ("POST", "/teams/{team_id}", page(self._team_update, roles.TEAMS)),
            ("POST", "/teams/{team_id}/delete", page(self._team_delete, roles.TEAMS)),
            ("POST", "/teams/{team_id}/members/add", page(self._team_members, roles.MEMBERS)),
            ("POST", "/teams/{team_id}/members/remove", page(self._team_members, roles.MEMBERS)),
            ("POST", "/users", page(self._user_create, roles.TEAMS)),
            ("GET", "/users/{user_id}", page(self._user_page, roles.READ_ALL)),
            ("POST", "/users/{user_id}", page(self._user_update, roles.TEAMS)),
            ("POST", "/users/{user_id}/delete", page(self._user_delete, roles.TEAMS)),
            ("GET", "/audit", page(self._audit_page, roles.AUDIT)),
            ("GET", "/audit.csv", page(self._audit_export, roles.AUDIT)),
            ("GET", "/audit.jsonl", page(self._audit_export, roles.AUDIT)),
            ("GET", "/tokens", page(self._token_list, roles.TOKENS)),
            ("POST", "/tokens", page(self._token_create, roles.TOKENS)),
            ("POST", "/tokens/{token_id}/revoke", page(self._token_revoke, roles.TOKENS)),
        ]
        if self._sso is not None:
            public.append(("GET", "/signin/sso", self._sso_start))
            gated.append(("GET", "/sso/callback", self._sso_callback))
            gated.append(("GET", "/cli/login", page(self._cli_login_page, None)))
            gated.append(("POST", "/cli/login", page(self._cli_login, None)))
            cli = self._gate.guard(self._outage_page(self._cli_token), self._cli_door)
            app.router.add_post("/cli/token", cli)
        for method, path, handler in public:
            app.router.add_route(method, PREFIX + path, self._outage_page(handler))
        for method, path, handler in gated:
            outer = self._outage_page(handler)
            app.router.add_route(method, PREFIX + path, self._gate.guard(outer, self))

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

    def _page(
        self, handler: Callable[..., Awaitable[web.StreamResponse]], need: str | None
    ) -> Handler:
        """A signed-in page, admitted by the gate (``doors.PageDoor``): refusals and the
        page's own errors as the error page, a missing session as the sign-in page."""
        door = self._page_doors[need]

        async def page(request: web.Request) -> web.StreamResponse:
            x = Exchange(errors.new_request_id(), request.method, time.perf_counter())
            try:
                await self._gate.admit(request, x, door)
                return await handler(request, request[SESSION])
            except errors.AwsError as exc:
                session = request.get(SESSION)
                return self._render("error.html", exc.status, session, message=exc.message)

        return page

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

    async def _root(self, request: web.Request) -> web.StreamResponse:
        session = await self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            raise web.HTTPSeeOther(PREFIX + "/signin")
        home = "/keys" if _may(session, roles.READ) and session.kind != "virtual" else "/me"
        raise web.HTTPSeeOther(PREFIX + home)

    async def _signin_page(self, request: web.Request) -> web.Response:
        return self._render("signin.html", error=None, next=console_page(request.query.get("next")))

    async def _signin(self, request: web.Request) -> web.StreamResponse:
        x = Exchange(errors.new_request_id(), request.method, time.perf_counter())
        try:
            admitted = await self._gate.admit(
                request, x, self._signin_door, body_limit=SIGNIN_FORM_BYTES
            )
        except errors.AwsError as exc:
            return self._render("signin.html", exc.status, error=exc.message)
        identity = admitted.identity
        token_hash = identity.record.token_hash if identity.record is not None else None
        sid, _ = await self.sessions.create(identity.kind, identity.key_id, token_hash)
        raise self._signed_in(request, sid, PREFIX + ("/keys" if identity.is_master else "/me"))

    def _signed_in(self, request: web.Request, sid: str, home: str) -> web.HTTPSeeOther:
        response = web.HTTPSeeOther(home)
        response.set_cookie(
            COOKIE,
            sid,
            path=PREFIX,
            httponly=True,
            samesite="Strict",
            secure=self._proxies.scheme(request) == "https",
        )
        return response

    async def _sso_start(self, request: web.Request) -> web.StreamResponse:
        """To the identity provider, with this sign-in's state sealed in a cookie (sent
        back on the provider's redirect, a top-level GET: SameSite=Lax)."""
        assert self._sso is not None
        then = console_page(request.query.get("next"))
        # bedrock-proxy login's sign-in asks for a refresh token too (cli_login).
        offline = self._sso.offline and (then or "").startswith(CLI_LOGIN)
        url, pending = self._sso.begin(callback_url(request, self._proxies), then, offline)
        response = web.HTTPSeeOther(url, headers=SECURITY_HEADERS)
        response.set_cookie(
            PENDING_COOKIE,
            pending,
            path=PREFIX + "/sso",
            httponly=True,
            samesite="Lax",
            max_age=PENDING_SECONDS,
            secure=self._proxies.scheme(request) == "https",
        )
        raise response

    async def _sso_callback(self, request: web.Request) -> web.StreamResponse:
        assert self._sso_door is not None and self._sso is not None  # (routes only with it)
        then = console_page(self._sso.then(request.cookies.get(PENDING_COOKIE)))
        x = Exchange(errors.new_request_id(), request.method, time.perf_counter())
        try:
            admitted = await self._gate.admit(request, x, self._sso_door)
        except errors.AwsError as exc:
            page = self._render(
                "signin.html", 401 if exc.status == 403 else exc.status, error=exc.message
            )
            page.del_cookie(PENDING_COOKIE, path=PREFIX + "/sso")
            return page
        identity = admitted.identity
        sid, _ = await self.sessions.create(
            "user", identity.key_id, None, identity.role, identity.teams, identity.email
        )
        home = PREFIX + ("/keys" if roles.reach_of(identity).may(roles.READ) else "/me")
        response = self._signed_in(request, sid, then or home)
        response.del_cookie(PENDING_COOKIE, path=PREFIX + "/sso")  # used once
        if (then or "").startswith(CLI_LOGIN):
            self._offline_cookie(request, response, identity, request.get(REFRESH))
        raise response

    async def _signout(self, request: web.Request, session: ConsoleSession) -> web.StreamResponse:
        await self.sessions.end(request.cookies.get(COOKIE))
        # no-store alone leaves the signed-in pages in Chromium's back/forward cache:
        # Clear-Site-Data evicts them (and console.js reloads a page restored from it).
        response = web.HTTPSeeOther(PREFIX + "/signin", headers={"Clear-Site-Data": '"cache"'})
        response.del_cookie(COOKIE, path=PREFIX)
        raise response

    async def _me(self, request: web.Request, session: ConsoleSession) -> web.StreamResponse:
        if session.kind == "master":
            raise web.HTTPSeeOther(PREFIX + "/keys")
        if session.kind == "user":  # a user's own page: who they are, their cap and spend
            user = session.email or str(session.key_id)
            team = session.teams[0] if session.teams else None
            cap = await self._user_cap(user, team) if self._user_cap is not None else None
            return self._render("user.html", session=session, cap=cap)
        assert session.key_id is not None
        record = await self._store.keys.by("key_id", session.key_id)
        if record is None or record.refusal(self._clock.time()) is not None:
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


def alert_target(url: str | None, kind: str) -> dict[str, str]:
    """What the console shows of the alert webhook: its format and host, never its path
    (a Slack webhook's path is its secret)."""
    if not url:
        return {}
    parts = urlsplit(url)
    return {"format": kind, "target": f"{parts.scheme}://{parts.netloc}/…"}
