"""Prometheus metrics in the text exposition format, kept in plain Python objects.

A request updates the one series of its (operation, model, status, key); the families
the exposition shows are summed from the series when read. Each process keeps its own;
with ``--workers N`` the workers share snapshots (``shared``) and a scrape adds them up.
Label values are bounded by what the proxy routes: operations from the service models,
model ids, key aliases, AWS error codes.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..exchange import Exchange

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class Histogram:
    __slots__ = ("buckets", "series")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        # labels -> [counts per bucket..., +Inf count, sum]
        self.series: dict[tuple[str, ...], list[float]] = {}


_SERIES = ("requests", "tokens", "cost", "upstream_errors", "refusals", "unpriced", "members")
# Per upstream pool member: what ``members`` counts, as one counter family each.
_MEMBER_EVENTS = {
    "requests": "Requests served by each upstream pool member (account/region).",
    "throttles": "Throttled answers from each member, moved to the next one.",
    "failures": "5xx answers and failed connections of each member, moved to the next one.",
    "failovers": "Requests moved off each member to the next one.",
    "cooldowns": "Times each member was put to cool down.",
}
_HISTOGRAMS = ("duration", "upstream", "overhead", "ttfb")


class _Series:
    """Everything one (operation, model, status, key) has counted.

    A request updates only its own series: one dictionary lookup, then attributes and
    list slots. Keeping each family (requests, tokens by kind, cost, four histograms)
    as its own dictionary cost a tuple, a hash and a lookup per family and request,
    ~17k instructions a request on the path every request takes; the families are
    summed from the series when they are read (a scrape, the console), which is rare.
    """

    __slots__ = (
        "cache_read",
        "cache_write",
        "cost",
        "duration",
        "input",
        "output",
        "overhead",
        "requests",
        "ttfb",
        "unpriced",
        "upstream",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.duration = [0.0] * (len(_LATENCY_BUCKETS) + 2)
        # Created with their first observation: an operation without upstream timings
        # (or streams) has no series in those histograms.
        self.upstream: list[float] | None = None
        self.overhead: list[float] | None = None
        self.ttfb: list[float] | None = None
        self.input = self.output = self.cache_read = self.cache_write = 0
        self.cost: float | None = None  # None: no priced usage yet (no cost series)
        self.unpriced = 0


class Families:
    """The metric families as the exposition shows them: counters keyed by their label
    values, histograms by operation."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, ...], int] = {}
        self.tokens: dict[tuple[str, ...], int] = {}
        self.cost: dict[tuple[str, ...], float] = {}
        self.upstream_errors: dict[tuple[str, ...], int] = {}
        self.refusals: dict[tuple[str, ...], int] = {}
        self.unpriced: dict[tuple[str, ...], int] = {}
        self.members: dict[tuple[str, ...], int] = {}
        self.duration = Histogram(_LATENCY_BUCKETS)
        self.upstream = Histogram(_LATENCY_BUCKETS)
        self.overhead = Histogram(_OVERHEAD_BUCKETS)
        self.ttfb = Histogram(_LATENCY_BUCKETS)


