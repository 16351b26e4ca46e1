"""What every console page shares: the services it reads, its templates, and the headers
every page is sent with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web

from ....access.auth import Authenticator
from ....access.keyservice import KeyService
from ....metering.limits import usd
from ....metering.reports import Reports
from ....observe.metrics import Metrics
from ....store import Store
from ....wire import errors
from ....wire.clock import SYSTEM_CLOCK, Clock
from ...gate import Gate
from ...listen.forwarded import TrustedProxies
from .doors import PageDoor, SignInDoor
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
    ) -> None:
        self._gate = gate
        self._clock = clock
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
        self.body_timeout = body_timeout
        self.throttle = SignInThrottle()
        self._page_doors = {
            master: PageDoor(self.sessions, self._proxies, master, body_timeout)
            for master in (True, False)
        }
        self._signin_door = SignInDoor(auth, self.throttle, self._proxies, body_timeout)
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
    def keys(self) -> KeyService:
        if self._keys is None:
            raise errors.access_denied("The console needs a master key to be configured")
        return self._keys
