"""Revocation for requests that outlive a key check: an event stream or a bidirectional
session runs for minutes, and a key deleted, blocked or regenerated meanwhile must not
keep getting answers. The key is looked at again at most once a ``period`` as the
request's bytes flow (a dict lookup while the key cache is fresh), or on a timer for a
session that may be quiet for minutes, which also ends after ``max_seconds``.
"""

from __future__ import annotations

from ..exchange import Identity
from ..wire import errors
from ..wire.clock import Clock
from .auth import Authenticator


class KeyWatch:
    __slots__ = ("_auth", "_clock", "_deadline", "_identity", "_next", "period", "refusal")

    def __init__(
        self,
        auth: Authenticator,
        identity: Identity,
        clock: Clock,
        period: float = 1.0,
        max_seconds: float | None = None,
    ) -> None:
        self._auth = auth
        self._identity = identity
        self._clock = clock
        self.period = period
        self.refusal: errors.AwsError | None = None  # why it was ended, once it was
        now = clock.monotonic()
        self._next = now + period
        self._deadline = now + max_seconds if max_seconds else None

    def due(self) -> bool:
        return self._clock.monotonic() >= self._next

    async def check(self) -> None:
        """Raise the refusal (an AccessDeniedException) once the key may no longer go on."""
        now = self._clock.monotonic()
        self._next = now + self.period
        if self._deadline is not None and now >= self._deadline:
            raise errors.AwsError(
                408, "ModelTimeoutException", "The session reached the proxy's longest session"
            )
        reason = await self._auth.still_valid(self._identity, self._clock.time())
        if reason is not None:
            raise errors.access_denied(f"{reason} while the request was running")
