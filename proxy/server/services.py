"""What requests share, built once from the settings: the store, the upstream fleet,
keys and authentication, metering and limits, the upstream client, the pipeline and the
fronts. ``app`` puts them on routes; nothing here knows a route."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
from ..metering.pricing import PriceTable
from ..metering.service import LedgerBudgets, Metering
from ..observe.accesslog import AccessLog
from ..observe.metrics import Metrics
from ..observe.tracing import Tracing
from ..store import Store, open_store
from ..wire import compat
from ..wire.clock import Clock
from ..wire.compat import CompatRouter
from ..wire.endpoints import Endpoints, sdk_endpoint_overrides, valid_region
from ..wire.routing import (
    AGENTCORE,
    AGENTCORE_CONTROL,
    UPSTREAM_SERVICES,
    Router,
    load_operations,
)
from .config import ConfigError, Settings
from .credentials import CredentialProvider
from .fleet import Fleet
from .fleet.config import FleetConfigError
from .fronts.bedrock import AGENTCORE_CONTROL_PATH, AGENTCORE_PATH, BASE_PATH, BedrockFront
from .fronts.compat import MANTLE_PATH, MANTLE_ROOTS, RUNTIME_PATHS, RUNTIME_ROOTS, CompatFront
from .fronts.duplex import DuplexRelay
from .fronts.files import FilesFront
from .pipeline import Pipeline, Shutdown
from .upstream import UpstreamClient


@dataclass(slots=True)
class Services:
    """The process's shared parts, and its fronts by the path prefix each serves."""

    settings: Settings
    clock: Clock
    region: str
    credentials: CredentialProvider
    store: Store
    metrics: Metrics
    fleet: Fleet
    authenticator: Authenticator
    keys: KeyService | None
    limiter: InProcessLimiter | RedisLimiter
    metering: Metering
    upstream: UpstreamClient
    access_log: AccessLog
    pipeline: Pipeline
    batches: BatchSettler
    files: FilesFront
    # (prefix, front), the busiest first: /bedrock, then the paths nested in it.
    fronts: list[tuple[str, BedrockFront]]


def build_services(settings: Settings, access_log: AccessLog | None, clock: Clock) -> Services:
    """Every shared part, or a ConfigError naming the setting that stops it."""
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
    services = Services(
        settings=settings,
        clock=clock,
        region=region,
        credentials=credentials,
        store=store,
        metrics=metrics,
        fleet=fleet,
        authenticator=authenticator,
        keys=keys,
        limiter=limiter,
        metering=metering,
        upstream=upstream,
        access_log=access_log,
        pipeline=pipeline,
        batches=batches,
        files=files,
        fronts=[
            (BASE_PATH, bedrock),
            *((p, compat_runtime) for p in RUNTIME_PATHS),
            (AGENTCORE_PATH, agentcore),
            (AGENTCORE_CONTROL_PATH, agentcore_control),
            (MANTLE_PATH, compat_mantle),
        ],
    )
    _gauges(services)
    return services


def _gauges(s: Services) -> None:
    """The gauges a scrape reads from the shared parts themselves."""
    settings, metrics, metering, store = s.settings, s.metrics, s.metering, s.store
    limiter, pipeline, upstream = s.limiter, s.pipeline, s.upstream
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


def _profile_region(settings: Settings) -> str | None:
    import botocore.session

    try:
        region = botocore.session.Session(profile=settings.aws_profile).get_config_variable(
            "region"
        )
        return region if isinstance(region, str) else None
    except Exception:
        return None
