"""One table of limit cases, run against the in-process limiter and the Redis one.

Both read time from a clock the test moves, so windows and budget periods end when a
case says, with no sleep. The budget source stands in for the ledger (what was spent
before a counter started); Redis is the real server on 127.0.0.1:6379.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from proxy.metering.limits import Admission, BudgetSource, InProcessLimiter, LimitSpec
from proxy.wire import errors

START = 1_800_000_000.0  # a minute boundary: 1_800_000_000 % 60 == 0


class ManualClock:
    def __init__(self, now: float = START + 1) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class Ledger(BudgetSource):
    def __init__(self, before: float = 0.0) -> None:
        self.before = before

    async def spent(self, spec: LimitSpec, since: float) -> float:
        return self.before


@dataclass
class Run:
    """A limiter under test, and the clock it reads."""

    limiter: InProcessLimiter
    clock: ManualClock

    def spec(self, **limits: float) -> LimitSpec:
        return LimitSpec("key", "k-" + secrets.token_hex(4), **limits)  # type: ignore[arg-type]

    async def admit(self, specs: list[LimitSpec], reserve: float = 0.0, tokens: int = 0):
        request_id = "r-" + secrets.token_hex(6)
        return await self.limiter.admit(specs, request_id, reserve, tokens)

    async def refused(self, specs: list[LimitSpec], **kwargs: float) -> errors.AwsError:
        with pytest.raises(errors.AwsError) as info:
            await self.admit(specs, **kwargs)  # type: ignore[arg-type]
        return info.value


async def rpm_counts_within_a_calendar_minute(run: Run) -> None:
    spec = run.spec(rpm=3)
    for _ in range(3):
        await run.admit([spec])
    refusal = await run.refused([spec])
    assert refusal.status == 429 and refusal.reason == "rpm"
    run.clock.now += 60  # the next minute
    await run.admit([spec])


async def tpm_reserves_at_admission_and_settles_to_the_real_count(run: Run) -> None:
    spec = run.spec(tpm=100)
    first = await run.admit([spec], tokens=80)
    await run.admit([spec], tokens=10)
    await run.admit([spec], tokens=10)  # 90 counted before it: admitted, 100 now
    assert (await run.refused([spec], tokens=10)).reason == "tpm"
    await run.limiter.settle(first, 20, None)  # 80 reserved became 20 used
    await run.admit([spec], tokens=10)


async def parallel_slots_come_back_when_requests_end(run: Run) -> None:
    spec = run.spec(max_parallel=2)
    a = await run.admit([spec])
    await run.admit([spec])
    assert (await run.refused([spec])).reason == "parallel"
    await run.limiter.settle(a, 0, None)
    await run.admit([spec])


async def budget_counts_reservations_in_flight(run: Run) -> None:
    spec = run.spec(max_budget=1.0)
    first = await run.admit([spec], reserve=0.6)
    await run.admit([spec], reserve=0.5)  # 0.6 reserved < 1.0: admitted (1.1 now)
    assert (await run.refused([spec])).code == "ServiceQuotaExceededException"
    await run.limiter.settle(first, 0, 0.1)  # cost less than reserved: 0.1 + 0.5 held
    await run.admit([spec])


async def sessions_reserve_their_cost_as_it_grows(run: Run) -> None:
    """Two long sessions on one budget: each usage event's cost is checked against what
    the other has reserved, and reserved, so together they stop at the budget."""
    spec = run.spec(max_budget=1.0)
    a = await run.admit([spec], reserve=0.1)
    b = await run.admit([spec], reserve=0.1)
    await run.limiter.grow(a, 0.05)  # within its estimate: nothing more reserved
    await run.limiter.grow(a, 0.5)  # 0.5 + b's 0.1 <= 1.0
    await run.limiter.grow(b, 0.4)  # 0.5 + 0.4
    with pytest.raises(errors.AwsError) as refused:
        await run.limiter.grow(b, 0.6)  # 0.5 + 0.6 > 1.0: b is cut
    assert refused.value.code == "ServiceQuotaExceededException"
    await run.limiter.settle(b, 0, 0.6)  # b ends: charged what it used
    await run.limiter.grow(a, 0.4)  # 0.6 spent + 0.5 held: a's cost is below what it holds
    with pytest.raises(errors.AwsError):
        await run.limiter.grow(a, 0.45)  # 0.6 + 0.45 > 1.0


async def budget_resets_with_its_period(run: Run) -> None:
    ident = "k-" + secrets.token_hex(4)
    spec = LimitSpec("key", ident, max_budget=1.0, budget_seconds=3600, anchor=START)
    first = await run.admit([spec])
    await run.limiter.settle(first, 0, 1.5)  # over budget
    assert (await run.refused([spec])).code == "ServiceQuotaExceededException"
    run.clock.now = START + 3600 + 1  # the next period
    await run.admit([spec])


async def admission_is_all_or_nothing(run: Run) -> None:
    loose, tight = run.spec(rpm=10), run.spec(rpm=1)
    await run.admit([tight])
    await run.refused([loose, tight])  # refused by tight: loose must not count it
    for _ in range(10):
        await run.admit([loose])
    await run.refused([loose])


CASES: list[Callable[[Run], Awaitable[None]]] = [
    rpm_counts_within_a_calendar_minute,
    tpm_reserves_at_admission_and_settles_to_the_real_count,
    parallel_slots_come_back_when_requests_end,
    budget_counts_reservations_in_flight,
    sessions_reserve_their_cost_as_it_grows,
    budget_resets_with_its_period,
    admission_is_all_or_nothing,
]


@pytest.fixture(params=["in-process", "redis"])
def make_run(request) -> Callable[[], Run]:
    def make() -> Run:
        clock = ManualClock()
        if request.param == "in-process":
            return Run(InProcessLimiter(Ledger(), clock=clock), clock)
        from proxy.metering.limits import RedisLimiter

        redis_url = request.getfixturevalue("redis_url")
        limiter = RedisLimiter(redis_url, Ledger(), prefix="t-" + secrets.token_hex(4), clock=clock)
        return Run(limiter, clock)  # type: ignore[arg-type]

    return make


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_limit_case(make_run, case) -> None:
    run = make_run()

    async def go() -> None:
        try:
            await asyncio.wait_for(case(run), 10)
        finally:
            await run.limiter.close()

    asyncio.run(go())


def test_an_admission_records_what_it_reserved() -> None:
    clock = ManualClock()
    limiter = InProcessLimiter(Ledger(), clock=clock)
    spec = LimitSpec("key", "k", tpm=100)
    admission = asyncio.run(limiter.admit([spec], "r", 0.25, 40))
    assert admission == Admission("r", [spec], 0.25, 40, int(clock.now // 60))
