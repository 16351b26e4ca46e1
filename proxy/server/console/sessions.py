"""Console sessions: who signed in, with a CSRF token per session, and the sign-in
throttle. The key itself is never kept, in the browser or here: a session holds the key's
id (or "master") and is re-checked against the key store on every page.

Sessions live in this process (bounded); behind a load balancer, pin console traffic to a
replica (a session cookie is meaningless to the others, which ask to sign in again).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

COOKIE = "bp_console"
_MAX_SESSIONS = 10_000
# Failed sign-ins: this many per client address per window, and this many addresses kept.
_FAILURES_ALLOWED = 5
_FAILURE_WINDOW = 60.0
_MAX_ADDRESSES = 10_000


@dataclass(slots=True)
class ConsoleSession:
    kind: str  # "master" or "virtual"
    key_id: str | None
    csrf: str
    last_seen: float


class SessionStore:
    def __init__(self, idle_timeout: float = 1800.0) -> None:
        self._idle = idle_timeout
        self._sessions: OrderedDict[str, ConsoleSession] = OrderedDict()

    def create(self, kind: str, key_id: str | None) -> tuple[str, ConsoleSession]:
        sid = secrets.token_urlsafe(32)
        session = ConsoleSession(kind, key_id, secrets.token_urlsafe(24), time.monotonic())
        self._sessions[sid] = session
        if len(self._sessions) > _MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return sid, session

    def get(self, sid: str | None) -> ConsoleSession | None:
        if not sid:
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.last_seen > self._idle:
            del self._sessions[sid]
            return None
        session.last_seen = now
        self._sessions.move_to_end(sid)
        return session

    def end(self, sid: str | None) -> None:
        if sid:
            self._sessions.pop(sid, None)

    def end_key(self, key_id: str) -> None:
        """Sign out every session of a key (deleted or regenerated)."""
        for sid in [s for s, v in self._sessions.items() if v.key_id == key_id]:
            del self._sessions[sid]


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
