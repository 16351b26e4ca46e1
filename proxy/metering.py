"""Metering glue: which limits apply to a request, what it is estimated to cost, and what
it really cost — charged to the limits and written to the ledger when it ends."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from . import errors
from .auth import Identity
from .keys import KeyRecord, parse_duration
from .ledger import Ledger
from .limits import Admission, BudgetSource, InProcessLimiter, LimitSpec, RedisLimiter
from .metrics import Metrics
from .pricing import PriceTable
from .routing import Operation
from .store import Store
from .usage import Meter, Usage

log = logging.getLogger("bedrock_proxy.metering")

_LIMIT_FIELDS = ("max_budget", "budget_duration", "rpm_limit", "tpm_limit", "max_parallel_requests")


@dataclass(slots=True)
class Exchange:
    """One request's way through the proxy: what the access log and the ledger record."""

    request_id: str
    method: str
    started: float
    operation: Operation | None = None
    model: str | None = None
    identity: Identity | None = None
    annotations: dict[str, Any] = field(default_factory=dict)
    admission: Admission | None = None
    meter: Meter | None = None
    usage: Usage | None = None
    cost: float | None = None
    status: int = 500
    error: str | None = None
    incomplete: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_request_id: str | None = None
    upstream_error: str | None = None
    # perf_counter marks, for the metrics: upstream time vs the proxy's own.
    upstream_started: float | None = None
    upstream_headers_at: float | None = None
    upstream_done: float | None = None
    first_byte_at: float | None = None

    def finish_usage(self) -> Usage | None:
        if self.usage is None and self.meter is not None:
            self.usage = self.meter.finish()
        return self.usage


class LedgerBudgets(BudgetSource):
    def __init__(self, store: Store) -> None:
        self._store = store

    async def spent(self, spec: LimitSpec, since: float) -> float:
        return await self._store.spend_since(spec.scope, spec.id, since)


