"""What requests share, built once from the settings: the store, the upstream fleet,
keys and authentication, metering and limits, the upstream client, the pipeline and the
fronts. ``app`` puts them on routes; nothing here knows a route."""

from __future__ import annotations

from dataclasses import dataclass

from ..access import policy
from ..access.admin_tokens import AdminTokens
from ..access.auth import Authenticator
from ..access.keycache import KeyCache
from ..access.keyservice import KeyService
from ..access.secretbox import SecretBox
from ..access.unverified import UnverifiedBodies
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
from ..wire.clock import Clock
from ..wire.endpoints import Endpoints, sdk_endpoint_overrides, valid_region
from ..wire.routing import (
    UPSTREAM_SERVICES,
)
from .config import ConfigError, Settings
from .credentials import CredentialProvider
from .fleet import Fleet
from .fleet.config import FleetConfigError
from .fronts.bedrock import BedrockFront
from .fronts.family import BedrockFronts
from .fronts.files import FilesFront
from .gate import Gate
from .gauges import register_gauges
from .pipeline import Pipeline, Shutdown
from .sso import SingleSignOn
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
    tokens: AdminTokens
    # The console's single sign-on, when ``oidc`` is set.
    sso: SingleSignOn | None
    limiter: InProcessLimiter | RedisLimiter
    metering: Metering
    upstream: UpstreamClient
    access_log: AccessLog
    pipeline: Pipeline
    batches: BatchSettler
    gate: Gate
    files: FilesFront
    # (prefix, front), the busiest first: /bedrock, then the paths nested in it.
    fronts: list[tuple[str, BedrockFront]]


def build_services(settings: Settings, access_log: AccessLog | None, clock: Clock) -> Services:
    """Every shared part, or a ConfigError naming the setting that stops it."""
    policy.load_fields()  # at startup, into the heap serve freezes (see pricing)
    overrides, region = _endpoints(settings)
    credentials = CredentialProvider(settings.aws_profile)
    store = open_store(
        settings.database_url,
        settings.sqlite_path,
        settings.database_pool_size,
        clock,
        settings.store_timeout,
    )
    metrics = Metrics()
    fleet = _fleet(settings, overrides, region, credentials, store, clock, metrics)
    authenticator, keys, box = _access(settings, store, clock, fleet)
    limiter, metering = _metering(settings, store, clock)
    shutdown = Shutdown()
    upstream = UpstreamClient(settings, fleet, shutdown, metrics)
    access_log = access_log or AccessLog(settings.access_log)
    gate = Gate(
        metering, UnverifiedBodies(settings.max_unverified_body_bytes), settings.max_body_bytes
    )
    fronts = BedrockFronts(
        settings, authenticator, upstream, metering, metrics, gate, clock, shutdown, store
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
        tokens=AdminTokens(store, clock),
        sso=SingleSignOn(settings.sso, box, clock) if settings.sso and box else None,
        limiter=limiter,
        metering=metering,
        upstream=upstream,
        access_log=access_log,
        pipeline=Pipeline(_observers(settings, metering, metrics, access_log), shutdown),
        batches=batches,
        gate=gate,
        files=FilesFront(
            upstream, authenticator, metering, settings.max_file_bytes, gate, settings.body_timeout
        ),
        fronts=fronts.by_prefix(store),
    )
    register_gauges(services)
    return services


def _fleet(
    settings: Settings,
    overrides: dict[str, str],
    region: str,
    credentials: CredentialProvider,
    store: Store,
    clock: Clock,
    metrics: Metrics,
) -> Fleet:
    """The upstream accounts and regions, and which keys and teams go where."""
    try:
        return Fleet(
            settings.fleet,
            overrides,
            region,
            credentials,
            store,
            clock,
            settings.redis_url,
            lambda member: metrics.upstream_event(member, "cooldowns"),
            settings.key_cache_ttl,
            settings.redis_prefix,
        )
    except (FleetConfigError, ValueError) as exc:
        raise ConfigError(f"config error: {exc}") from None


def _access(
    settings: Settings, store: Store, clock: Clock, fleet: Fleet
) -> tuple[Authenticator, KeyService | None, SecretBox | None]:
    """Who callers are (keys read through a cache), and the service that mints keys
    (none without a master key, or without a secret to seal keys' secrets with)."""
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
    keys = None
    if box is not None and settings.master_key:
        keys = KeyService(store, box, cache, clock, fleet.config.pools, fleet.set_team_upstream)
    return authenticator, keys, box


def _observers(
    settings: Settings, metering: Metering, metrics: Metrics, access_log: AccessLog
) -> list[Observer]:
    """What reads each completed exchange: metering first, since the others read the
    cost it works out."""
    observers: list[Observer] = [metering, metrics, access_log]
    if settings.tracing:
        try:
            observers.append(Tracing())
        except ImportError:
            raise ConfigError(
                "config error: tracing: needs OpenTelemetry (pip install 'bedrock-proxy[otel]')"
            ) from None
    return observers


def _endpoints(settings: Settings) -> tuple[dict[str, str], str]:
    """The upstream endpoints' overrides (the SDKs' variables, then the settings), and the
    default region."""
    overrides = {**sdk_endpoint_overrides((*UPSTREAM_SERVICES, "s3")), **settings.endpoints}
    region = settings.region or _profile_region(settings) or "us-east-1"
    if not valid_region(region):
        raise ConfigError(f"config error: region: {region!r} is not an AWS region name")
    try:
        Endpoints(overrides, region)
    except ValueError as exc:
        raise ConfigError(f"config error: endpoints: {exc}") from None
    return overrides, region


def _metering(
    settings: Settings, store: Store, clock: Clock
) -> tuple[InProcessLimiter | RedisLimiter, Metering]:
    """Prices, the limiter (in process, or shared in Redis), alerts and the ledger."""
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
            prefix=settings.redis_prefix,
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
        user_cap_default=settings.user_spend_cap,
    )
    return limiter, metering


def _profile_region(settings: Settings) -> str | None:
    import botocore.session

    try:
        region = botocore.session.Session(profile=settings.aws_profile).get_config_variable(
            "region"
        )
        return region if isinstance(region, str) else None
    except Exception:
        return None
