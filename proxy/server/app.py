"""Builds the aiohttp application: routes, startup and shutdown of what requests share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from ..access import roles
from ..access.directory import Directory
from ..access.keyservice import KeyService
from ..access.offboarding import Offboarding
from ..access.oidc import OidcConfigError
from ..metering.batches import BatchSettler
from ..metering.limits import RedisLimiter
from ..metering.named import NamedLimitAdmin
from ..metering.reports import Reports
from ..metering.service import Metering
from ..observe.accesslog import AccessLog
from ..observe.metrics import Metrics
from ..observe.shared import SharedMetrics
from ..store import Store, StoreUnavailable
from ..wire import errors
from ..wire.background import stop as stop_task
from ..wire.clock import SYSTEM_CLOCK, Clock
from .config import ConfigError, Settings
from .credentials import CredentialProvider
from .fronts.admin import AdminApi
from .fronts.admin_door import AdminRoutes
from .fronts.audit_api import AuditApi
from .fronts.bedrock import BASE_PATH
from .fronts.console import Console, alert_target
from .fronts.console.live import LiveView
from .fronts.directory_api import DirectoryApi
from .fronts.files import FILES_PATH
from .fronts.models_api import ModelsApi
from .gate import Gate
from .listen.dispatch import PrefixDispatcher, application
from .listen.forwarded import TrustedProxies
from .listen.responses import aws_response
from .listen.runner import ProxyRunner
from .login_recheck import LoginRecheck
from .pipeline import Pipeline
from .services import Services, build_services
from .simulator import Simulator
from .sso import SingleSignOn
from .upstream import UpstreamClient


class StartupError(Exception):
    """Something the proxy needs at startup is not there; the message says what."""


log = logging.getLogger("bedrock_proxy.app")

PIPELINE = web.AppKey("pipeline", Pipeline)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
STORE = web.AppKey("store", Store)
KEYS = web.AppKey("keys", KeyService)
METERING = web.AppKey("metering", Metering)
METRICS = web.AppKey("metrics", Metrics)
CREDENTIALS = web.AppKey("credentials", CredentialProvider)
STATE = web.AppKey("state", dict)
SHARED_METRICS = web.AppKey("shared_metrics", SharedMetrics)
BATCHES = web.AppKey("batches", BatchSettler)
SIMULATED = web.AppKey("simulated", bool)
GATE = web.AppKey("gate", Gate)
SSO = web.AppKey("sso", SingleSignOn)
RETENTION = web.AppKey("audit_retention", float)
RECHECK = web.AppKey("login_recheck", LoginRecheck)


def create_app(
    settings: Settings, access_log: AccessLog | None = None, clock: Clock = SYSTEM_CLOCK
) -> web.Application:
    """The proxy's application; ``clock`` is what limits, metering and the ledger read
    (tests move it instead of sleeping through windows and budget periods)."""
    if settings.master_key is None and not settings.allow_unauthenticated:
        raise ConfigError(
            "config error: master_key: BEDROCK_PROXY_MASTER_KEY is not set "
            "(pass --allow-unauthenticated to run without client authentication)"
        )
    s = build_services(settings, access_log, clock)
    app, dispatcher = application(handler_args={"max_field_size": 65536})
    app[PIPELINE] = s.pipeline
    app[UPSTREAM] = s.upstream
    app[ACCESS_LOG] = s.access_log
    app[METRICS] = s.metrics
    if settings.metrics_dir:
        app[SHARED_METRICS] = SharedMetrics(s.metrics, settings.metrics_dir)
    app[CREDENTIALS] = s.credentials
    app[STORE] = s.store
    app[METERING] = s.metering
    app[BATCHES] = s.batches
    app[GATE] = s.gate
    if s.sso is not None:
        app[SSO] = s.sso
    app[RETENTION] = settings.audit_retention_days
    app[STATE] = {
        "ready": False,
        "needs_credentials": not (settings.upstream_bearer_token or settings.simulate),
    }
    if settings.simulate:
        app[SIMULATED] = True
    if s.keys is not None:
        app[KEYS] = s.keys
    app.cleanup_ctx.append(_lifecycle)
    _add_routes(app, dispatcher, s)
    return app


def _add_routes(app: web.Application, dispatcher: PrefixDispatcher, s: Services) -> None:
    """The admin API, the console, health and metrics, then the fronts by their prefixes."""
    settings = s.settings
    reports = Reports(s.store, s.clock)
    proxies = TrustedProxies(settings.trusted_proxies)
    admin, directory = _add_admin_api(app, s, reports, proxies)
    ModelsApi(s.authenticator, s.metering.prices, s.gate).add_routes(app)
    if settings.console:
        pipeline = s.pipeline
        Console(
            s.keys,
            s.authenticator,
            reports,
            s.store,
            s.metrics,
            LiveView(s.metrics, lambda: pipeline.in_flight, s.fleet),
            settings.console_idle_timeout,
            simulated=settings.simulate,
            clock=s.clock,
            current=s.limiter.current,
            alerts=alert_target(settings.alert_webhook_url, settings.alert_webhook_format),
            master_key=settings.master_key,
            body_timeout=settings.body_timeout,
            trusted_proxies=proxies,
            gate=s.gate,
            master_signin=settings.console_master_signin,
            tokens=s.tokens,
            sso=s.sso,
            on_signin=directory.sign_in,
            user_cap=s.metering.user_cap,
            directory=directory if s.keys is not None else None,
        ).add_routes(app)
    app.router.add_get("/health/liveness", _liveness)
    if settings.console:  # a browser on the proxy's address finds the console
        app.router.add_get("/", _to_console)
    app.router.add_get(
        "/metrics",
        _metrics_page if settings.metrics_public else admin.gated(_metrics_page, roles.READ_ALL),
    )
    app.router.add_get("/health/readiness", _readiness)
    for path in (FILES_PATH, FILES_PATH + "/{tail:.*}"):  # before /bedrock/{tail}
        app.router.add_route("*", path, s.gate.guard(s.pipeline.handler(s.files), s.files))
    for path, front in s.fronts:
        dispatcher.add_prefix_route(
            path,
            s.gate.guard(s.pipeline.handler(front), front),
            expect_handler=front.expect_handler,
            excluded=(FILES_PATH,) if path == BASE_PATH else (),
        )
    dispatcher.fallback = app.router.add_route("*", "/{tail:.*}", _unknown_route)


def _add_admin_api(
    app: web.Application, s: Services, reports: Reports, proxies: TrustedProxies
) -> tuple[AdminRoutes, Directory]:
    """Keys, spend, limits, tokens, the audit log, teams and users: the admin API."""
    settings = s.settings
    admin = AdminRoutes(
        s.authenticator, s.tokens, s.gate, proxies, settings.body_timeout, s.keys is not None
    )
    limits = NamedLimitAdmin(s.store)
    AdminApi(s.keys, admin, reports, limits, s.metering.forget_limit).add_routes(app)
    AuditApi(s.store, s.tokens, admin).add_routes(app)

    gone = Offboarding(s.keys, s.tokens, s.store)
    directory = Directory(
        s.store,
        s.keys.check_upstream if s.keys is not None else None,
        lambda: s.metering.forget_limit("directory"),
        s.fleet.set_team_upstream,
        gone.user_gone,
        gone.left_team,
    )
    recheck = None
    if s.sso is not None:  # developer machines' logins, asked about again
        recheck = LoginRecheck(s.sso, s.store, s.tokens, directory.sign_in, gone.user_gone, s.clock)
        app[RECHECK] = recheck
    DirectoryApi(directory, s.keys, admin, recheck).add_routes(app)
    return admin, directory


def create_ops_app(main: web.Application) -> web.Application:
    """Health checks alone, for a plain-HTTP listener beside an HTTPS one."""
    app = web.Application()
    app[STATE] = main[STATE]
    app[CREDENTIALS] = main[CREDENTIALS]
    app[STORE] = main[STORE]
    app[METERING] = main[METERING]
    app[METRICS] = main[METRICS]
    if SHARED_METRICS in main:
        app[SHARED_METRICS] = main[SHARED_METRICS]
    if main.get(SIMULATED):
        app[SIMULATED] = True
    app.router.add_get("/health/liveness", _liveness)
    app.router.add_get("/metrics", _metrics_page)
    app.router.add_get("/health/readiness", _readiness)
    app.router.add_route("*", "/{tail:.*}", _unknown_route)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Start the services, serve, stop them in the reverse order. A start that fails
    (an unreadable identity provider) stops what it had started rather than leave it
    running; a close that fails does not keep the others from closing."""
    store = app[STORE]
    try:
        await store.open()
    except StoreUnavailable as exc:
        raise StartupError(f"cannot open the key store: {exc.cause}") from None
    except Exception as exc:
        raise StartupError(f"cannot open the key store: {type(exc).__name__}: {exc}") from None
    async with contextlib.AsyncExitStack() as started:
        started.push_async_callback(store.close)
        started.push_async_callback(app[CREDENTIALS].close)
        if KEYS in app:
            resealed = await app[KEYS].reseal_secrets()
            if resealed:
                log.info("resealed %d SigV4 secrets under the current secret_key", resealed)
        metering = app[METERING]
        metering.ledger.start()
        started.push_async_callback(metering.close)  # flushes the ledger
        started.callback(app[ACCESS_LOG].flush)
        upstream = app[UPSTREAM]
        started.push_async_callback(upstream.close)
        await upstream.start()
        if app.get(SIMULATED):
            started.push_async_callback((await _start_simulator(upstream)).cleanup)
        if app[STATE]["needs_credentials"]:
            await app[CREDENTIALS].start()
        app[BATCHES].start()
        started.push_async_callback(app[BATCHES].close)
        if SHARED_METRICS in app:
            app[SHARED_METRICS].start()
            started.push_async_callback(app[SHARED_METRICS].close)
        if SSO in app:
            started.push_async_callback(app[SSO].close)
            try:
                await app[SSO].start()
            except OidcConfigError as exc:
                raise StartupError(str(exc)) from None
        if app[RETENTION]:
            pruner = asyncio.create_task(store.audit.retain(app[RETENTION]))
            started.push_async_callback(stop_task, pruner)
        if RECHECK in app:
            started.push_async_callback(stop_task, asyncio.create_task(app[RECHECK].run()))
        app[STATE]["ready"] = True
        yield
        app[STATE]["ready"] = False


