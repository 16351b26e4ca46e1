"""Metering glue: which limits apply to a request, what it is estimated to cost, and what
it really cost — charged to the limits and written to the ledger when it ends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from ..exchange import Exchange, Identity
from ..store import SLOW_READ, Store, StoreUnavailable
from ..store.records import KeyRecord, LabelRow, SpendRow
from ..wire import errors
from ..wire.clock import SYSTEM_CLOCK, Clock
from ..wire.params import LIMIT_FIELDS
from ..wire.routing import AGENTCORE, Operation, Service
from .alerts import BudgetAlerts
from .compat_usage import CompatMeter
from .ledger import Ledger
from .limits import Admission, BudgetSource, InProcessLimiter, LimitSpec, RedisLimiter
from .named import Directory, NamedLimits, limit_spec
from .pricing import PriceTable, tokens_cost
from .usage import EventStreamMeter, Usage

log = logging.getLogger("bedrock_proxy.metering")


class LedgerBudgets(BudgetSource):
    def __init__(self, store: Store) -> None:
        self._store = store

    async def spent(self, spec: LimitSpec, since: float) -> float:
        return await self._store.spend.since(spec.scope, spec.id, since)


# What a batch job's settlement is recorded as in the ledger.
BATCH_JOB = Operation(
    Service("bedrock", "bedrock", "bedrock"), "ModelInvocationJob", "POST", "", (), False
)
# Operations that bill models the request does not name: priced per request
# (``request_prices``), or by the tokens an agent's trace reports. Every AgentCore
# operation is priced per request too: AgentCore bills by consumption (vCPU- and
# GB-seconds, requests), which its answers do not report.
REQUEST_PRICED = frozenset(
    {
        "InvokeAgent",
        "InvokeInlineAgent",
        "InvokeFlow",
        "RetrieveAndGenerate",
        "RetrieveAndGenerateStream",
        "AgenticRetrieveStream",
        "GenerateQuery",
        "OptimizePrompt",
        "Rerank",
        "StartAsyncInvoke",  # video and other media: priced per job, not per token
    }
)
# Operations billed by the tokens of the model they name.
_TOKEN_PRICED = frozenset(
    {
        "Converse",
        "ConverseStream",
        "InvokeModel",
        "InvokeModelWithResponseStream",
        "InvokeModelWithBidirectionalStream",
        "CreateModelInvocationJob",
    }
)


@dataclass(frozen=True, slots=True)
class _Applying:
    """The limits a request is admitted against, and whether any is a budget or counts
    tokens (what admission must work out for them)."""

    specs: list[LimitSpec]
    budget: bool = False
    tpm: bool = False


_NO_LIMITS = _Applying([])


class Metering:
    def __init__(
        self,
        store: Store,
        prices: PriceTable,
        ledger: Ledger,
        limiter: InProcessLimiter | RedisLimiter,
        limits_ttl: float,
        reserve_output_tokens: int,
        cost_headers: bool,
        request_prices: dict[str, float] | None = None,
        batch_discount: float = 0.5,
        clock: Clock = SYSTEM_CLOCK,
        alerts: BudgetAlerts | None = None,
        simulated: bool = False,
        user_cap_default: dict[str, Any] | None = None,
    ) -> None:
        # Every user's spend cap unless their record or team says otherwise.
        self.user_cap_default = user_cap_default or {}
        # Answered by the built-in simulator: every ledger row says so (its account is
        # "simulated"), so an operator never reads simulated spend as AWS's.
        self._account = "simulated" if simulated else None
        self._clock = clock
        self._store = store
        self.prices = prices
        self.ledger = ledger
        self.limiter = limiter
        self._limits_ttl = limits_ttl
        # (re-read after, expires, the limits): re-read behind requests from half the ttl.
        self._named: tuple[float, float, NamedLimits] | None = None
        # A read of the named limits under way, and when it began.
        self._named_reading: tuple[asyncio.Task[NamedLimits], float] | None = None
        self._named_generation = 0  # bumped by a change here: an older read is not kept
        # Per key: the record its spec was built from (a changed key is a new record).
        self._key_limits: dict[str, tuple[KeyRecord, LimitSpec | None]] = {}
        # Per key: every limit its requests are admitted against, with the record and the
        # named limits that was worked out from.
        self._applying_by_key: dict[str, tuple[KeyRecord, NamedLimits, _Applying]] = {}
        self._reserve_output = reserve_output_tokens
        self.cost_headers = cost_headers
        self.request_prices = request_prices or {}
        self.batch_discount = batch_discount
        self._pending: set[asyncio.Task[None]] = set()
        self.alerts = alerts

    # ---------------------------------------------------------------- admission

    async def admit(self, x: Exchange, body_size: int) -> None:
        applying = self._cached_applying(x) or await self._applying(x)
        specs = applying.specs
        if not specs:
            return
        op = x.operation
        if applying.budget and op is not None:
            self._refuse_unpriced(x, op)
        try:
            tokens = body_size // 4 + self._reserve_output if applying.tpm else 0
            reserve = (
                self._query_cost(x)
                if self._priced_by_query(x)
                else self.estimate(x.model, body_size)
            )
            limiter = self.limiter
            admission = (
                limiter.admit_now(specs, x.request_id, reserve, tokens)
                if isinstance(limiter, InProcessLimiter)
                else None
            )
            if admission is None:
                admission = await limiter.admit(specs, x.request_id, reserve, tokens)
            x.admission = admission
        except errors.AwsError as exc:
            x.refusal = exc.reason
            raise

    def _refuse_unpriced(self, x: Exchange, op: Operation) -> None:
        """A budget applies: refuse what it could not bind (a call with no price)."""
        if (
            x.model is not None
            and op.name in _TOKEN_PRICED
            and self.prices.fallback is None
            and self.prices.price_for(x.model) is None
        ):
            # An unpriced model is free, and a budget that never binds is worse than none.
            raise errors.access_denied(
                f"Model {x.model!r} has no price, and a budget applies to this request: "
                f"price it in the proxy's settings (prices / prices_file), or set "
                f"unpriced_model_price"
            )
        if (
            (op.name in REQUEST_PRICED or op.service.name == AGENTCORE)
            and op.name not in self.request_prices
            and not self._priced_by_query(x)
        ):
            # Agents, flows and knowledge-base generation bill models AWS does not name in
            # the response (an agent's tokens show only in its trace): unpriced, they
            # would be free under a budget.
            raise errors.access_denied(
                f"{op.name}{_named_model(x)} has no price, and a budget applies to "
                f"this request: set request_prices.{op.name} in the proxy's settings"
                + (
                    " or price the model in a prices_file's rerank section"
                    if x.meter and x.meter.reads_request
                    else ""
                )
            )

    def _cached_applying(self, x: Exchange) -> _Applying | None:
        """The limits of a key's request as worked out for its last one, while neither the
        key's record nor the named limits have changed and the request names no limit:
        admission is on every request's path, and the answer rarely changes."""
        identity = x.identity
        record = identity.record if identity is not None else None
        if "limit_ids" in x.annotations:
            return None
        if record is None:
            return _NO_LIMITS
        named = self._named
        if named is None:
            return None
        now = self._clock.monotonic()
        if named[0] <= now:  # past half the ttl
            if named[1] <= now:
                return None
            if self._named_reading is None:
                self._read_named_soon()  # re-read behind the requests: none waits for it
        cached = self._applying_by_key.get(record.key_id)
        if cached is None or cached[0] is not record or cached[1] is not named[2]:
            return None
        return cached[2]

    async def _applying(self, x: Exchange) -> _Applying:
        specs = await self._specs(x)
        applying = _Applying(
            specs,
            budget=any(spec.max_budget is not None for spec in specs),
            tpm=any(spec.tpm is not None for spec in specs),
        )
        record = x.identity.record if x.identity is not None else None
        if record is not None and self._named is not None and "limit_ids" not in x.annotations:
            if len(self._applying_by_key) > 100_000:
                self._applying_by_key.clear()
            self._applying_by_key[record.key_id] = (record, self._named[2], applying)
        return applying

    async def grow(self, x: Exchange, usage: Usage) -> None:
        """A session's usage so far, against its limits and reserved as it grows: a
        budget refuses to go on once spent + the other requests' reservations (other
        sessions' grown ones included) + this cost would pass it, so parallel sessions
        cannot each spend what is left. A budget is overspent by at most one usage event
        per open session."""
        admission = x.admission
        if admission is None or not x.model:
            return
        cost = self.prices.cost(x.model, usage, succeeded=True)
        if not cost:
            return
        try:
            await self.limiter.grow(admission, cost)
        except errors.AwsError as exc:
            x.refusal = exc.reason
            raise

    def _priced_by_query(self, x: Exchange) -> bool:
        """Rerank: billed per query, counted from the request, for a model with a price."""
        usage = x.meter.usage if x.meter is not None else None
        return bool(usage and usage.queries and self.prices.query_price(usage.model))

    def _query_cost(self, x: Exchange) -> float:
        assert x.meter is not None
        usage = x.meter.usage
        return usage.queries * (self.prices.query_price(usage.model) or 0.0) / 1000

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
        """Every limit that applies: the key's own, its user's and team's, every named
        limit it is a member of, and the named limits the request names (which it must be
        a member of, unless it is the master key)."""
        specs: list[LimitSpec] = []
        record = x.identity.record if x.identity is not None else None
        named_ids = x.annotations.get("limit_ids", ())
        if record is None and not named_ids:
            return specs
        limits = await self._named_limits()
        applying: list[str] = []
        if record is not None:
            key_spec = self._key_limit(record)
            if key_spec is not None:
                specs.append(key_spec)
            applying = limits.member_of(record)
        for limit_id in named_ids:
            if limit_id in applying:
                continue
            if record is not None:
                raise errors.access_denied(
                    f"The API key is not a member of limit {limit_id!r}: a limit applies "
                    f"to the keys, users and teams it lists"
                )
            if limit_id in limits.specs:  # the master key may charge any limit
                applying.append(limit_id)
        specs += [s for s in (limits.specs[i] for i in applying) if s is not None]
        return specs

    def _key_limit(self, record: KeyRecord) -> LimitSpec | None:
        cached = self._key_limits.get(record.key_id)
        if cached is not None and cached[0] is record:
            return cached[1]
        fields = {name: getattr(record.spec, name) for name in LIMIT_FIELDS}
        spec = limit_spec("key", record.key_id, fields, record.created_at)
        if len(self._key_limits) > 100_000:
            self._key_limits.clear()
        self._key_limits[record.key_id] = (record, spec)
        return spec

    async def _named_limits(self) -> NamedLimits:
        """All named limits, re-read at most every ``limits_ttl`` (a replica sees another's
        change within that time, this one's at once through ``forget_limit``). While the
        store is down, or a re-read is slow, they are used as last read."""
        now = self._clock.monotonic()
        named = self._named
        if named is not None and named[1] > now:
            if named[0] <= now and self._named_reading is None:
                self._read_named_soon()
            return named[2]
        reading = self._named_reading
        task = reading[0] if reading is not None else self._read_named_soon()
        if named is None:
            return await asyncio.shield(task)  # never read: its StoreUnavailable is a 503
        if not self._store.health.up:
            return named[2]  # as last read, rather than after the store's deadline
        assert self._named_reading is not None
        grace = SLOW_READ - (now - self._named_reading[1])
        if grace <= 0:  # a read this slow: the store is in trouble
            return named[2]
        try:  # another replica's change is seen as soon as the store answers
            return await asyncio.wait_for(asyncio.shield(task), grace)
        except (TimeoutError, StoreUnavailable):
            return named[2]

    def _read_named_soon(self) -> asyncio.Task[NamedLimits]:
        task = asyncio.ensure_future(self._read_named())
        self._named_reading = (task, self._clock.monotonic())
        task.add_done_callback(self._named_read)
        return task

    def _named_read(self, task: asyncio.Task[NamedLimits]) -> None:
        if self._named_reading is not None and self._named_reading[0] is task:
            self._named_reading = None
        if not task.cancelled():
            task.exception()  # read here: a re-read behind requests has no one awaiting it

    async def _read_named(self) -> NamedLimits:
        generation = self._named_generation
        try:
            limits = NamedLimits(await self._store.limits.list(), await self._directory())
        except StoreUnavailable:
            named = self._named
            if named is not None:  # as last read, a second more before the next try
                until = self._clock.monotonic() + min(1.0, self._limits_ttl)
                self._named = (until, until, named[2])
            raise
        if generation == self._named_generation:  # not changed here meanwhile
            now = self._clock.monotonic()
            ttl = self._limits_ttl
            self._named = (now + ttl / 2, now + ttl, limits)
        return limits

    async def user_cap(self, user_id: str, team_id: str | None = None) -> dict[str, Any] | None:
        """A user's spend cap as they see it: the budget, its period, what they spent in
        it and when it resets (None: no cap applies)."""
        spec = (await self._named_limits()).user_cap(user_id, team_id)
        if spec is None or spec.max_budget is None:
            return None
        now = self._clock.time()
        _, start, end = spec.period(now)
        spent = await self._store.spend.since("user", user_id, start)
        return {
            "max_budget": spec.max_budget,
            "budget_seconds": spec.budget_seconds,
            "spent": spent,
            "resets_at": None if end == float("inf") else end,
        }

    async def _directory(self) -> Directory:
        """Teams' limits and users' caps (read with the named limits, and as often)."""
        store = self._store.directory
        members: dict[str, list[str]] = {}
        for row in await store.memberships():
            members.setdefault(row["user_id"], []).append(row["team_id"])
        return Directory(
            {t["team_id"]: t for t in await store.teams()},
            {u["user_id"]: u for u in await store.users()},
            members,
            self.user_cap_default,
        )

    def forget_limit(self, limit_id: str) -> None:
        self._named = None
        self._named_reading = None  # a read begun before the change is not joined
        self._named_generation += 1

    # ---------------------------------------------------------------- completion

    def finish_usage(self, x: Exchange) -> Usage | None:
        """The exchange's usage, read from its meter once the response has ended."""
        if x.usage is None and x.meter is not None:
            usage = x.meter.finish()
            if x.incomplete and isinstance(x.meter, EventStreamMeter):
                # Cut before its usage frame (by the client, the upstream or a timeout):
                # what passed is charged, or reading the deltas and hanging up is free.
                x.meter.estimate(x.bytes_in)
            elif isinstance(x.meter, CompatMeter) and (x.incomplete or x.meter.unreported):
                # The same for a server-sent event stream, and for a chat stream whose
                # client did not ask for its usage: never free.
                x.meter.estimate(x.bytes_in)
            x.usage = usage
        return x.usage

    def price(self, x: Exchange) -> float | None:
        usage = self.finish_usage(x)
        if usage is None:
            return None
        succeeded = 200 <= x.status < 300
        if x.model is None and usage.model is not None:
            x.model = usage.model  # an agent's model, from its trace
        per_request = self.request_prices.get(x.operation.name) if x.operation else None
        unpriced_queries = bool(usage.queries) and self.prices.query_price(x.model) is None
        if per_request is not None and (not usage.found or unpriced_queries):
            x.cost = per_request if succeeded else 0.0
        else:
            x.cost = self.prices.cost(x.model, usage, succeeded=succeeded)
        return x.cost

    def completed(self, x: Exchange) -> None:
        """Charge the limits and queue the ledger row; never blocks the response."""
        if x.identity is None or x.operation is None:
            return
        latency_ms = x.latency_ms
        usage = self.finish_usage(x) or Usage()
        cost = x.cost if x.usage is not None and x.cost is not None else self.price(x)
        admission = x.admission
        if admission is not None:
            if isinstance(self.limiter, InProcessLimiter):
                totals = self.limiter.settle_now(admission, usage.total_tokens, cost)
                if totals and cost and self.alerts is not None:
                    self._spawn(self._alert(totals, cost))
            else:
                self._spawn(self._settle(admission, usage.total_tokens, cost))
        self.ledger.record(*self._row(x, usage, cost, latency_ms))

    async def charge_job(self, job: dict[str, Any], usage: Usage) -> None:
        """A batch job's tokens, once it ended: one ledger row under the job's ARN, and its
        cost against every limit of its key (see ``batches``)."""
        record = await self._store.keys.by("key_id", job["key_id"])
        x = Exchange(job["job_arn"], "POST", time.perf_counter(), operation=BATCH_JOB)
        x.model, x.status, x.usage = job.get("model"), 200, usage
        x.region = job.get("region")
        found = self.prices.price_for(x.model) if x.model else None
        price = found or ((self.prices.fallback, 1.0) if self.prices.fallback else None)
        x.cost = tokens_cost(price[0], usage, price[1]) * self.batch_discount if price else None
        if record is not None:
            x.identity = Identity(
                "virtual", key_id=record.key_id, alias=record.spec.key_alias, record=record
            )
            specs = await self._specs(x)
            if specs and x.cost:
                await self.limiter.settle(Admission(x.request_id, specs, 0.0), 0, x.cost)
        self.ledger.record(*self._row(x, usage, x.cost, 0.0))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settle(self, admission: Admission, tokens: int, cost: float | None) -> None:
        try:
            totals = await self.limiter.settle(admission, tokens, cost)
            if self.alerts is not None and cost:
                await self._alert(totals, cost)
        except Exception as exc:  # the ledger still has the row; counters re-sync per period
            log.error(
                "could not settle limits for %s: %s", admission.request_id, type(exc).__name__
            )

    async def _alert(self, totals: list[tuple[LimitSpec, float]], cost: float) -> None:
        assert self.alerts is not None
        for spec, after in totals:
            await self.alerts.spent(spec, after - cost, after)

    def _row(
        self, x: Exchange, usage: Usage, cost: float | None, latency_ms: float
    ) -> tuple[SpendRow, list[LabelRow]]:
        identity = x.identity
        record = identity.record if identity is not None else None
        spec = record.spec if record is not None else None
        now = self._clock.time()
        annotations = x.annotations
        op = x.operation
        row = SpendRow(
            x.request_id,
            now,
            _utc_day(now),
            identity.key_id if identity is not None else None,
            spec.key_alias if spec else None,
            spec.user_id if spec else None,
            spec.team_id if spec else None,
            annotations.get("end_user_id"),
            op.name if op else "",
            op.service.name if op else "",
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
            1 if usage.estimated else 0,
            x.model_ref,
            x.account or self._account,
            x.region,
        )
        labels = (
            [
                LabelRow(x.request_id, "tag", tag, now, cost, usage.total_tokens)
                for tag in annotations.get("tags", ())
            ]
            + [
                LabelRow(x.request_id, "limit", limit_id, now, cost, usage.total_tokens)
                for limit_id in annotations.get("limit_ids", ())
            ]
            if annotations
            else []
        )
        return row, labels

    async def drain(self) -> None:
        """Wait for every settlement in flight, then write the ledger's queue: what a
        finished request charged is then visible to the limits and in the store."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.ledger.flush()

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.ledger.close()
        if self.alerts is not None:
            await self.alerts.close()
        await self.limiter.close()


_day_cache: tuple[int, str] = (-1, "")


def _named_model(x: Exchange) -> str:
    model = x.meter.usage.model if x.meter is not None else None
    return f" with model {model!r}" if model else ""


def _utc_day(ts: float) -> str:
    """The UTC date of ``ts``; formatted once per day, not once per request."""
    global _day_cache
    day = int(ts // 86400)
    if _day_cache[0] != day:
        _day_cache = (day, datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d"))
    return _day_cache[1]
