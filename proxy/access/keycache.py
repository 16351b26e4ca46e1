"""Key lookups, cached in memory for a bounded time.

Every replica re-reads a key from the shared store at most ``ttl`` seconds after it last did,
so a revocation anywhere takes effect everywhere within ``ttl``. Misses are cached too, so a
flood of bad tokens costs one query per token per ``ttl``, not one per request; but misses
are what an anonymous client controls, so they live apart, few and small (the values looked
up are a token's hash or a validated access key id), and a flood only evicts other misses.
"""

from __future__ import annotations

import time

from ..store import Store
from ..wire import errors
from .keys import KeyRecord
from .secretbox import SecretBox

_MAX_ENTRIES = 100_000
_MAX_MISSES = 4096


class KeyCache:
    def __init__(self, store: Store, box: SecretBox | None, ttl: float) -> None:
        self._store = store
        self._box = box
        self.ttl = ttl
        # (column, value) -> (fresh until, record or None)
        self._entries: dict[tuple[str, str], tuple[float, KeyRecord]] = {}
        self._misses: dict[tuple[str, str], float] = {}
        self._secrets: dict[str, tuple[str, str]] = {}  # key_id -> (sealed, plaintext)

    async def get(self, column: str, value: str) -> KeyRecord | None:
        now = time.monotonic()
        entry = self._entries.get((column, value))
        if entry is not None and entry[0] > now:
            return entry[1]
        missed_until = self._misses.get((column, value))
        if missed_until is not None and missed_until > now:
            return None
        try:
            record = await self._store.keys.by(column, value)
        except Exception:
            raise errors.service_unavailable("The key store is unavailable") from None
        if record is None:
            if len(self._misses) >= _MAX_MISSES:
                self._misses.clear()
            self._misses[(column, value)] = now + self.ttl
            return None
        self._misses.pop((column, value), None)
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        self._entries[(column, value)] = (now + self.ttl, record)
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
        self._secrets.pop(record.key_id, None)
