"""Builds the aiohttp application: routes, startup and shutdown of what requests share."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from ..access import policy
from ..access.auth import Authenticator
from ..access.compat import OwnedState
from ..access.jobs import JobRegistry
from ..access.keycache import KeyCache
from ..access.keyservice import KeyService
from ..access.modelrefs import ModelRefs
from ..access.owned import OwnedSessions
from ..access.secretbox import SecretBox
from ..exchange import Observer
from ..metering.alerts import BudgetAlerts
from ..metering.batches import BatchSettler
from ..metering.ledger import Ledger
from ..metering.limits import InProcessLimiter, RedisLimiter
from ..metering.named import NamedLimitAdmin
from ..metering.pricing import PriceTable
from ..metering.reports import Reports
from ..metering.service import LedgerBudgets, Metering
from ..observe.accesslog import AccessLog
from ..observe.metrics import Metrics
from ..observe.shared import SharedMetrics
from ..observe.tracing import Tracing
from ..store import Store, StoreUnavailable, open_store
from ..wire import compat, errors
from ..wire.clock import SYSTEM_CLOCK, Clock
from ..wire.compat import CompatRouter
from ..wire.endpoints import Endpoints, sdk_endpoint_overrides, valid_region
from ..wire.routing import (
    AGENTCORE,
    AGENTCORE_CONTROL,
    UPSTREAM_SERVICES,
    Router,
    load_operations,
)
from .admin import AdminApi
from .bedrock import AGENTCORE_CONTROL_PATH, AGENTCORE_PATH, BASE_PATH, BedrockFront
from .compat import MANTLE_PATH, MANTLE_ROOTS, RUNTIME_PATHS, RUNTIME_ROOTS, CompatFront
from .config import ConfigError, Settings
from .console import Console
from .console.live import LiveView
from .credentials import CredentialProvider
from .dispatch import application
from .duplex import DuplexRelay
from .files import FILES_PATH, FilesFront
from .fleet import Fleet
from .fleet.config import FleetConfigError
from .forwarded import TrustedProxies
from .pipeline import Pipeline, Shutdown
from .responses import aws_response
from .runner import ProxyRunner
from .simulator import Simulator
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
    router = Router(load_operations())
    policy.load_fields()  # at startup, into the heap serve freezes (see pricing)
    overrides = {**sdk_endpoint_overrides((*UPSTREAM_SERVICES, "s3")), **settings.endpoints}
    region = settings.region or _profile_region(settings) or "us-east-1"
    if not valid_region(region):
        raise ConfigError(f"config error: region: {region!r} is not an AWS region name")
    try:
        Endpoints(overrides, region)
    except ValueError as exc:
        raise ConfigError(f"config error: endpoints: {exc}") from None
    credentials = CredentialProvider(settings.aws_profile)
    store = open_store(
        settings.database_url,
        settings.sqlite_path,
        settings.database_pool_size,
        clock,
        settings.store_timeout,
    )
    metrics = Metrics()
    try:
        fleet = Fleet(
            settings.fleet,
            overrides,
            region,
            credentials,
            store,
            clock,
            settings.redis_url,
            lambda member: metrics.upstream_event(member, "cooldowns"),
            settings.key_cache_ttl,
        )
    except (FleetConfigError, ValueError) as exc:
        raise ConfigError(f"config error: {exc}") from None
    sealing_secret = settings.secret_key or settings.master_key
    box = SecretBox(sealing_secret, settings.previous_secret_keys) if sealing_secret else None
    cache = KeyCache(store, box, settings.key_cache_ttl, clock)
    authenticator = Authenticator(
        settings.master_key,
        settings.auth_headers,
        settings.allow_unauthenticated,
        keys=cache,
        max_skew_seconds=settings.sigv4_max_skew,
        clock=clock,
    )
    keys: KeyService | None = None
    try:
        prices = PriceTable.load(
            settings.prices_file, settings.prices, settings.unpriced_model_price or None
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config error: prices_file/prices: {exc}") from None
    budgets = LedgerBudgets(store)
    limiter: InProcessLimiter | RedisLimiter = (
        RedisLimiter(
            settings.redis_url,
            budgets,
            settings.limits_lease_seconds,
            clock=clock,
            timeout=settings.redis_timeout,
            on_outage=settings.limits_on_redis_outage,
        )
        if settings.redis_url
        else InProcessLimiter(budgets, clock=clock)
    )
    alerts = (
        BudgetAlerts(
            settings.alert_webhook_url,
            limiter.claim_once,
            slack=settings.alert_webhook_format == "slack",
        )
        if settings.alert_webhook_url
        else None
    )
    metering = Metering(
        store,
        prices,
        Ledger(store, settings.ledger_flush_interval),
        limiter,
        settings.key_cache_ttl,
        settings.reserve_output_tokens,
        settings.cost_headers,
        {k: float(v) for k, v in settings.request_prices.items()},
        settings.batch_discount,
        clock,
        alerts,
        simulated=settings.simulate,
    )
    shutdown = Shutdown()
    upstream = UpstreamClient(settings, fleet, shutdown, metrics)
    if box is not None and settings.master_key:
        keys = KeyService(store, box, cache, clock, fleet.config.pools, fleet.set_team_upstream)
    access_log = access_log or AccessLog(settings.access_log)
    # Metering first: the others read the cost it works out.
    observers: list[Observer] = [metering, metrics, access_log]
    if settings.tracing:
        try:
            observers.append(Tracing())
        except ImportError:
            raise ConfigError(
                "config error: tracing: needs OpenTelemetry (pip install 'bedrock-proxy[otel]')"
            ) from None
    pipeline = Pipeline(observers, shutdown)
    jobs = JobRegistry(store)
    bedrock_model_refs = ModelRefs(upstream.control_get, settings.model_ref_ttl, clock)
    duplex_relay = DuplexRelay(
        upstream,
        metering,
        settings.idle_timeout,
        settings.first_byte_timeout,
        metrics,
        shutdown,
        lambda x: bedrock.watch(x, settings.max_session_seconds),
    )

    def bedrock_front(
        routes: Router | CompatRouter,
        owned: OwnedSessions | None = None,
        base: str = BASE_PATH,
        front: type[BedrockFront] = BedrockFront,
        **extra: Any,
    ) -> BedrockFront:
        return front(
            settings,
            routes,
            authenticator,
            upstream,
            metering,
            metrics,
            jobs,
            bedrock_model_refs,
            duplex_relay,
            clock,
            owned,
            base,
            **extra,
        )

    bedrock = bedrock_front(router)
    # AgentCore: the same front on routes and base paths of its own; the data plane's
    # sessions are owned per key.
    agentcore = bedrock_front(
        Router(load_operations((AGENTCORE,))), OwnedSessions(store), AGENTCORE_PATH
    )
    agentcore_control = bedrock_front(
        Router(load_operations((AGENTCORE_CONTROL,))), None, AGENTCORE_CONTROL_PATH
    )
    # Bedrock's OpenAI- and Anthropic-compatible APIs, on bedrock-runtime and bedrock-mantle;
    # their stored responses and conversations are owned per key.
    compat_state = OwnedState(store)
    compat_runtime = bedrock_front(
        CompatRouter(compat.RUNTIME, RUNTIME_ROOTS), front=CompatFront, owned_state=compat_state
    )
    compat_mantle = bedrock_front(
        CompatRouter(compat.MANTLE, MANTLE_ROOTS),
        base=MANTLE_PATH,
        front=CompatFront,
        owned_state=compat_state,
    )
    files = FilesFront(
        upstream, authenticator, metering, settings.max_file_bytes, settings.body_timeout
    )
    batches = BatchSettler(
        store,
        upstream.control_get,
        upstream.s3_get,
        metering.charge_job,
        limiter.claim_once,
        region,
        settings.batch_poll_interval,
    )
    metrics.gauge(
        "bedrock_proxy_ledger_queue_depth",
        "Ledger rows waiting to be written.",
        lambda: metering.ledger.depth,
    )
    metrics.gauge(
        "bedrock_proxy_ledger_rows_dropped_total",
        "Ledger rows dropped because the queue was full (a store outage longer than it).",
        lambda: metering.ledger.dropped,
    )
    metrics.gauge(
        "bedrock_proxy_store_up",
        "1 while the key and ledger store answers, 0 during an outage.",
        lambda: 1 if store.health.up else 0,
    )
    if isinstance(limiter, RedisLimiter):
        redis_limiter = limiter
        metrics.gauge(
            "bedrock_proxy_redis_up",
            "1 while Redis answers, 0 during an outage.",
            lambda: 1 if redis_limiter.up else 0,
        )
        metrics.gauge(
            "bedrock_proxy_limit_settlements_pending",
            "Settlements of ended requests waiting for Redis to come back.",
            lambda: redis_limiter.unsettled,
        )
    metrics.gauge(
        "bedrock_proxy_simulated",
        "1 when Bedrock calls are answered by the built-in simulator, not AWS.",
        lambda: 1 if settings.simulate else 0,
    )
    metrics.gauge(
        "bedrock_proxy_requests_in_flight",
        "Requests being handled now.",
        lambda: pipeline.in_flight,
    )
    metrics.gauge(
        "bedrock_proxy_upstream_connections",
        "Connections open to the upstream services, in use or kept alive.",
        lambda: upstream.open_connections,
    )

    app, dispatcher = application(handler_args={"max_field_size": 65536})
    app[PIPELINE] = pipeline
    app[UPSTREAM] = upstream
    app[ACCESS_LOG] = access_log
    app[METRICS] = metrics
    if settings.metrics_dir:
        app[SHARED_METRICS] = SharedMetrics(metrics, settings.metrics_dir)
    app[CREDENTIALS] = credentials
    app[STORE] = store
    app[METERING] = metering
    app[BATCHES] = batches
    app[STATE] = {
        "ready": False,
        "needs_credentials": not (settings.upstream_bearer_token or settings.simulate),
    }
    if settings.simulate:
        app[SIMULATED] = True
    if keys is not None:
        app[KEYS] = keys
    app.cleanup_ctx.append(_lifecycle)
    reports = Reports(store, clock)
    AdminApi(
        keys, authenticator, reports, NamedLimitAdmin(store), metering.forget_limit
    ).add_routes(app)
    if settings.console:
        Console(
            keys,
            authenticator,
            reports,
            store,
            metrics,
            LiveView(metrics, lambda: pipeline.in_flight, fleet),
            settings.console_idle_timeout,
            simulated=settings.simulate,
            clock=clock,
            current=limiter.current,
            alerts=_alert_settings(settings),
            master_key=settings.master_key,
            body_timeout=settings.body_timeout,
            trusted_proxies=TrustedProxies(settings.trusted_proxies),
        ).add_routes(app)
    app.router.add_get("/health/liveness", _liveness)
    app.router.add_get("/metrics", _metrics_handler(authenticator, settings.metrics_public))
    app.router.add_get("/health/readiness", _readiness)
    for path in (FILES_PATH, FILES_PATH + "/{tail:.*}"):  # before /bedrock/{tail}
        app.router.add_route("*", path, pipeline.handler(files))
    # /bedrock first (the busiest), then the compatible APIs' paths nested in it.
    for path, front in (
        (BASE_PATH, bedrock),
        *((p, compat_runtime) for p in RUNTIME_PATHS),
        (AGENTCORE_PATH, agentcore),
        (AGENTCORE_CONTROL_PATH, agentcore_control),
        (MANTLE_PATH, compat_mantle),
    ):
        dispatcher.add_prefix_route(
            path,
            pipeline.handler(front),
            expect_handler=front.expect_handler,
            excluded=(FILES_PATH,) if path == BASE_PATH else (),
        )
    dispatcher.fallback = app.router.add_route("*", "/{tail:.*}", _unknown_route)
    return app


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
    app.router.add_get("/metrics", _metrics_handler(None, True))
    app.router.add_get("/health/readiness", _readiness)
    app.router.add_route("*", "/{tail:.*}", _unknown_route)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]
    try:
        await store.open()
    except StoreUnavailable as exc:
        raise StartupError(f"cannot open the key store: {exc.cause}") from None
    except Exception as exc:
        raise StartupError(f"cannot open the key store: {type(exc).__name__}: {exc}") from None
    if KEYS in app:
        resealed = await app[KEYS].reseal_secrets()
        if resealed:
            log.info("resealed %d SigV4 secrets under the current secret_key", resealed)
    metering = app[METERING]
    metering.ledger.start()
    upstream = app[UPSTREAM]
    await upstream.start()
    simulator_runner = await _start_simulator(upstream) if app.get(SIMULATED) else None
    if app[STATE]["needs_credentials"]:
        await app[CREDENTIALS].start()
    app[BATCHES].start()
    if SHARED_METRICS in app:
        app[SHARED_METRICS].start()
    app[STATE]["ready"] = True
    yield
    app[STATE]["ready"] = False
    await app[BATCHES].close()
    if SHARED_METRICS in app:
        await app[SHARED_METRICS].close()
    await upstream.close()
    if simulator_runner is not None:
        await simulator_runner.cleanup()
    app[ACCESS_LOG].flush()
    await metering.close()  # flushes the ledger
    await app[CREDENTIALS].close()
    await store.close()


def _alert_settings(settings: Settings) -> dict[str, str]:
    """What the console shows of the alert webhook: its format and host, never its path
    (a Slack webhook's path is its secret)."""
    if not settings.alert_webhook_url:
        return {}
    parts = urlsplit(settings.alert_webhook_url)
    return {"format": settings.alert_webhook_format, "target": f"{parts.scheme}://{parts.netloc}/…"}


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


def _metrics_handler(
    auth: Authenticator | None, public: bool
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def metrics(request: web.Request) -> web.Response:
        if not public:
            assert auth is not None
            try:
                await auth.master_only(request)
            except errors.AwsError as exc:
                return aws_response(exc)
        return web.Response(
            body=_exposition(request.app),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    return metrics


def _exposition(app: web.Application) -> bytes:
    shared = app.get(SHARED_METRICS)
    return shared.render() if shared is not None else app[METRICS].render()


async def _unknown_route(request: web.Request) -> web.Response:
    return aws_response(errors.unknown_operation(request.method, request.path))


def _profile_region(settings: Settings) -> str | None:
    import botocore.session

    try:
        region = botocore.session.Session(profile=settings.aws_profile).get_config_variable(
            "region"
        )
        return region if isinstance(region, str) else None
    except Exception:
        return None
