"""The gauges a scrape of ``/metrics`` reads from the shared parts themselves (queues,
outages, connections), registered once the parts are built."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..metering.limits import RedisLimiter

if TYPE_CHECKING:
    from .services import Services


def register_gauges(s: Services) -> None:
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
