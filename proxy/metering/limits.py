"""Admission: requests per minute, tokens per minute, parallel requests and budgets.

Every limit that applies to a request (its key's, its user's, its team's, named limits it
references) is checked and taken in one step: all or nothing. With Redis that step is one
Lua script, so replicas sharing Redis enforce one global limit; without Redis it runs
in-process (a single event loop needs no lock).

Windows are fixed calendar minutes. Tokens and cost are only known when a response ends, so
admission reserves an estimate and ``settle`` replaces it with the actual figure. A budget
admits requests while spent + reserved < budget, so the overshoot is bounded: at most, for
every request admitted concurrently, what it costs beyond its estimate. Tokens per minute
work the same way: a request's estimated tokens (its input, guessed from the body size,
plus ``reserve_output_tokens``) count against the minute from admission on, and settling
replaces them with the real count. A burst of concurrent requests cannot all pass on an
empty minute: once the reservations reach the limit the rest are refused, and the minute
can end over its limit by at most what the requests in flight use beyond their estimates.

In-flight requests are kept as leases (request id, start time, reserve); a lease older than
``lease_seconds`` is dropped, so a replica that dies mid-request cannot hold a slot forever.
In Redis the lease is short (30 s) and renewed by its replica while the request runs, and a
settlement that Redis missed is kept and applied when it returns (``RedisLimiter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import orjson

from ..wire import errors
from ..wire.background import stop as stop_task
from ..wire.clock import SYSTEM_CLOCK, Clock, iso

log = logging.getLogger("bedrock_proxy.limits")

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class LimitSpec:
    scope: str  # "key", "user", "team" or "limit"
    id: str
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    max_budget: float | None = None
    budget_seconds: int | None = None
    # Budget periods start at anchor + k * budget_seconds (the key's or limit's creation).
    anchor: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.scope} {self.id}"

    def period_index(self, now: float) -> int:
        """Which budget period ``now`` is in (0 for a budget without a duration)."""
        seconds = self.budget_seconds
        return int((now - self.anchor) // seconds) if seconds else 0

    def period(self, now: float) -> tuple[int, float, float]:
        """(index, start, end) of the budget period containing now."""
        if not self.budget_seconds:
            return 0, self.anchor, math.inf
        index = self.period_index(now)
        start = self.anchor + index * self.budget_seconds
        return index, start, start + self.budget_seconds


@dataclass(slots=True)
class Admission:
    request_id: str
    specs: list[LimitSpec]
    reserve: float
    # Tokens reserved against the minute of admission (specs with a TPM limit only).
    tokens: int = 0
    minute: int = 0
    # In-process: each spec with the window taken from (settling needs no lookup).
    # Windows are never replaced, so holding them is holding the live counters.
    pairs: list[tuple[LimitSpec, _Window]] | None = field(default=None, compare=False, repr=False)
    # Admitted by this replica's own counters while Redis was away (settled there too).
    local: bool = field(default=False, compare=False)


class _Leases:
    """One limit's requests in flight, oldest first, with their reserves summed as they
    come and go (the sum and the stale sweep were a scan of every lease per admission)."""

    __slots__ = ("held", "reserved")

    def __init__(self) -> None:
        self.held: dict[str, tuple[float, float]] = {}  # request id -> (started, reserve)
        self.reserved = 0.0

    def add(self, request_id: str, started: float, reserve: float) -> None:
        self.held[request_id] = (started, reserve)
        self.reserved += reserve

    def release(self, request_id: str) -> None:
        found = self.held.pop(request_id, None)
        if found is not None:
            self.reserved -= found[1]
        if not self.held:
            self.reserved = 0.0  # no float drift across an idle moment

    def grow(self, request_id: str, reserve: float) -> None:
        found = self.held.get(request_id)
        if found is not None:
            self.held[request_id] = (found[0], reserve)
            self.reserved += reserve - found[1]

    def expire(self, before: float) -> None:
        """Drop leases started before ``before``: a request whose end was never seen."""
        held = self.held
        while held:
            request_id, (started, _) = next(iter(held.items()))
            if started >= before:
                return
            self.release(request_id)


class BudgetSource:
    """Where a budget's spend so far comes from when a counter starts: the ledger."""

    async def spent(self, spec: LimitSpec, since: float) -> float:  # pragma: no cover
        raise NotImplementedError


