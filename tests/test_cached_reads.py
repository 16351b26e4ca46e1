"""What the proxy keeps read in memory (keys, named limits) against a store whose answers the
test releases, so the order of a read and a change is fixed rather than raced: a read that
began before a change on this replica is not joined by a request after it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, TypeVar, cast

from proxy.access.keycache import KeyCache
from proxy.metering.service import Metering
from proxy.store import Store
from proxy.store.records import KeyRecord, KeySpec

_T = TypeVar("_T")


def _record() -> KeyRecord:
    return KeyRecord("k1", "hash1", "sk-...1", "BPKAAAA", "", KeySpec(), 0.0, 0.0)


class _HeldStore:
    """Each ``keys.by`` returns what was current when it began, once the test lets it."""

    def __init__(self, record: KeyRecord | None) -> None:
        self.current = record
        self.release = asyncio.Event()
        self.reads = 0
        self.health = SimpleNamespace(up=True)
        self.keys = SimpleNamespace(by=self._by)
        self.limits = SimpleNamespace(list=self._list)
        # Teams and users as records: none here.
        self.directory = SimpleNamespace(teams=_none, users=_none, memberships=_none)

    async def _by(self, column: str, value: str) -> KeyRecord | None:
        return await self._held(self.current)

    async def _list(self) -> list[dict[str, object]]:
        return await self._held([])

    async def _held(self, answer: _T) -> _T:
        self.reads += 1
        await self.release.wait()
        return answer


async def _none() -> list[dict[str, object]]:
    return []


async def _started(store: _HeldStore, reads: int) -> None:
    for _ in range(10):  # a read starts within a turn or two of the loop
        if store.reads == reads:
            return
        await asyncio.sleep(0)
    assert store.reads == reads


async def test_a_read_begun_before_a_revocation_is_not_joined() -> None:
    record = _record()
    store = _HeldStore(record)
    cache = KeyCache(cast(Store, store), None, ttl=60.0)
    before = asyncio.ensure_future(cache.get("token_hash", "hash1"))
    await _started(store, 1)
    store.current = None  # deleted in the store, then forgotten here
    cache.forget(record)
    after = asyncio.ensure_future(cache.get("token_hash", "hash1"))
    await _started(store, 2)
    store.release.set()
    assert await before is record  # it began before the revocation
    assert await after is None
    assert store.reads == 2
    assert await cache.get("token_hash", "hash1") is None  # and nothing stale was cached


async def test_a_named_limits_read_begun_before_a_change_is_not_joined() -> None:
    store = _HeldStore(None)
    unused: Any = None  # prices, ledger and limiter: not reached by a read of the limits
    metering = Metering(
        cast(Store, store),
        unused,
        unused,
        unused,
        60.0,
        reserve_output_tokens=0,
        cost_headers=False,
    )
    before = asyncio.ensure_future(metering._named_limits())
    await _started(store, 1)
    metering.forget_limit("team:red")
    after = asyncio.ensure_future(metering._named_limits())
    await _started(store, 2)
    store.release.set()
    first, second = await before, await after
    assert first is not second  # the second request read the limits as they are now
    assert await metering._named_limits() is second  # and that read is the one kept