class Metering:
    def __init__(
        self,
        store: Store,
        prices: PriceTable,
        ledger: Ledger,
        redis_url: str | None,
        limits_ttl: float,
        reserve_output_tokens: int,
        cost_headers: bool,
    ) -> None:
        self._store = store
        self.prices = prices
        self.ledger = ledger
        budgets = LedgerBudgets(store)
        self.limiter: InProcessLimiter | RedisLimiter = (
            RedisLimiter(redis_url, budgets) if redis_url else InProcessLimiter(budgets)
        )
        self._limits_ttl = limits_ttl
        self._named: dict[str, tuple[float, LimitSpec | None]] = {}
        # Per key: the record its spec was built from (a changed key is a new record).
        self._key_limits: dict[str, tuple[KeyRecord, LimitSpec | None]] = {}
        self._reserve_output = reserve_output_tokens
        self.cost_headers = cost_headers
        self._pending: set[asyncio.Task[None]] = set()
        self.metrics: Metrics | None = None

    # ---------------------------------------------------------------- admission

    async def admit(self, x: Exchange, body_size: int) -> None:
        specs = await self._specs(x)
        if not specs:
            return
        try:
            x.admission = await self.limiter.admit(
                specs, x.request_id, self.estimate(x.model, body_size)
            )
        except errors.AwsError as exc:
            if exc.reason is not None and self.metrics is not None:
                self.metrics.refused(exc.reason)
            raise

    def estimate(self, model: str | None, body_size: int) -> float:
        """Input tokens guessed from the body size, plus a fixed allowance of output."""
        found = self.prices.price_for(model) if model else None
        if found is None:
            return 0.0
        price, multiplier = found
        return (
            (body_size / 4 * price.input + self._reserve_output * price.output) * multiplier / 1000
        )

    async def _specs(self, x: Exchange) -> list[LimitSpec]:
        specs: list[LimitSpec] = []
        record = x.identity.record if x.identity is not None else None
        if record is not None:
            key_spec = self._key_limit(record)
            if key_spec is not None:
                specs.append(key_spec)
            for scope, value in (("user", record.spec.user_id), ("team", record.spec.team_id)):
                if value:
                    named = await self._named_limit(f"{scope}:{value}", scope, value)
                    if named is not None:
                        specs.append(named)
        for limit_id in x.annotations.get("limit_ids", ()):
            named = await self._named_limit(limit_id, "limit", limit_id)
            if named is not None:
                specs.append(named)
        return specs

    def _key_limit(self, record: KeyRecord) -> LimitSpec | None:
        cached = self._key_limits.get(record.key_id)
        if cached is not None and cached[0] is record:
            return cached[1]
        fields = {name: getattr(record.spec, name) for name in _LIMIT_FIELDS}
        spec = _limit_spec("key", record.key_id, fields, record.created_at)
        if len(self._key_limits) > 100_000:
            self._key_limits.clear()
        self._key_limits[record.key_id] = (record, spec)
        return spec

    async def _named_limit(self, limit_id: str, scope: str, ident: str) -> LimitSpec | None:
        now = time.monotonic()
        cached = self._named.get(limit_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        row = await self._store.get_limit(limit_id)
        spec = _limit_spec(scope, ident, row, row["created_at"]) if row else None
        if len(self._named) > 10_000:
            self._named.clear()
        self._named[limit_id] = (now + self._limits_ttl, spec)
        return spec

    def forget_limit(self, limit_id: str) -> None:
        self._named.pop(limit_id, None)

    # ---------------------------------------------------------------- completion

    def price(self, x: Exchange) -> float | None:
        usage = x.finish_usage()
        if usage is None:
            return None
        x.cost = self.prices.cost(x.model, usage, succeeded=200 <= x.status < 300)
        return x.cost

    def complete(self, x: Exchange, latency_ms: float) -> None:
        """Charge the limits and queue the ledger row; never blocks the response."""
        if x.identity is None or x.operation is None:
            return
        usage = x.finish_usage() or Usage()
        cost = x.cost if x.usage is not None and x.cost is not None else self.price(x)
        if x.admission is not None:
            task = asyncio.get_running_loop().create_task(
                self._settle(x.admission, usage.total_tokens, cost)
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        self.ledger.record(*self._row(x, usage, cost, latency_ms))

    async def _settle(self, admission: Admission, tokens: int, cost: float | None) -> None:
        try:
            await self.limiter.settle(admission, tokens, cost)
        except Exception as exc:  # the ledger still has the row; counters re-sync per period
            log.error(
                "could not settle limits for %s: %s", admission.request_id, type(exc).__name__
            )

    def _row(
        self, x: Exchange, usage: Usage, cost: float | None, latency_ms: float
    ) -> tuple[tuple, list[tuple]]:
        identity = x.identity
        record = identity.record if identity is not None else None
        spec = record.spec if record is not None else None
        now = time.time()
        annotations = x.annotations
        row = (
            x.request_id,
            now,
            _utc_day(now),
            identity.key_id if identity is not None else None,
            spec.key_alias if spec else None,
            spec.user_id if spec else None,
            spec.team_id if spec else None,
            annotations.get("end_user_id"),
            x.operation.name if x.operation else "",
            x.operation.service.name if x.operation else "",
            x.model,
            x.status,
            latency_ms,
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.cache_write_tokens,
            usage.total_tokens,
            cost,
            1 if x.incomplete else 0,
            annotations.get("use_case_name"),
            orjson.dumps(annotations).decode() if annotations else None,
            x.error,
        )
        labels = [
            (x.request_id, "tag", tag, now, cost, usage.total_tokens)
            for tag in annotations.get("tags", ())
        ] + [
            (x.request_id, "limit", limit_id, now, cost, usage.total_tokens)
            for limit_id in annotations.get("limit_ids", ())
        ]
        return row, labels

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.ledger.close()
        await self.limiter.close()


_day_cache: tuple[int, str] = (-1, "")


def _utc_day(ts: float) -> str:
    """The UTC date of ``ts``; formatted once per day, not once per request."""
    global _day_cache
    day = int(ts // 86400)
    if _day_cache[0] != day:
        _day_cache = (day, datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d"))
    return _day_cache[1]


def _limit_spec(scope: str, ident: str, fields: dict[str, Any], anchor: float) -> LimitSpec | None:
    values = {name: fields.get(name) for name in _LIMIT_FIELDS}
    if all(v is None for v in values.values()):
        return None
    duration = values["budget_duration"]
    return LimitSpec(
        scope=scope,
        id=ident,
        rpm=values["rpm_limit"],
        tpm=values["tpm_limit"],
        max_parallel=values["max_parallel_requests"],
        max_budget=values["max_budget"],
        budget_seconds=parse_duration("budget_duration", duration) if duration else None,
        anchor=anchor,
    )
