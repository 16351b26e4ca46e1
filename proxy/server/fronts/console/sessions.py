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

from ....exchange import MASTER, Identity
from ....store import Store
from ....wire.clock import SYSTEM_CLOCK, Clock

COOKIE = "bp_console"
_TOUCH_EVERY = 60.0
# Failed sign-ins: this many per client address per window, and this many addresses kept.
_FAILURES_ALLOWED = 5
_FAILURE_WINDOW = 60.0
_MAX_ADDRESSES = 10_000


@dataclass(slots=True)
class ConsoleSession:
    kind: str  # "master", "virtual" (a key's own page) or "user" (single sign-on)
    key_id: str | None  # a key's id; a user's subject
    csrf: str
    # A user's role, teams and email, as the identity provider's groups gave them at
    # sign-in (``access.roles``).
    role: str | None = None
    teams: tuple[str, ...] = ()
    email: str | None = None

    def identity(self) -> Identity:
        if self.kind == "master":
            return MASTER
        return Identity(
            self.kind, key_id=self.key_id, role=self.role, teams=self.teams, email=self.email
        )


class SessionStore:
    """Sessions bound to the credential they were opened with: the master key as it is
    now, or the key's token as it is now. A session opened with a master key that has
    since been rotated, or with a key that has been regenerated, blocked, expired or
    deleted (through the console or the API, on any replica), opens nothing. A single
    sign-on session is bound to the master key too (the server's own secret), and to the
    role and teams the identity provider gave at sign-in; master sessions open nothing
    once ``master_signin`` is off."""

    def __init__(
        self,
        store: Store,
        idle_timeout: float = 1800.0,
        clock: Clock = SYSTEM_CLOCK,
        master_key: str | None = None,
        master_signin: bool = True,
    ) -> None:
        self.master_signin = master_signin
        self._store = store
        self._idle = idle_timeout
        self._clock = clock
        self._master = master_key.encode() if master_key else None

    async def create(
        self,
        kind: str,
        key_id: str | None,
        token_hash: str | None = None,
        role: str | None = None,
        teams: tuple[str, ...] = (),
        email: str | None = None,
    ) -> tuple[str, ConsoleSession]:
        sid = secrets.token_urlsafe(32)
        session = ConsoleSession(kind, key_id, secrets.token_urlsafe(24), role, teams, email)
        secret = self._master if kind in ("master", "user") else (token_hash or "").encode()
        if not secret:
            raise ValueError("a console session needs the credential it is opened with")
        await self._store.sessions.create(
            _hash(sid),
            kind,
            key_id,
            session.csrf,
            self._clock.time() + self._idle,
            _bound(secret, sid),
            role,
            ",".join(teams) if teams else None,
            email,
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
        if not await self._still_valid(row, sid, now):
            await self._store.sessions.end(_hash(sid))
            return None
        if row["expires_at"] - now < self._idle - _TOUCH_EVERY:
            await self._store.sessions.touch(_hash(sid), now + self._idle)
        teams = tuple(t for t in (row.get("teams") or "").split(",") if t)
        return ConsoleSession(
            row["kind"], row["key_id"], row["csrf"], row.get("role"), teams, row.get("email")
        )

    async def _still_valid(self, row: dict[str, object], sid: str, now: float) -> bool:
        bound = row.get("credential")
        if not isinstance(bound, str):
            return False  # opened before sessions were bound to their credential
        if row["kind"] == "master" and not self.master_signin:
            return False  # the break-glass sign-in is switched off: its sessions end too
        if row["kind"] in ("master", "user"):
            secret = self._master
        else:
            key_id = row["key_id"]
            record = (
                await self._store.keys.by("key_id", key_id) if isinstance(key_id, str) else None
            )
            if record is None or record.refusal(now) is not None:
                return False
            secret = record.token_hash.encode()
        return secret is not None and hmac.compare_digest(bound, _bound(secret, sid))

    async def end(self, sid: str | None) -> None:
        if sid and len(sid) <= 128:
            await self._store.sessions.end(_hash(sid))

    async def end_key(self, key_id: str) -> None:
        """Sign out every session of a key (deleted or regenerated)."""
        await self._store.sessions.end_key(key_id)


def _hash(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def _bound(secret: bytes, sid: str) -> str:
    """The session id under its credential. The row keeps this and the id's SHA-256,
    never the id: a copy of the store verifies no guess at the master key."""
    return hmac.new(secret, sid.encode(), hashlib.sha256).hexdigest()


def csrf_ok(session: ConsoleSession, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), session.csrf.encode())


class SignInThrottle:
    """Sign-in attempts per client address: each is counted as a failure before its key
    is checked (so attempts made at once, 40 streams of one HTTP/2 connection, are
    counted as they arrive, not after the first checks end), and a success takes back
    only its own attempt (a valid key of the attacker's own does not wipe the count of
    its guesses). Past the allowance, refused until the window ends. Bounded: the oldest
    addresses are forgotten first."""

    def __init__(self, allowed: int = _FAILURES_ALLOWED, window: float = _FAILURE_WINDOW) -> None:
        self._allowed = allowed
        self._window = window
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def attempt(self, address: str) -> float | None:
        """Count an attempt; None when the address is over its allowance (refuse it)."""
        now = time.monotonic()
        times = [t for t in self._failures.get(address, ()) if now - t < self._window]
        if len(times) >= self._allowed:
            self._failures[address] = times
            return None
        times.append(now)
        self._failures[address] = times
        self._failures.move_to_end(address)
        if len(self._failures) > _MAX_ADDRESSES:
            self._failures.popitem(last=False)
        return now

    def succeeded(self, address: str, attempt: float) -> None:
        """The attempt was a valid key: it is not a failure (the others still are)."""
        times = self._failures.get(address)
        if times is not None and attempt in times:
            times.remove(attempt)