def _minute(now: float) -> int:
    return int(now // 60)


def _retry_after_minute(now: float) -> float:
    return 60 - (now % 60)


def usd(amount: float) -> str:
    """Money as people read it, with the digits a small amount needs to be non-zero:
    $4.00, $1,234.50, $0.00055 (a budget of $0.0005 is not "$0.00")."""
    if amount == 0 or abs(amount) >= 0.01:
        return f"${amount:,.2f}"
    digits = 1 - math.floor(math.log10(abs(amount)))  # two significant digits
    return f"${amount:.{digits}f}"


def _budget_refusal(spec: LimitSpec, spent: float, now: float) -> errors.AwsError:
    _, _, end = spec.period(now)
    resets = (
        "it never resets (no budget_duration)" if math.isinf(end) else f"it resets at {iso(end)}"
    )
    assert spec.max_budget is not None
    return errors.AwsError(
        400,
        "ServiceQuotaExceededException",
        f"Budget exceeded for {spec.name}: spent {usd(spent)} of {usd(spec.max_budget)}; " + resets,
        reason="budget",
    )


def _rate_refusal(spec: LimitSpec, what: str, retry_after: float) -> errors.AwsError:
    reason = what.split(" ", 1)[1].split()[0]  # "requests", "tokens" or "requests in parallel"
    kind = "parallel" if "parallel" in what else ("tpm" if reason == "tokens" else "rpm")
    return errors.throttled(f"Rate limit exceeded for {spec.name}: {what}", retry_after, kind)


class _Window:
    """One limit's state in this process: its current minute's counts, its requests in
    flight, and its budget period's spend. One lookup per limit and request; the counts
    of a minute that has passed are never read again, so they are simply replaced."""

    __slots__ = ("leases", "minute", "period", "requests", "spent", "tokens")

    def __init__(self) -> None:
        self.minute = -1
        self.requests = 0
        self.tokens = 0
        self.leases = _Leases()
        self.period: int | None = None  # the budget period ``spent`` belongs to
        self.spent = 0.0

    def at(self, minute: int) -> _Window:
        if minute != self.minute:
            self.minute, self.requests, self.tokens = minute, 0, 0
        return self


class InProcessLimiter:
    def __init__(
        self, budgets: BudgetSource, lease_seconds: float = 3600.0, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._clock = clock
        self._budgets = budgets
        self._lease = lease_seconds
        self._windows: dict[tuple[str, str], _Window] = {}
        self._pairs_by_list: dict[int, tuple[list[LimitSpec], list[tuple[LimitSpec, _Window]]]] = {}
        self._claims: dict[str, float] = {}

    async def current(self, scope: str, ident: str) -> dict[str, int]:
        """This minute's requests and tokens, and the requests in flight (the console)."""
        window = self._windows.get((scope, ident))
        if window is None:
            return {"requests": 0, "tokens": 0, "in_flight": 0}
        fresh = window.minute == _minute(self._clock.time())
        return {
            "requests": window.requests if fresh else 0,
            "tokens": window.tokens if fresh else 0,
            "in_flight": len(window.leases.held),
        }

    def _window(self, spec: LimitSpec) -> _Window:
        ident = (spec.scope, spec.id)
        window = self._windows.get(ident)
        if window is None:
            window = self._windows[ident] = _Window()
        return window

    def _pairs(self, specs: list[LimitSpec]) -> list[tuple[LimitSpec, _Window]]:
        """Each spec with its window. Metering hands in the same list for every request
        of a key (see ``Metering._cached_applying``), so the pairs are kept per list."""
        cached = self._pairs_by_list.get(id(specs))
        if cached is not None and cached[0] is specs:  # held here, so its id is not reused
            return cached[1]
        pairs = [(spec, self._window(spec)) for spec in specs]
        if len(self._pairs_by_list) >= 16_384:
            self._pairs_by_list.clear()
        self._pairs_by_list[id(specs)] = (specs, pairs)
        return pairs

    async def admit(
        self, specs: list[LimitSpec], request_id: str, reserve: float, tokens: int = 0
    ) -> Admission:
        now = self._clock.time()
        pairs = self._pairs(specs)
        for spec, window in pairs:
            if spec.max_budget is not None:  # the ledger first, before any check
                index, start, _ = spec.period(now)
                if window.period != index:
                    spent = await self._budgets.spent(spec, start)
                    if window.period != index:  # a settle may have landed meanwhile
                        window.period, window.spent = index, spent
        admission = self._take(specs, pairs, now, request_id, reserve, tokens)
        assert admission is not None  # every budget's period was loaded just now
        return admission

    def admit_now(
        self, specs: list[LimitSpec], request_id: str, reserve: float, tokens: int = 0
    ) -> Admission | None:
        """``admit`` without a coroutine, or None when a budget's spend must first be read
        from the ledger (a period this process has not seen): the common case is settled
        by counters in memory, and a coroutine per request is measurable on that path."""
        return self._take(
            specs, self._pairs(specs), self._clock.time(), request_id, reserve, tokens
        )

    def _take(
        self,
        specs: list[LimitSpec],
        pairs: list[tuple[LimitSpec, _Window]],
        now: float,
        request_id: str,
        reserve: float,
        tokens: int,
    ) -> Admission | None:
        """Check every limit, then take from every one: all or nothing. None when a
        budget's period has not been loaded from the ledger."""
        minute = int(now // 60)
        for spec, window in pairs:
            if window.minute != minute:
                window.minute, window.requests, window.tokens = minute, 0, 0
            if spec.rpm is not None and window.requests >= spec.rpm:
                raise _rate_refusal(
                    spec, f"{spec.rpm} requests per minute", _retry_after_minute(now)
                )
            if spec.tpm is not None and window.tokens >= spec.tpm:
                raise _rate_refusal(spec, f"{spec.tpm} tokens per minute", _retry_after_minute(now))
            leases = window.leases
            if leases.held:
                leases.expire(now - self._lease)
            if spec.max_parallel is not None and len(leases.held) >= spec.max_parallel:
                raise _rate_refusal(spec, f"{spec.max_parallel} requests in parallel", 1)
            if spec.max_budget is not None:
                if window.period != spec.period_index(now):
                    return None
                if window.spent + leases.reserved >= spec.max_budget:
                    raise _budget_refusal(spec, window.spent, now)
        for spec, window in pairs:
            if spec.rpm is not None:
                window.requests += 1
            if spec.tpm is not None:
                window.tokens += tokens
            if spec.max_parallel is not None or spec.max_budget is not None:
                window.leases.add(request_id, now, reserve)
        return Admission(request_id, specs, reserve, tokens, minute, pairs)

    async def settle(
        self, admission: Admission, tokens: int, cost: float | None
    ) -> list[tuple[LimitSpec, float]]:
        return self.settle_now(admission, tokens, cost)

    async def grow(self, admission: Admission, cost: float) -> None:
        """A long request's cost so far (a session's usage events), against its limits:
        refused once spent + the other requests' reservations + this cost would pass a
        budget, and reserved (when it passes the estimate reserved at admission), so
        parallel sessions see each other's cost as it grows."""
        now = self._clock.time()
        pairs = admission.pairs or self._pairs(admission.specs)
        extra = cost - admission.reserve  # (negative while within the estimate)
        reserve = max(admission.reserve, cost)
        for spec, window in pairs:
            if (
                spec.max_budget is not None
                and window.period == spec.period_index(now)
                and window.spent + window.leases.reserved + extra > spec.max_budget
            ):
                raise _budget_refusal(spec, window.spent, now)
        for spec, window in pairs:
            if spec.max_parallel is not None or spec.max_budget is not None:
                window.leases.grow(admission.request_id, reserve)
        admission.reserve = reserve

    def settle_now(
        self, admission: Admission, tokens: int, cost: float | None
    ) -> list[tuple[LimitSpec, float]]:
        """Release the reservation, charge the real figures; each budget's spend after.
        In-process there is nothing to wait for: settling at once saves a task per request."""
        now = self._clock.time()
        totals: list[tuple[LimitSpec, float]] = []
        pairs = admission.pairs or self._pairs(admission.specs)
        for spec, window in pairs:
            window.leases.release(admission.request_id)
            if spec.tpm is not None:
                # The reservation made at admission becomes the real count (in the minute
                # of admission while it lasts; a later minute gets the real count alone).
                minute = int(now // 60)
                window.at(minute)
                window.tokens += tokens - admission.tokens if minute == admission.minute else tokens
            if spec.max_budget is not None and cost:
                index = spec.period_index(now)
                if window.period != index:  # a new period: its spend starts here
                    window.period, window.spent = index, 0.0
                window.spent += cost
                totals.append((spec, window.spent))
        return totals

    async def claim_once(self, name: str, ttl: float) -> bool:
        """True the first time ``name`` is claimed (within ``ttl``): alerts fire once."""
        now = self._clock.time()
        if len(self._claims) > 10_000:
            self._claims = {k: v for k, v in self._claims.items() if v > now}
        if self._claims.get(name, 0.0) > now:
            return False
        self._claims[name] = now + ttl
        return True

    async def close(self) -> None:
        pass


# KEYS: none (key names are built in the script from the spec prefix).
# ARGV[1]: JSON list of specs; ARGV[2]: now; ARGV[3]: request id; ARGV[4]: reserve;
# ARGV[5]: tokens reserved against TPM limits.
_ADMIT = """
local specs = cjson.decode(ARGV[1])
local now = tonumber(ARGV[2])
local rid = ARGV[3]
local minute = math.floor(now / 60)
for i, s in ipairs(specs) do
  local base = s.prefix
  if s.rpm then
    local n = tonumber(redis.call('GET', base .. ':rpm:' .. minute) or '0')
    if n >= s.rpm then return {'rpm', i, tostring(n)} end
  end
  if s.tpm then
    local n = tonumber(redis.call('GET', base .. ':tpm:' .. minute) or '0')
    if n >= s.tpm then return {'tpm', i, tostring(n)} end
  end
  if s.par or s.budget then
    redis.call('ZREMRANGEBYSCORE', base .. ':inflight', '-inf', now - s.lease)
  end
  if s.par then
    if redis.call('ZCARD', base .. ':inflight') >= s.par then return {'par', i, '0'} end
  end
  if s.budget then
    local spent = redis.call('GET', base .. ':spent:' .. s.period)
    if not spent then return {'init', i, '0'} end
    local reserved = 0
    for _, member in ipairs(redis.call('ZRANGE', base .. ':inflight', 0, -1)) do
      local sep = string.find(member, '|', 1, true)
      reserved = reserved + tonumber(string.sub(member, sep + 1))
    end
    if tonumber(spent) + reserved >= s.budget then return {'budget', i, spent} end
  end
end
for i, s in ipairs(specs) do
  local base = s.prefix
  if s.rpm then
    redis.call('INCR', base .. ':rpm:' .. minute)
    redis.call('EXPIRE', base .. ':rpm:' .. minute, 120)
  end
  if s.tpm and tonumber(ARGV[5]) > 0 then
    redis.call('INCRBY', base .. ':tpm:' .. minute, tonumber(ARGV[5]))
    redis.call('EXPIRE', base .. ':tpm:' .. minute, 120)
  end
  if s.par or s.budget then
    redis.call('ZADD', base .. ':inflight', now, rid .. '|' .. ARGV[4])
    redis.call('EXPIRE', base .. ':inflight', s.lease)
  end
end
return {'ok', 0, '0'}
"""

# ARGV[1]: JSON specs; ARGV[2]: now; ARGV[3]: request id; ARGV[4]: reserve;
# ARGV[5]: tokens; ARGV[6]: cost; ARGV[7]: tokens reserved; ARGV[8]: minute of admission;
# ARGV[9]: "settle", "retry" (a settlement that failed before, which may have landed) or
# "release" (an admission whose answer was lost: its slots only).
_SETTLE = """
local specs = cjson.decode(ARGV[1])
local now = tonumber(ARGV[2])
local member = ARGV[3] .. '|' .. ARGV[4]
local tokens = tonumber(ARGV[5])
local cost = tonumber(ARGV[6])
local minute = math.floor(now / 60)
local mode = ARGV[9]
local spent = {}
for _, s in ipairs(specs) do
  local base = s.prefix
  local held = 1
  if s.par or s.budget then held = redis.call('ZREM', base .. ':inflight', member) end
  if s.tpm and mode ~= 'release' then
    local delta = tokens
    if minute == tonumber(ARGV[8]) then delta = tokens - tonumber(ARGV[7]) end
    if delta ~= 0 then
      redis.call('INCRBY', base .. ':tpm:' .. minute, delta)
      redis.call('EXPIRE', base .. ':tpm:' .. minute, 120)
    end
  end
  if s.budget and cost > 0 and mode ~= 'release' then
    if held == 1 or mode == 'settle' then
      spent[#spent + 1] = redis.call('INCRBYFLOAT', base .. ':spent:' .. s.period, cost)
    else
      -- A retry whose request is no longer held: it was charged by the attempt whose
      -- answer was lost, or its lease lapsed. The counter starts again from the ledger.
      redis.call('DEL', base .. ':spent:' .. s.period)
      spent[#spent + 1] = ''
    end
  else
    spent[#spent + 1] = ''
  end
end
return spent
"""

# A request's cost so far against its budgets (ARGV[5]: the cost less its reservation),
# then its reservation grown (ARGV[3]: old member, ARGV[4]: new member).
_GROW = """
local specs = cjson.decode(ARGV[1])
local now = tonumber(ARGV[2])
local extra = tonumber(ARGV[5])
for i, s in ipairs(specs) do
  if s.budget then
    local base = s.prefix
    local spent = redis.call('GET', base .. ':spent:' .. s.period)
    if spent then
      local reserved = 0
      for _, member in ipairs(redis.call('ZRANGE', base .. ':inflight', 0, -1)) do
        local sep = string.find(member, '|', 1, true)
        reserved = reserved + tonumber(string.sub(member, sep + 1))
      end
      if tonumber(spent) + reserved + extra > s.budget then return {'budget', i, spent} end
    end
  end
end
for _, s in ipairs(specs) do
  if (s.par or s.budget) and ARGV[3] ~= ARGV[4] then
    local key = s.prefix .. ':inflight'
    if redis.call('ZREM', key, ARGV[3]) == 1 then redis.call('ZADD', key, now, ARGV[4]) end
  end
end
return {'ok', 0, '0'}
"""

# Push the leases of requests still running forward to ARGV[1] (members that are no
# longer there, settled meanwhile, are not added back). KEYS: in-flight sets; ARGV[2..]:
# for each key, its member.
_RENEW = """
local now = ARGV[1]
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now, ARGV[i + 1])
end
return #KEYS
"""

# Start a budget counter from the ledger, unless another replica already has.
_INIT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
return 0
"""

# After a failed call, Redis is not tried again for this long: during an outage requests
# are answered at once (refused, or counted locally), not each after a deadline.
_RETRY_AFTER_FAILURE = 0.5
# How often settlements that failed are tried again while Redis is away, and how many
# are kept at most.
_RESETTLE_EVERY = 0.25
_MAX_UNSETTLED = 100_000


class RedisUnavailable(Exception):
    """Redis did not answer within the deadline, or refused."""


class RedisLimiter:
    """The same admission, atomic in Redis, shared by every replica.

    Redis can go away while requests run. A request's parallel slot and budget reservation
    are a lease that this replica renews while the request runs (every third of
    ``lease_seconds``), so a dead replica's slots lapse within a lease. A settlement that
    fails is kept and tried again as soon as Redis answers (before the next admission),
    so a blip does not leave keys holding the slots of requests that have ended. While
    Redis is unreachable, admissions are refused with a 503 (``on_outage="refuse"``) or
    counted by this replica alone (``"local"``).
    """

    def __init__(
        self,
        url: str,
        budgets: BudgetSource,
        lease_seconds: float = 30.0,
        prefix: str = "bp",
        clock: Clock = SYSTEM_CLOCK,
        timeout: float = 2.0,
        on_outage: str = "refuse",
    ) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._clock = clock
        # One quiet retry: a pooled connection found dead after a restart.
        self._redis = redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._timeout = timeout
        self._budgets = budgets
        self._lease = lease_seconds
        self._prefix = prefix
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._renew = self._redis.register_script(_RENEW)
        self._grow = self._redis.register_script(_GROW)
        self._init = self._redis.register_script(_INIT)
        self._local = InProcessLimiter(budgets, clock=clock) if on_outage == "local" else None
        # Admissions holding slots in Redis, whose leases this replica renews.
        self._held: dict[str, Admission] = {}
        # Settlements (admission, tokens, cost, mode) that failed, to try again: the
        # requests in flight when Redis went away, and admissions whose answer was lost
        # (while it is away, new ones are refused or counted locally), so few; bounded all
        # the same (past the bound the oldest is dropped, and its lease lapses).
        self._unsettled: deque[tuple[Admission, int, float | None, str]] = deque(
            maxlen=_MAX_UNSETTLED
        )
        self._down_until = 0.0  # monotonic: Redis is not tried before then
        self._down_since: float | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self._down_since is None

    @property
    def unsettled(self) -> int:
        return len(self._unsettled)

    async def _call(self, work: Awaitable[_T]) -> _T:
        """One Redis call within the deadline; its failure as ``RedisUnavailable``."""
        try:
            async with asyncio.timeout(self._timeout):
                result = await work
        except Exception as exc:
            self._failed(exc)
            raise RedisUnavailable(type(exc).__name__) from None
        if self._down_since is not None:
            log.warning("Redis available again after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None
        self._down_until = 0.0
        return result

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._down_until = now + _RETRY_AFTER_FAILURE
        if self._down_since is None:
            self._down_since = now
            what = "no answer within the deadline" if isinstance(exc, TimeoutError) else exc
            log.warning(
                "Redis unavailable (%s: %s): limited keys are %s until it answers",
                type(exc).__name__,
                what,
                "counted by each replica alone" if self._local else "refused with 503",
            )

    async def current(self, scope: str, ident: str) -> dict[str, int]:
        """This minute's requests and tokens, and the requests in flight, across replicas."""
        base = f"{self._prefix}:{scope}:{ident}"
        minute = _minute(self._clock.time())
        try:
            requests, tokens = await self._call(
                self._redis.mget(f"{base}:rpm:{minute}", f"{base}:tpm:{minute}")
            )
            in_flight = await self._call(self._redis.zcard(f"{base}:inflight"))
        except RedisUnavailable:
            return {"requests": 0, "tokens": 0, "in_flight": 0}
        return {
            "requests": int(requests or 0),
            "tokens": int(tokens or 0),
            "in_flight": int(in_flight or 0),
        }

    def _payload(self, specs: list[LimitSpec], now: float) -> str:
        out = []
        for spec in specs:
            item: dict[str, object] = {
                "prefix": f"{self._prefix}:{spec.scope}:{spec.id}",
                "lease": int(self._lease),
            }
            if spec.rpm is not None:
                item["rpm"] = spec.rpm
            if spec.tpm is not None:
                item["tpm"] = spec.tpm
            if spec.max_parallel is not None:
                item["par"] = spec.max_parallel
            if spec.max_budget is not None:
                item["budget"] = spec.max_budget
                item["period"] = spec.period(now)[0]
            out.append(item)
        return orjson.dumps(out).decode()

    async def admit(
        self, specs: list[LimitSpec], request_id: str, reserve: float, tokens: int = 0
    ) -> Admission:
        if self._down_until:  # Redis failed lately
            now = time.monotonic()
            if self._down_until > now:
                return await self._in_outage(specs, request_id, reserve, tokens)
            # This request finds out whether it is back; the others meanwhile do not wait.
            self._down_until = now + self._timeout
        try:
            if self._unsettled:  # Redis is back: free what ended while it was away first
                await self._resettle()
            admission = await self._admit_once(specs, request_id, reserve, tokens, retries=3)
        except RedisUnavailable:
            # The script may have run before the answer was lost: give its slots back.
            self._unsettled.append((Admission(request_id, specs, reserve), 0, None, "release"))
            self._start()
            return await self._in_outage(specs, request_id, reserve, tokens)
        if any(s.max_parallel is not None or s.max_budget is not None for s in specs):
            self._held[request_id] = admission
            self._start()
        return admission

    async def _in_outage(
        self, specs: list[LimitSpec], request_id: str, reserve: float, tokens: int
    ) -> Admission:
        if self._local is None:
            raise errors.service_unavailable("The rate-limit store is unavailable", retry_after=1)
        admission = await self._local.admit(specs, request_id, reserve, tokens)
        admission.local = True
        return admission

    async def _admit_once(
        self, specs: list[LimitSpec], request_id: str, reserve: float, tokens: int, retries: int
    ) -> Admission:
        now = self._clock.time()
        verdict, index, value = await self._call(
            self._admit(
                args=[self._payload(specs, now), repr(now), request_id, repr(reserve), int(tokens)]
            )
        )
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        if verdict == "ok":
            return Admission(request_id, specs, reserve, tokens, _minute(now))
        spec = specs[int(index) - 1]
        if verdict == "init" and retries:
            index_, start, end = spec.period(now)
            spent = await self._budgets.spent(spec, start)
            ttl = int(min(end - now, 400 * 86400)) + 86400 if not math.isinf(end) else 400 * 86400
            await self._call(
                self._init(
                    keys=[f"{self._prefix}:{spec.scope}:{spec.id}:spent:{index_}"],
                    args=[repr(spent), ttl],
                )
            )
            return await self._admit_once(specs, request_id, reserve, tokens, retries - 1)
        if verdict == "rpm":
            raise _rate_refusal(spec, f"{spec.rpm} requests per minute", _retry_after_minute(now))
        if verdict == "tpm":
            raise _rate_refusal(spec, f"{spec.tpm} tokens per minute", _retry_after_minute(now))
        if verdict == "par":
            raise _rate_refusal(spec, f"{spec.max_parallel} requests in parallel", 1)
        raise _budget_refusal(spec, float(value), now)

    async def settle(
        self, admission: Admission, tokens: int, cost: float | None
    ) -> list[tuple[LimitSpec, float]]:
        if admission.local:
            assert self._local is not None
            return self._local.settle_now(admission, tokens, cost)
        self._held.pop(admission.request_id, None)
        try:
            return await self._settle_once(admission, tokens, cost, "settle")
        except RedisUnavailable:
            self._unsettled.append((admission, tokens, cost, "retry"))
            self._start()
            return []

    async def grow(self, admission: Admission, cost: float) -> None:
        """As ``InProcessLimiter.grow``, across replicas (a Redis failure is a 503)."""
        if admission.local:
            assert self._local is not None
            await self._local.grow(admission, cost)
            return
        now = self._clock.time()
        reserve = max(admission.reserve, cost)
        try:
            verdict, index, value = await self._call(
                self._grow(
                    args=[
                        self._payload(admission.specs, now),
                        repr(now),
                        f"{admission.request_id}|{admission.reserve!r}",
                        f"{admission.request_id}|{reserve!r}",
                        repr(cost - admission.reserve),
                    ]
                )
            )
        except RedisUnavailable:
            raise errors.service_unavailable(
                "The rate-limit store is unavailable", retry_after=1
            ) from None
        if (verdict.decode() if isinstance(verdict, bytes) else verdict) != "ok":
            raise _budget_refusal(admission.specs[int(index) - 1], float(value), now)
        admission.reserve = reserve

    async def _settle_once(
        self, admission: Admission, tokens: int, cost: float | None, mode: str
    ) -> list[tuple[LimitSpec, float]]:
        now = self._clock.time()
        spent = await self._call(
            self._settle(
                args=[
                    self._payload(admission.specs, now),
                    repr(now),
                    admission.request_id,
                    repr(admission.reserve),
                    int(tokens),
                    repr(float(cost or 0.0)),
                    int(admission.tokens),
                    admission.minute,
                    mode,
                ]
            )
        )
        return [
            (spec, float(value))
            for spec, value in zip(admission.specs, spent, strict=True)
            if spec.max_budget is not None and value not in (b"", "")
        ]

    async def _resettle(self) -> None:
        """Try the failed settlements again, oldest first; stop at the first failure."""
        while self._unsettled:
            item = self._unsettled.popleft()  # taken: a concurrent retry takes the next
            try:
                await self._settle_once(*item)
            except RedisUnavailable:
                self._unsettled.appendleft(item)
                raise

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def _maintain(self) -> None:
        """Renew the leases of requests still running, every third of a lease, and try
        failed settlements again every ``_RESETTLE_EVERY`` until they land; ends when
        there is nothing left to do (the next admission or failure starts it again)."""
        renewed = time.monotonic()
        while self._held or self._unsettled:
            await asyncio.sleep(_RESETTLE_EVERY if self._unsettled else self._lease / 3)
            try:
                if self._unsettled and self._down_until <= time.monotonic():
                    await self._resettle()
                if self._held and time.monotonic() - renewed >= self._lease / 3 - 0.01:
                    await self.renew_leases()
                    renewed = time.monotonic()
            except RedisUnavailable:
                continue

    async def renew_leases(self) -> None:
        """Push the leases of this replica's requests in flight forward to now."""
        keys: list[str] = []
        members: list[str] = []
        for admission in self._held.values():
            member = f"{admission.request_id}|{admission.reserve!r}"
            for spec in admission.specs:
                if spec.max_parallel is not None or spec.max_budget is not None:
                    keys.append(f"{self._prefix}:{spec.scope}:{spec.id}:inflight")
                    members.append(member)
        for at in range(0, len(keys), 1000):  # bounded script arguments
            await self._call(
                self._renew(
                    keys=keys[at : at + 1000],
                    args=[repr(self._clock.time()), *members[at : at + 1000]],
                )
            )

    async def claim_once(self, name: str, ttl: float) -> bool:
        """True the first time ``name`` is claimed by any replica (within ``ttl``)."""
        return bool(
            await self._call(
                self._redis.set(f"{self._prefix}:claim:{name}", 1, nx=True, ex=int(ttl))
            )
        )

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def close(self) -> None:
        await stop_task(self._task)
        if self._unsettled:
            with contextlib.suppress(RedisUnavailable):
                await self._resettle()
        await self._redis.aclose()
