"""AgentCore sessions owned per key: which key started (or first used) each one."""

from __future__ import annotations

from ..wire.clock import SYSTEM_CLOCK, Clock
from .database import Database


class OwnedSessionRepository:
    def __init__(self, db: Database, clock: Clock = SYSTEM_CLOCK) -> None:
        self._db = db
        self._clock = clock

    async def claim(self, ref: str, key_id: str, location: str | None = None) -> str:
        """The session's owner: ``key_id`` if no key had it yet, else the one that has.
        ``location``: the pool member that holds it, when it lives in one account."""
        await self._db.execute(
            "INSERT INTO bp_owned_sessions (session_ref, key_id, created_at, location)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (session_ref) DO NOTHING",
            ref,
            key_id,
            self._clock.time(),
            location,
        )
        return await self.owner(ref) or key_id

    async def holder(self, ref: str) -> tuple[str, str | None] | None:
        """(the owning key, the pool member that holds it), or None when unknown."""
        row = await self._db.fetchrow(
            "SELECT key_id, location FROM bp_owned_sessions WHERE session_ref = $1", ref
        )
        return (row["key_id"], row["location"]) if row else None

    async def owner(self, ref: str) -> str | None:
        row = await self._db.fetchrow(
            "SELECT key_id FROM bp_owned_sessions WHERE session_ref = $1", ref
        )
        return row["key_id"] if row else None

    async def owned(self, key_id: str, refs: list[str]) -> set[str]:
        """Which of these sessions the key owns."""
        if not refs:
            return set()
        placeholders = ", ".join(f"${i + 2}" for i in range(len(refs)))
        rows = await self._db.fetch(
            "SELECT session_ref FROM bp_owned_sessions"
            f" WHERE key_id = $1 AND session_ref IN ({placeholders})",
            key_id,
            *refs,
        )
        return {row["session_ref"] for row in rows}
