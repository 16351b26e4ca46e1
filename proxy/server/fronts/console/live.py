"""What the live page shows, read from the metrics the proxy keeps anyway (no hook on the
request path): request rate, in-flight requests and streams, latency quantiles from the
histograms, errors by AWS code, and each upstream pool member's health."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ....observe.metrics import Histogram, Metrics
from ...fleet import Fleet


class LiveView:
    def __init__(self, metrics: Metrics, in_flight: Callable[[], int], fleet: Fleet) -> None:
        self._metrics = metrics
        self._in_flight = in_flight
        self._fleet = fleet
        self._last: tuple[float, int] | None = None
        self._rps = 0.0

    def __call__(self) -> dict[str, Any]:
        m = self._metrics.families()
        total = sum(m.requests.values())
        now = time.monotonic()
        if self._last is not None and now - self._last[0] >= 0.5:
            self._rps = (total - self._last[1]) / (now - self._last[0])
            self._last = (now, total)
        elif self._last is None:
            self._last = (now, total)
        return {
            "rps": round(self._rps, 1),
            "requests": total,
            "in_flight": self._in_flight(),
            "active_streams": self._metrics.active_streams,
            "p50_ms": _quantile_ms(m.duration, 0.5),
            "p99_ms": _quantile_ms(m.duration, 0.99),
            "overhead_p50_ms": _quantile_ms(m.overhead, 0.5),
            "overhead_p99_ms": _quantile_ms(m.overhead, 0.99),
            "upstream_p50_ms": _quantile_ms(m.upstream, 0.5),
            "upstream_p99_ms": _quantile_ms(m.upstream, 0.99),
            "errors": {labels[0]: count for labels, count in m.upstream_errors.items()},
            "members": self._members(),
        }

    def _members(self) -> list[dict[str, Any]]:
        if not self._fleet.configured:
            return []
        counts = self._metrics.members
        now = time.time()
        out = []
        seen = set()
        for pool in self._fleet.config.pools.values():
            for member in pool:
                if member.name in seen:
                    continue
                seen.add(member.name)
                until = self._fleet.health.cooling_until(member.name)
                out.append(
                    {
                        "member": member.name,
                        "state": "cooling down" if until > now else "healthy",
                        "requests": counts.get((member.name, "requests"), 0),
                        "throttles": counts.get((member.name, "throttles"), 0),
                        "failovers": counts.get((member.name, "failovers"), 0),
                    }
                )
        return out


def _quantile_ms(histogram: Histogram, q: float) -> float | None:
    """The bucket bound under which ``q`` of all observations fall (every label summed)."""
    rows = list(histogram.series.values())
    if not rows:
        return None
    counts = [sum(row[i] for row in rows) for i in range(len(histogram.buckets) + 1)]
    total = sum(counts)
    if not total:
        return None
    seen = 0.0
    for bound, count in zip((*histogram.buckets, float("inf")), counts, strict=True):
        seen += count
        if seen >= q * total:
            return round(bound * 1000, 3) if bound != float("inf") else None
    return None