class Metrics:
    def __init__(self) -> None:
        self._series: dict[tuple[str, str, int, str], _Series] = {}
        self.upstream_errors: dict[tuple[str, ...], int] = {}
        self.refusals: dict[tuple[str, ...], int] = {}
        self.members: dict[tuple[str, ...], int] = {}
        self.active_streams = 0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def upstream_event(self, member: str, event: str) -> None:
        """One of ``_MEMBER_EVENTS`` for a configured member (a bounded label set)."""
        _inc(self.members, (member, event))

    def completed(self, x: Exchange) -> None:
        if x.refusal is not None:
            _inc(self.refusals, (x.refusal,))
        self.observe(x, x.seconds)

    def observe(self, x: Exchange, seconds: float) -> None:
        op = x.operation.name if x.operation is not None else "unknown"
        identity = x.identity
        status = x.status
        model = x.model
        if not model:
            model = ""
        elif identity is None or not 200 <= status < 400:
            # A model id is a label only once an authenticated request's upstream accepted
            # it: anything else a client names would grow the exposition without bound.
            model = "other"
        key = "" if identity is None else identity.alias or identity.key_id or identity.kind
        labels = (op, model, status, key)
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series()
        series.requests += 1
        duration = series.duration
        duration[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        duration[-1] += seconds
        if x.upstream is not None:
            _inc(self.members, (x.upstream, "requests"))
        started, done = x.upstream_started, x.upstream_done
        if started is not None and done is not None:
            upstream = done - started
            up_row = series.upstream
            if up_row is None:
                up_row = series.upstream = [0.0] * (len(_LATENCY_BUCKETS) + 2)
            up_row[bisect_left(_LATENCY_BUCKETS, upstream)] += 1
            up_row[-1] += upstream
            overhead = seconds - upstream if seconds > upstream else 0.0
            over_row = series.overhead
            if over_row is None:
                over_row = series.overhead = [0.0] * (len(_OVERHEAD_BUCKETS) + 2)
            over_row[bisect_left(_OVERHEAD_BUCKETS, overhead)] += 1
            over_row[-1] += overhead
        if x.first_byte_at is not None:
            ttfb = x.first_byte_at - x.started
            ttfb_row = series.ttfb
            if ttfb_row is None:
                ttfb_row = series.ttfb = [0.0] * (len(_LATENCY_BUCKETS) + 2)
            ttfb_row[bisect_left(_LATENCY_BUCKETS, ttfb)] += 1
            ttfb_row[-1] += ttfb
        if x.upstream_error:
            _inc(self.upstream_errors, (x.upstream_error,))
        usage = x.usage
        if usage is not None and usage.found:
            series.input += usage.input_tokens
            series.output += usage.output_tokens
            series.cache_read += usage.cache_read_tokens
            series.cache_write += usage.cache_write_tokens
            if x.cost is not None:
                series.cost = (series.cost or 0.0) + x.cost
            elif not usage.free:
                series.unpriced += 1

    def families(self) -> Families:
        """Every family, summed from the series (a scrape's or the console's view)."""
        out = Families()
        out.upstream_errors = dict(self.upstream_errors)
        out.refusals = dict(self.refusals)
        out.members = dict(self.members)
        for (op, model, status, key), series in self._series.items():
            out.requests[(op, model, str(status), key)] = series.requests
            _add_row(out.duration, op, series.duration)
            _add_row(out.upstream, op, series.upstream)
            _add_row(out.overhead, op, series.overhead)
            _add_row(out.ttfb, op, series.ttfb)
            for kind, count in (
                ("input", series.input),
                ("output", series.output),
                ("cache_read", series.cache_read),
                ("cache_write", series.cache_write),
            ):
                if count:
                    _inc(out.tokens, (model, key, kind), count)
            if series.cost is not None:
                out.cost[(model, key)] = out.cost.get((model, key), 0.0) + series.cost
            if series.unpriced:
                _inc(out.unpriced, (model,), series.unpriced)
        return out

    # ---------------------------------------------------------------- across workers

    def snapshot(self) -> dict[str, Any]:
        """Everything ``render`` shows, as JSON-able data another worker can add to its own."""
        families = self.families()
        return {
            "series": {n: [[list(k), v] for k, v in getattr(families, n).items()] for n in _SERIES},
            "histograms": {
                n: [[list(k), row] for k, row in getattr(families, n).series.items()]
                for n in _HISTOGRAMS
            },
            "gauges": self._gauge_values(),
        }

    def _gauge_values(self) -> dict[str, float]:
        values: dict[str, float] = {"bedrock_proxy_active_streams": self.active_streams}
        for name, (_, read) in self.gauges.items():
            values[name] = read()
        return values

    def render(self, others: Sequence[dict[str, Any]] = (), live: Sequence[bool] = ()) -> bytes:
        """The exposition; with ``others`` (other workers' snapshots) their counters and
        histograms are added to this one's, and the gauges of those still ``live``."""
        families = self.families()
        if others:
            _merge(families, others)
        gauges = self._gauge_values()
        for snap, alive in zip(others, live, strict=True):
            if alive:
                for name, value in snap["gauges"].items():
                    gauges[name] = gauges.get(name, 0.0) + value
        return _render(families, gauges, self.gauges)


def _add_row(histogram: Histogram, op: str, row: list[float] | None) -> None:
    if row is None:
        return
    have = histogram.series.get((op,))
    if have is None:
        histogram.series[(op,)] = list(row)
    else:
        for i, value in enumerate(row):
            have[i] += value


def _merge(families: Families, others: Sequence[dict[str, Any]]) -> None:
    """Add other workers' snapshots to ``families``."""
    for name in _SERIES:
        series: dict[tuple[str, ...], Any] = getattr(families, name)
        for snap in others:
            for labels, value in snap["series"].get(name, ()):
                key = tuple(labels)
                series[key] = series.get(key, 0) + value
    for name in _HISTOGRAMS:
        target: Histogram = getattr(families, name)
        for snap in others:
            for labels, row in snap["histograms"].get(name, ()):
                key = tuple(labels)
                have = target.series.get(key)
                if have is None or len(have) != len(row):
                    target.series[key] = list(row)
                else:
                    target.series[key] = [a + b for a, b in zip(have, row, strict=True)]


def _render(
    families: Families,
    gauges: dict[str, float],
    gauge_help: dict[str, tuple[str, Callable[[], float]]],
) -> bytes:
    out: list[str] = []
    _counter(
        out,
        "bedrock_proxy_requests_total",
        "Requests by operation, model, status and key.",
        ("operation", "model", "status", "key"),
        families.requests,
    )
    _histogram(
        out,
        "bedrock_proxy_request_duration_seconds",
        "Whole request, as the client saw it.",
        families.duration,
    )
    _histogram(
        out,
        "bedrock_proxy_upstream_duration_seconds",
        "From sending upstream to the last byte of the response.",
        families.upstream,
    )
    _histogram(
        out,
        "bedrock_proxy_overhead_seconds",
        "Time the proxy itself added: the request minus the upstream time.",
        families.overhead,
    )
    _histogram(
        out,
        "bedrock_proxy_stream_ttfb_seconds",
        "Time to the first byte sent to the client, for streamed responses.",
        families.ttfb,
    )
    out.append("# HELP bedrock_proxy_active_streams Streams being relayed now.")
    out.append("# TYPE bedrock_proxy_active_streams gauge")
    out.append(f"bedrock_proxy_active_streams {_number(gauges['bedrock_proxy_active_streams'])}")
    _counter(
        out,
        "bedrock_proxy_tokens_total",
        "Tokens by model, key and kind.",
        ("model", "key", "kind"),
        families.tokens,
    )
    _counter(
        out,
        "bedrock_proxy_cost_usd_total",
        "Cost in USD by model and key.",
        ("model", "key"),
        families.cost,
    )
    _counter(
        out,
        "bedrock_proxy_upstream_errors_total",
        "Upstream errors by AWS error code.",
        ("code",),
        families.upstream_errors,
    )
    _counter(
        out,
        "bedrock_proxy_limit_refusals_total",
        "Requests refused by a limit.",
        ("reason",),
        families.refusals,
    )
    _counter(
        out,
        "bedrock_proxy_unpriced_requests_total",
        "Requests with usage but no price for their model.",
        ("model",),
        families.unpriced,
    )
    for event, help_text in _MEMBER_EVENTS.items():
        _counter(
            out,
            f"bedrock_proxy_upstream_member_{event}_total",
            help_text,
            ("member",),
            {k[:1]: v for k, v in families.members.items() if k[1] == event},
        )
    for name, (help_text, _) in gauge_help.items():
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} gauge")
        out.append(f"{name} {_number(gauges[name])}")
    return ("\n".join(out) + "\n").encode()


def _inc(series: dict[tuple[str, ...], int], labels: tuple[str, ...], amount: int = 1) -> None:
    series[labels] = series.get(labels, 0) + amount


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    pairs = (f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + ",".join(pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _counter(
    out: list[str],
    name: str,
    help_text: str,
    names: tuple[str, ...],
    series: dict[tuple[str, ...], float] | dict[tuple[str, ...], int],
) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} counter")
    for labels, value in series.items():
        out.append(f"{name}{_labels(names, labels)} {_number(value)}")


def _histogram(out: list[str], name: str, help_text: str, histogram: Histogram) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} histogram")
    for (op,), row in histogram.series.items():
        cumulative = 0.0
        for bound, count in zip(histogram.buckets, row, strict=False):
            cumulative += count
            out.append(f'{name}_bucket{{operation="{_escape(op)}",le="{bound}"}} {int(cumulative)}')
        cumulative += row[len(histogram.buckets)]
        out.append(f'{name}_bucket{{operation="{_escape(op)}",le="+Inf"}} {int(cumulative)}')
        out.append(f'{name}_sum{{operation="{_escape(op)}"}} {row[-1]!r}')
        out.append(f'{name}_count{{operation="{_escape(op)}"}} {int(cumulative)}')
