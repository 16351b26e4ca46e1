"""Console sessions: who signed in, with a CSRF token per session, and the sign-in
throttle. The key itself is never kept, in the browser or here: a session holds the key's
id (or "master") and is re-checked against the key store on every page.

Sessions are rows of the key store (``bp_console_sessions``), found by the SHA-256 of the
cookie: replicas sharing PostgreSQL share them, and a copied database opens none. Each page
moves the idle deadline on, written at most once a minute.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from ...store import Store
from ...wire.clock import SYSTEM_CLOCK, Clock

COOKIE = "bp_console"
_TOUCH_EVERY = 60.0
# Failed sign-ins: this many per client address per window, and this many addresses kept.
_FAILURES_ALLOWED = 5
_FAILURE_WINDOW = 60.0
_MAX_ADDRESSES = 10_000


@dataclass(slots=True)
class ConsoleSession:
    kind: str  # "master" or "virtual"
    key_id: str | None
    csrf: str


class SessionStore:
    def __init__(
        self, store: Store, idle_timeout: float = 1800.0, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._store = store
        self._idle = idle_timeout
        self._clock = clock

    async def create(self, kind: str, key_id: str | None) -> tuple[str, ConsoleSession]:
        sid = secrets.token_urlsafe(32)
        session = ConsoleSession(kind, key_id, secrets.token_urlsafe(24))
        await self._store.sessions.create(
            _hash(sid), kind, key_id, session.csrf, self._clock.time() + self._idle
        )
        if secrets.randbelow(64) == 0:  # now and then, drop the expired ones
            await self._store.sessions.sweep(self._clock.time())
        return sid, session

    async def get(self, sid: str | None) -> ConsoleSession | None:
        if not sid or len(sid) > 128:
            return None
        now = self._clock.time()
        row = await self._store.sessions.get(_hash(sid), now)
        if row is None:
            return None
        if row["expires_at"] - now < self._idle - _TOUCH_EVERY:
            await self._store.sessions.touch(_hash(sid), now + self._idle)
        return ConsoleSession(row["kind"], row["key_id"], row["csrf"])

    async def end(self, sid: str | None) -> None:
        if sid and len(sid) <= 128:
            await self._store.sessions.end(_hash(sid))

    async def end_key(self, key_id: str) -> None:
        """Sign out every session of a key (deleted or regenerated)."""
        await self._store.sessions.end_key(key_id)


def _hash(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def csrf_ok(session: ConsoleSession, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), session.csrf.encode())


class SignInThrottle:
    """Failed sign-ins per client address: past the allowance, refused until the window
    ends. Bounded: the oldest addresses are forgotten first."""

    def __init__(self, allowed: int = _FAILURES_ALLOWED, window: float = _FAILURE_WINDOW) -> None:
        self._allowed = allowed
        self._window = window
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def blocked(self, address: str) -> bool:
        now = time.monotonic()
        times = [t for t in self._failures.get(address, ()) if now - t < self._window]
        if times:
            self._failures[address] = times
        else:
            self._failures.pop(address, None)
        return len(times) >= self._allowed

    def failed(self, address: str) -> None:
        self._failures.setdefault(address, []).append(time.monotonic())
        self._failures.move_to_end(address)
        if len(self._failures) > _MAX_ADDRESSES:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
