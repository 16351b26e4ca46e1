"""Which pool members are cooling down after a throttle or a failure.

A member that throttles or fails is skipped for ``base * 2**(failures - 1)`` seconds (at
most ``max``); when that ends it takes requests again, and the first success resets it,
while another failure doubles the wait. With Redis the state is shared: a cool-down is
written at once, and every replica reads the others' every ``sync_seconds``, off the
request path (requests only read the local copy).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...wire.background import stop as stop_task
from ...wire.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger("bedrock_proxy.upstreams")
# The shared hash, below the deployment's Redis prefix (``redis_prefix``).
_REDIS_KEY = "upstream-health"


@dataclass(slots=True)
class MemberHealth:
    failures: int = 0
    until: float = 0.0  # wall-clock time the cool-down ends


class Health:
    def __init__(
        self,
        base_seconds: float,
        max_seconds: float,
        clock: Clock = SYSTEM_CLOCK,
        redis_url: str | None = None,
        sync_seconds: float = 1.0,
        on_cooldown: Callable[[str], None] | None = None,
        redis_prefix: str = "bp",
    ) -> None:
        self._key = f"{redis_prefix}:{_REDIS_KEY}"
        self._base = base_seconds
        self._max = max_seconds
        self._clock = clock
        self._state: dict[str, MemberHealth] = {}
        self._sync_seconds = sync_seconds
        self._on_cooldown = on_cooldown
        self._redis: Any = None
        if redis_url:
            import redis.asyncio as redis

            self._redis = redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sync_task: asyncio.Task[None] | None = None
        # Members known to be in the shared hash (written here, or read there): one that
        # then disappears from it was reset (a success elsewhere, or an operator).
        self._shared: set[str] = set()

    # ------------------------------------------------------------------ reads

    def cooling_until(self, member: str) -> float:
        """When the member's cool-down ends; 0 (or a past time) when it takes requests."""
        state = self._state.get(member)
        return state.until if state is not None else 0.0

    def available(self, member: str, now: float) -> bool:
        state = self._state.get(member)
        return state is None or state.until <= now

    # ------------------------------------------------------------------ writes

    def failed(self, member: str) -> None:
        state = self._state.setdefault(member, MemberHealth())
        state.failures += 1
        seconds = min(self._max, self._base * 2 ** min(state.failures - 1, 30))
        state.until = self._clock.time() + seconds
        log.warning(
            "upstream %s cools down for %.3g s (failure %d)", member, seconds, state.failures
        )
        if self._on_cooldown is not None:
            self._on_cooldown(member)
        self._publish(member, state)

    def succeeded(self, member: str) -> None:
        state = self._state.get(member)
        if state is None or not state.failures:
            return
        del self._state[member]
        self._publish(member, None)

    # ------------------------------------------------------------------ sharing

    def _publish(self, member: str, state: MemberHealth | None) -> None:
        if self._redis is None:
            return
        task = asyncio.get_running_loop().create_task(self._write(member, state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, member: str, state: MemberHealth | None) -> None:
        try:
            if state is None:
                await self._redis.hdel(self._key, member)
                self._shared.discard(member)
            else:
                await self._redis.hset(self._key, member, f"{state.failures}:{state.until!r}")
                self._shared.add(member)
        except Exception as exc:  # local state still holds; the next write retries
            log.warning("could not share upstream health in Redis: %s", type(exc).__name__)

    async def sync(self) -> None:
        """Take in the other replicas' view (the longer cool-down wins)."""
        if self._redis is None:
            return
        shared = await self._redis.hgetall(self._key)
        now = self._clock.time()
        seen = set()
        for raw_name, raw_value in shared.items():
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            value = raw_value.decode() if isinstance(raw_value, bytes) else str(raw_value)
            failures_text, _, until_text = value.partition(":")
            try:
                failures, until = int(failures_text), float(until_text)
            except ValueError:
                continue
            seen.add(name)
            state = self._state.setdefault(name, MemberHealth())
            if until > state.until:
                state.failures, state.until = max(failures, state.failures), until
        for name in [
            n
            for n, s in self._state.items()
            if n not in seen and (s.until <= now or n in self._shared)
        ]:
            # Another replica saw it succeed, or the hash was deleted to reset it; one
            # whose cool-down is still being written stays.
            del self._state[name]
        self._shared = seen

    def start(self) -> None:
        if self._redis is not None and self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())

    async def _sync_loop(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception as exc:
                log.warning("could not read upstream health from Redis: %s", type(exc).__name__)
            await asyncio.sleep(self._sync_seconds)

    async def close(self) -> None:
        await stop_task(self._sync_task)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        if self._redis is not None:
            await self._redis.aclose()
