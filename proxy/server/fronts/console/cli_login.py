"""``bedrock-proxy login`` through the console: the CLI waits on a loopback port, the
browser signs in (single sign-on) and confirms, and the proxy sends the browser back to
the CLI with a sealed code only that CLI can open (its verifier, as in PKCE), for a token
of the user's machine: a member's reach, whatever the user's role, for 30 days.

- ``GET /ui/cli/login?port=&state=&challenge=``: the confirmation page (signed in first).
- ``POST /ui/cli/login``: the token made (audited), the browser sent to the CLI's port.
- ``POST /cli/token {code, verifier}``: the CLI's side, through the gate (``CliDoor``).

Where the provider hands out refresh tokens, the page first sends the browser through a
sign-in of its own asking for one (``offline_access``): the refresh token comes back in a
short-lived sealed cookie for this path, and is kept (sealed) with the machine's token, so
that the user's groups are asked about again while it lives (``server.login_recheck``).
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from ....exchange import Exchange, Identity
from ....wire import errors
from ...sso import PENDING_SECONDS
from .base import ConsoleBase
from .doors import CLI_TOKEN, CODE_BYTES, FORM
from .security import PREFIX
from .sessions import ConsoleSession

log = logging.getLogger("bedrock_proxy")

CLI_LOGIN = PREFIX + "/cli/login"
# The refresh token of the sign-in made for a login, sealed, on its way to the page.
OFFLINE_COOKIE = "bp_offline"


class CliLogin(ConsoleBase):
    async def _cli_login_page(self, request: web.Request, session: ConsoleSession) -> web.Response:
        port, state, challenge = _cli_params(request.query)
        if session.kind != "user" or self._sso is None:
            raise errors.access_denied("Log the CLI in with single sign-on, not a key")
        if self._sso.offline and self._offline(request, session) is None:
            if request.query.get("offline") != "asked":
                # Signed in without a refresh token for this login: sign in again, for one.
                then = urlencode({"next": request.path_qs + "&offline=asked"})
                raise web.HTTPSeeOther(f"{PREFIX}/signin/sso?{then}")
            # Asked, and none came back (a browser refusing the cookie): no loop through
            # the provider; this login follows the groups at the next sign-in only.
            log.warning("bedrock-proxy login for %s without a refresh token", session.email)
        page = self._render(
            "cli_login.html", session=session, port=port, state=state, challenge=challenge
        )
        # The form's answer sends the browser to the CLI's loopback port: the one place
        # besides the console a console form may lead (form-action binds redirects too).
        policy = page.headers["Content-Security-Policy"]
        page.headers["Content-Security-Policy"] = policy.replace(
            "form-action 'self'", f"form-action 'self' http://127.0.0.1:{port}"
        )
        return page

    async def _cli_login(self, request: web.Request, session: ConsoleSession) -> web.StreamResponse:
        port, state, challenge = _cli_params(request[FORM])
        if session.kind != "user" or self._sso is None:
            raise errors.access_denied("Log the CLI in with single sign-on, not a key")
        offline = self._offline(request, session)
        refresh = offline.get("refresh") if offline is not None else None
        days = 30
        sealed = None
        if isinstance(refresh, str):
            refresh_row = {"sub": session.key_id, "refresh": refresh}
            sealed = self._sso.seal(refresh_row, days * 86400, at_rest=True)
        token = await self._token_service.mint_for_user(
            session.identity(), self._actor(request, session), days, sealed
        )
        code = self._sso.cli_code(token, challenge)
        back = f"http://127.0.0.1:{port}/callback?" + urlencode({"code": code, "state": state})
        response = web.HTTPSeeOther(back)
        response.del_cookie(OFFLINE_COOKIE, path=CLI_LOGIN)  # one machine's, used once
        raise response

    def _offline(self, request: web.Request, session: ConsoleSession) -> dict[str, Any] | None:
        """The sign-in made for this login, if it was this user's: its refresh token, or
        None where the provider gave none."""
        assert self._sso is not None
        offline = self._sso.unseal(request.cookies.get(OFFLINE_COOKIE))
        return offline if offline is not None and offline.get("sub") == session.key_id else None

    def _offline_cookie(
        self,
        request: web.Request,
        response: web.StreamResponse,
        user: Identity,
        refresh: str | None,
    ) -> None:
        """A sign-in for ``bedrock-proxy login`` done: its refresh token, sealed, for the
        login page (top-level navigations from the provider's redirect: SameSite=Lax)."""
        assert self._sso is not None
        response.set_cookie(
            OFFLINE_COOKIE,
            self._sso.seal({"sub": user.key_id, "refresh": refresh}, PENDING_SECONDS),
            path=CLI_LOGIN,
            httponly=True,
            samesite="Lax",
            max_age=PENDING_SECONDS,
            secure=self._proxies.scheme(request) == "https",
        )

    async def _cli_token(self, request: web.Request) -> web.Response:
        assert self._cli_door is not None  # the route exists only with single sign-on
        x = Exchange(errors.new_request_id(), request.method, time.perf_counter())
        try:
            await self._gate.admit(request, x, self._cli_door, body_limit=CODE_BYTES)
        except errors.AwsError as exc:
            return web.json_response(
                {"error": {"message": exc.message, "code": exc.code}}, status=exc.status
            )
        return web.json_response({"token": request[CLI_TOKEN]})


def _cli_params(source: Any) -> tuple[int, str, str]:
    port, state, challenge = source.get("port", ""), source.get("state"), source.get("challenge")
    if not str(port).isdigit() or not 1024 <= int(port) <= 65535:
        raise errors.validation("port: the CLI's loopback port")
    for name, value in (("state", state), ("challenge", challenge)):
        if not isinstance(value, str) or not 16 <= len(value) <= 128:
            raise errors.validation(f"{name}: as the CLI sent it")
    return int(port), state, challenge
