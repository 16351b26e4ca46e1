"""Key lookups, cached in memory for a bounded time.

Every replica re-reads a key from the shared store at most ``ttl`` seconds after it last did,
so a revocation anywhere takes effect everywhere within ``ttl`` (a key in use is re-read
behind its requests, so no request waits for it). During a store outage, keys a replica
has read are served as last read; keys it has not are refused with a 503.

Misses are cached too, so a flood of bad tokens costs one query per token per ``ttl``, not
one per request; but misses are what an anonymous client controls, so they live apart, few
and small (the values looked up are a token's hash or a validated access key id), and a
flood only evicts other misses.
"""

from __future__ import annotations

import asyncio

from ..store import SLOW_READ, Store, StoreUnavailable
from ..wire.clock import SYSTEM_CLOCK, Clock
from .keys import KeyRecord
from .secretbox import SecretBox

_MAX_ENTRIES = 100_000
_MAX_MISSES = 4096


class KeyCache:
    def __init__(
        self, store: Store, box: SecretBox | None, ttl: float, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._clock = clock  # (its monotonic time: how long an entry is trusted)
        self._store = store
        self._box = box
        self.ttl = ttl
        # (column, value) -> (re-read after, expires, record)
        self._entries: dict[tuple[str, str], tuple[float, float, KeyRecord]] = {}
        self._misses: dict[tuple[str, str], float] = {}
        self._secrets: dict[str, tuple[str, str]] = {}  # key_id -> (sealed, plaintext)
        # One read of the store per key at a time, shared by whoever needs it, and when
        # it began.
        self._loading: dict[tuple[str, str], tuple[asyncio.Task[KeyRecord | None], float]] = {}
        # Bumped by ``forget``: a read that began before it must not put the key back.
        self._generation = 0

    async def get(self, column: str, value: str) -> KeyRecord | None:
        """The key, from memory while fresh. A key in use is re-read behind its requests
        once half its ``ttl`` has passed, so it is never waited for. An expired one is
        read again while the store answers; during an outage a key this replica knows is
        served as last read rather than refused (a 503 is for keys it has never seen)."""
        now = self._clock.monotonic()
        entry = self._entries.get((column, value))
        if entry is not None:
            if entry[0] > now:  # (the one comparison on every request's path)
                return entry[2]
            until = entry[1]
            if until > now:  # past half its ttl: re-read behind the requests
                self._load((column, value))
                return entry[2]
            if not self._store.health.up:  # served as last read, not after a deadline
                self._load((column, value))
                return entry[2]
            read = self._load((column, value))  # (one under way is joined)
            grace = SLOW_READ - (now - self._loading[(column, value)][1])
            if grace <= 0:  # a read this slow: the store is in trouble, not the key
                return entry[2]
            try:  # a revocation is seen as soon as the store answers, within the grace
                return await asyncio.wait_for(asyncio.shield(read), grace)
            except (TimeoutError, StoreUnavailable):
                return entry[2]
        missed_until = self._misses.get((column, value))
        if missed_until is not None and missed_until > now:
            return None
        return await asyncio.shield(self._load((column, value)))

    def _load(self, key: tuple[str, str]) -> asyncio.Task[KeyRecord | None]:
        loading = self._loading.get(key)
        if loading is not None:
            return loading[0]
        task = asyncio.ensure_future(self._read(key))
        self._loading[key] = (task, self._clock.monotonic())
        task.add_done_callback(lambda done: self._loaded(key, done))
        return task

    def _loaded(self, key: tuple[str, str], task: asyncio.Task[KeyRecord | None]) -> None:
        loading = self._loading.get(key)
        if loading is not None and loading[0] is task:
            del self._loading[key]
        if not task.cancelled():
            task.exception()  # read here: a read behind requests has no one awaiting it

    async def _read(self, key: tuple[str, str]) -> KeyRecord | None:
        generation = self._generation
        record = await self._store.keys.by(*key)  # StoreUnavailable: a 503
        if generation != self._generation:  # forgotten meanwhile: not cached
            return record
        now = self._clock.monotonic()
        if record is None:
            self._entries.pop(key, None)  # deleted: no longer served, even in an outage
            if len(self._misses) >= _MAX_MISSES:
                self._misses.clear()
            self._misses[key] = now + self.ttl
            return None
        self._misses.pop(key, None)
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = (now + self.ttl / 2, now + self.ttl, record)
        return record

    def secret(self, record: KeyRecord) -> str:
        """The plaintext SigV4 secret, opened once per sealed value."""
        cached = self._secrets.get(record.key_id)
        if cached is not None and cached[0] == record.secret_enc:
            return cached[1]
        if self._box is None:
            raise LookupError("no secret_key configured to open SigV4 secrets")
        plaintext = self._box.open(record.secret_enc)
        self._secrets[record.key_id] = (record.secret_enc, plaintext)
        return plaintext

    def forget(self, record: KeyRecord) -> None:
        """Drop a key at once on this replica (others follow within ttl)."""
        for column, value in (
            ("token_hash", record.token_hash),
            ("access_key_id", record.access_key_id),
            ("key_id", record.key_id),
        ):
            self._entries.pop((column, value), None)
            self._misses.pop((column, value), None)
            # A read begun before the change is not joined: it may return the key as it was.
            self._loading.pop((column, value), None)
        self._secrets.pop(record.key_id, None)
        self._generation += 1