async def _start_simulator(upstream: UpstreamClient) -> web.AppRunner:
    """The simulator on a loopback port of its own, and every upstream call sent there."""
    # HTTP/2 on the same port, as bedrock-runtime: the proxy sends event streams over h2c
    # first, and aiohttp alone answered that with an ERROR traceback (Pause on PRI).
    runner = ProxyRunner(Simulator().app(), header_timeout=30.0, keepalive_timeout=75.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    upstream.fleet.simulate(url)
    log.warning(
        "SIMULATED upstream: Bedrock calls are answered by the built-in simulator (%s), "
        "not by AWS; every response carries x-bedrock-proxy-simulated: true",
        url,
    )
    return runner


async def _liveness(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


# Readiness asks each shared dependency at most this long: a probe must answer within
# Kubernetes' default timeout (1 s) even while a dependency is partitioned away.
_PROBE_SECONDS = 0.5


async def _readiness(request: web.Request) -> web.Response:
    """Can this replica serve? A shared dependency's outage is reported, not made a
    reason to be taken out: it would take out every replica at once, although keys
    already read, the master key and (with ``limits_on_redis_outage: local``) limited
    keys are still served."""
    state = request.app[STATE]
    if not state["ready"]:
        return web.json_response({"status": "not ready"}, status=503)
    if state["needs_credentials"]:
        try:
            await request.app[CREDENTIALS].get(patient=False)  # a probe waits 1 s at most
        except Exception:
            return web.json_response(
                {"status": "not ready", "reason": "no AWS credentials"}, status=503
            )
    checks = {"store": request.app[STORE].ping()}
    limiter = request.app[METERING].limiter
    if isinstance(limiter, RedisLimiter):
        checks["redis"] = limiter.ping()
    found = await asyncio.gather(
        *(asyncio.wait_for(check, _PROBE_SECONDS) for check in checks.values()),
        return_exceptions=True,
    )
    dependencies = {
        name: "down" if isinstance(result, BaseException) else "up"
        for name, result in zip(checks, found, strict=True)
    }
    body: dict[str, object] = {"status": "ready", "dependencies": dependencies}
    degraded = [name for name, up in dependencies.items() if up == "down"]
    if degraded:
        body["degraded"] = degraded
    if request.app.get(SIMULATED):
        body["simulated"] = True
    return web.json_response(body)


async def _to_console(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/ui/")


async def _metrics_page(request: web.Request) -> web.Response:
    return web.Response(
        body=_exposition(request.app),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


def _exposition(app: web.Application) -> bytes:
    shared = app.get(SHARED_METRICS)
    return shared.render() if shared is not None else app[METRICS].render()


async def _unknown_route(request: web.Request) -> web.Response:
    return aws_response(errors.unknown_operation(request.method, request.path))
