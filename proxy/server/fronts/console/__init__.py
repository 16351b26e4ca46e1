"""The operator's console at ``/ui``: keys, spend, limits and live traffic, rendered on the
server (Jinja2) with SVG charts drawn by ``charts``; one small script of ours for copy
buttons and the live page's refresh. Nothing is fetched from elsewhere, and every page
sends a strict Content-Security-Policy.

It reuses the admin API's own services (``KeyService``, ``Reports``), so what it shows and
changes is what the API and the CLI show and change. Its routes are ordinary ``/ui``
routes: the Bedrock path does not pass through any of it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from ....exchange import Exchange
from ....store import StoreUnavailable
from ....wire import errors
from . import charts
from .base import _STATIC, Handler
from .doors import (
    FORM,
    SESSION,
    SIGNIN_FORM_BYTES,
    FormRefused,
)
from .keys import KeyPages
from .security import PREFIX
from .sessions import COOKIE, ConsoleSession
from .spend import SpendPages, _chart, _days_ago

__all__ = ["FORM", "PREFIX", "Console"]


class Console(KeyPages, SpendPages):
    def add_routes(self, app: web.Application) -> None:
        """Every route: the public ones (the way in, and what it is drawn with), and the
        signed-in pages, each behind the gate."""
        page, own = self._page, functools.partial(self._page, master=False)
        public: list[tuple[str, str, Handler]] = [
            ("GET", "", self._root),
            ("GET", "/", self._root),
            ("GET", "/static/{name}", self._static_file),
            ("GET", "/signin", self._signin_page),
        ]
        gated: list[tuple[str, str, Handler]] = [
            ("POST", "/signin", self._signin),
            ("POST", "/signout", own(self._signout)),
            ("GET", "/me", own(self._me)),
            ("GET", "/keys", page(self._key_list)),
            ("GET", "/keys.csv", page(self._key_csv)),
            ("GET", "/keys/new", page(self._key_new)),
            ("POST", "/keys/new", page(self._key_create)),
            ("GET", "/keys/{key_id}", page(self._key_edit)),
            ("POST", "/keys/{key_id}", page(self._key_update)),
            ("POST", "/keys/{key_id}/{action}", page(self._key_action)),
            ("GET", "/spend", page(self._spend)),
            ("GET", "/spend.csv", page(self._spend_csv)),
            ("GET", "/limits", page(self._limits)),
            ("GET", "/live", page(self._live_page)),
            ("GET", "/live.json", page(self._live_json)),
        ]
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
        self, handler: Callable[..., Awaitable[web.StreamResponse]], master: bool = True
    ) -> Handler:
        """A signed-in page, admitted by the gate (``doors.PageDoor``): refusals and the
        page's own errors as the error page, a missing session as the sign-in page."""
        door = self._page_doors[master]

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
        raise web.HTTPSeeOther(PREFIX + ("/keys" if session.kind == "master" else "/me"))

    async def _signin_page(self, request: web.Request) -> web.Response:
        return self._render("signin.html", error=None)

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

    async def _me(self, request: web.Request, session: ConsoleSession) -> web.StreamResponse:
        if session.kind == "master":
            raise web.HTTPSeeOther(PREFIX + "/keys")
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
