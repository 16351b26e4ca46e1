"""The settings' checks: a wrong setting stops startup with one line naming it."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from ..wire.endpoints import valid_region
from ..wire.errors import AwsError
from ..wire.params import parse_duration
from ..wire.routing import UPSTREAM_SERVICES
from .fleet.config import FleetConfig, FleetConfigError, parse_fleet

if TYPE_CHECKING:
    from .config import Settings


class ConfigError(Exception):
    """A setting is missing or wrong; the message names it."""


def validate(s: Settings) -> FleetConfig:
    """Refuse a wrong setting with one line naming it; ``upstreams``, parsed."""
    checks = (_check_places, _check_timeouts, _check_metering, _check_sizes, _check_stores)
    for check in (*checks, _check_user_cap):
        check(s)
    try:
        fleet = parse_fleet(s.upstreams)
    except FleetConfigError as exc:
        raise ConfigError(f"config error: {exc}") from None
    if s.master_key is not None and len(s.master_key) < 8:
        raise ConfigError("config error: master_key: must be at least 8 characters")
    return fleet


def _check_places(s: Settings) -> None:
    """Where the proxy listens and where it sends."""
    if not 0 < s.port < 65536:
        raise ConfigError(f"config error: port: {s.port} is not a TCP port")
    if s.region is not None and not valid_region(s.region):
        raise ConfigError(f"config error: region: {s.region!r} is not an AWS region name")
    for name in s.endpoints:
        if name not in (*UPSTREAM_SERVICES, "s3"):
            raise ConfigError(
                f"config error: endpoints: unknown service {name!r} "
                f"(one of {', '.join(UPSTREAM_SERVICES)}, s3)"
            )


def _check_timeouts(s: Settings) -> None:
    for name in (
        "connect_timeout",
        "first_byte_timeout",
        "idle_timeout",
        "header_timeout",
        "body_timeout",
        "keepalive_timeout",
        "store_timeout",
        "redis_timeout",
        "max_session_seconds",
    ):
        if getattr(s, name) <= 0:
            raise ConfigError(f"config error: {name}: must be greater than zero")


def _check_metering(s: Settings) -> None:
    """Alerts, per-request prices and batch jobs."""
    if s.alert_webhook_url is not None and not s.alert_webhook_url.startswith(
        ("http://", "https://")
    ):
        raise ConfigError("config error: alert_webhook_url: must be an http(s):// URL")
    if s.alert_webhook_format not in ("json", "slack"):
        raise ConfigError("config error: alert_webhook_format: must be json or slack")
    for name, value in s.request_prices.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e6:
            raise ConfigError(f"config error: request_prices: {name}: must be a price in USD")
    if s.batch_poll_interval <= 0 or not 0 <= s.batch_discount <= 1:
        raise ConfigError(
            "config error: batch_poll_interval must be positive, batch_discount within 0..1"
        )


def _check_sizes(s: Settings) -> None:
    """Bodies, streams, logs, TLS, ports and processes."""
    if s.max_body_bytes <= 0:
        raise ConfigError("config error: max_body_bytes: must be greater than zero")
    if not 0 <= s.upstream_http2_streams <= 1000:
        raise ConfigError("config error: upstream_http2_streams: must be between 0 and 1000")
    if s.max_unverified_body_bytes < s.max_body_bytes:
        raise ConfigError(
            "config error: max_unverified_body_bytes: must be at least max_body_bytes"
        )
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"config error: log_level: {s.log_level!r} is not a log level")
    if (s.tls_cert is None) != (s.tls_key is None):
        missing = "tls_key" if s.tls_key is None else "tls_cert"
        raise ConfigError(f"config error: {missing}: tls_cert and tls_key must be set together")
    if s.http_port is not None and (not 0 < s.http_port < 65536 or s.http_port == s.port):
        raise ConfigError(f"config error: http_port: {s.http_port} must be a free TCP port")
    if not 1 <= s.workers <= 256:
        raise ConfigError("config error: workers: must be between 1 and 256")
    if s.shutdown_timeout < 0:
        raise ConfigError("config error: shutdown_timeout: must not be negative")
    if s.ledger_flush_interval <= 0:
        raise ConfigError("config error: ledger_flush_interval: must be greater than zero")


def _check_stores(s: Settings) -> None:
    """Redis, trusted proxies, limits, the key store and its secrets."""
    if s.redis_url is not None and not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("config error: redis_url: must be a redis:// URL")
    for network in s.trusted_proxies:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                f"config error: trusted_proxies: {network!r} is not an IP address or network"
            ) from None
    if s.limits_on_redis_outage not in ("refuse", "local"):
        raise ConfigError("config error: limits_on_redis_outage: must be refuse or local")
    if not 3 <= s.limits_lease_seconds <= 86400:
        raise ConfigError("config error: limits_lease_seconds: must be between 3 and 86400")
    if s.key_cache_ttl < 0:
        raise ConfigError("config error: key_cache_ttl: must not be negative")
    if s.database_url is not None and not s.database_url.startswith(
        ("postgres://", "postgresql://")
    ):
        raise ConfigError("config error: database_url: must be a postgresql:// URL")
    if s.secret_key is not None and len(s.secret_key) < 16:
        raise ConfigError("config error: secret_key: must be at least 16 characters")
    if s.simulate and s.upstreams:
        raise ConfigError("config error: simulate: the simulator replaces upstreams; unset one")


def _check_user_cap(s: Settings) -> None:
    cap = s.user_spend_cap
    unknown = sorted(set(cap) - {"max_budget", "budget_duration"})
    if unknown:
        raise ConfigError(f"config error: user_spend_cap: unknown field {unknown[0]!r}")
    budget = cap.get("max_budget")
    if budget is not None and (not isinstance(budget, int | float) or budget < 0):
        raise ConfigError("config error: user_spend_cap.max_budget: a number, at least 0")
    if cap.get("budget_duration") is not None:
        try:
            parse_duration("budget_duration", str(cap["budget_duration"]))
        except AwsError as exc:
            raise ConfigError(f"config error: user_spend_cap.{exc.message}") from None
