"""What every console page shares: the services it reads, its templates, and the headers
every page is sent with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web

from ....access import roles
from ....access.admin_tokens import AdminTokens
from ....access.auth import Authenticator
from ....access.directory import Directory
from ....access.keyservice import KeyService
from ....access.roles import actor_of
from ....exchange import Identity
from ....metering.limits import usd
from ....metering.reports import Reports
from ....observe.metrics import Metrics
from ....store import Store
from ....store.audit import Actor
from ....wire import errors
from ....wire.clock import SYSTEM_CLOCK, Clock
from ...gate import Gate
from ...listen.forwarded import TrustedProxies
from ...sso import SingleSignOn
from .doors import CliDoor, PageDoor, SignInDoor, SsoDoor
from .security import PREFIX, SECURITY_HEADERS
from .sessions import ConsoleSession, SessionStore, SignInThrottle

_STATIC = {"console.css": "text/css", "console.js": "text/javascript"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConsoleBase:
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
        *,
        gate: Gate,
        master_signin: bool = True,
        tokens: AdminTokens | None = None,
        sso: SingleSignOn | None = None,
        on_signin: Callable[[Identity, Actor], Awaitable[None]] | None = None,
        user_cap: Callable[[str, str | None], Awaitable[dict[str, Any] | None]] | None = None,
        directory: Directory | None = None,
    ) -> None:
        # Teams and users (the admin API's own service).
        self._directory = directory
        # A signed-in user's spend cap and what they spent in its period (``/ui/me``).
        self._user_cap = user_cap
        # The admin API tokens the console mints and revokes; single sign-on, when set
        # up (``sso.SingleSignOn``).
        self._tokens, self._sso, self._gate, self._clock = tokens, sso, gate, clock
        self._proxies = trusted_proxies or TrustedProxies()
        self._current, self._alerts = current, alerts or {}
        self._keys, self._auth, self._reports = keys, auth, reports
        self._store, self._metrics, self._live = store, metrics, live
        self.sessions = SessionStore(store, idle_timeout, clock, master_key, master_signin)
        self.body_timeout = body_timeout
        self.throttle = SignInThrottle()
        self._page_doors = {
            need: PageDoor(self.sessions, self._proxies, need, body_timeout)
            for need in (None, *roles.NEEDS)
        }
        self._signin_door = SignInDoor(
            auth, self.throttle, self._proxies, body_timeout, store.audit, master_signin
        )
        self._sso_door = (
            SsoDoor(sso, self._proxies, store.audit, self.throttle, on_signin)
            if sso is not None
            else None
        )
        self._cli_door = (
            CliDoor(sso, tokens, body_timeout) if sso is not None and tokens is not None else None
        )
        self._env = _templates(simulated, sso is not None, master_signin)
        self._static = {
            name: resources.files(__package__).joinpath("static", name).read_bytes()
            for name in _STATIC
        }

    def _actor(self, request: web.Request, session: ConsoleSession) -> Actor:
        """Who the audit log names for a change made on this page."""
        return actor_of(session.identity(), self._proxies.client(request), None)

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
            headers=SECURITY_HEADERS,
        )

    def _base_url(self, request: web.Request) -> str:
        """The proxy's Bedrock endpoint as the browser reaches it (for the snippets)."""
        return f"{self._proxies.scheme(request)}://{request.host}/bedrock"

    @property
    def _token_service(self) -> AdminTokens:
        if self._tokens is None:
            raise errors.access_denied("Admin API tokens need a master key to be configured")
        return self._tokens

    @property
    def keys(self) -> KeyService:
        if self._keys is None:
            raise errors.access_denied("The console needs a master key to be configured")
        return self._keys


def _may(session: ConsoleSession | None, need: str) -> bool:
    """Whether a session's role grants ``need`` (the navigation shows only what opens)."""
    return session is not None and roles.reach_of(session.identity()).may(need)


def _when(ts: float) -> str:
    """A time as the audit and token pages show it: UTC, to the second."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _templates(simulated: bool, sso: bool, master_signin: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("proxy.server.fronts.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.globals.update(simulated=simulated, sso=sso, master_signin=master_signin, may=_may)
    # Money with the digits a small amount needs to read as non-zero ($0.00055).
    env.filters["usd"] = usd
    env.filters["when"] = _when
    return env
