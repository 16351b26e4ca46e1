"""Console sessions: who signed in, kept by the hash of the session cookie, so every
replica on the same database knows them and a copied database opens none."""

from __future__ import annotations

from typing import Any

from .database import Database


class SessionRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self,
        session_hash: str,
        kind: str,
        key_id: str | None,
        csrf: str,
        expires_at: float,
        credential: str,
        role: str | None = None,
        teams: str | None = None,
        email: str | None = None,
    ) -> None:
        await self._db.execute(
            "INSERT INTO bp_console_sessions"
            " (session_hash, kind, key_id, csrf, expires_at, credential, role, teams, email)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            session_hash,
            kind,
            key_id,
            csrf,
            expires_at,
            credential,
            role,
            teams,
            email,
        )

    async def get(self, session_hash: str, now: float) -> dict[str, Any] | None:
        return await self._db.fetchrow(
            "SELECT kind, key_id, csrf, expires_at, credential, role, teams, email"
            " FROM bp_console_sessions"
            " WHERE session_hash = $1 AND expires_at > $2",
            session_hash,
            now,
        )

    async def touch(self, session_hash: str, expires_at: float) -> None:
        await self._db.execute(
            "UPDATE bp_console_sessions SET expires_at = $2 WHERE session_hash = $1",
            session_hash,
            expires_at,
        )

    async def end(self, session_hash: str) -> None:
        await self._db.execute(
            "DELETE FROM bp_console_sessions WHERE session_hash = $1", session_hash
        )

    async def end_key(self, key_id: str) -> None:
        await self._db.execute("DELETE FROM bp_console_sessions WHERE key_id = $1", key_id)

    async def end_user(self, user_id: str) -> None:
        """A signed-in user's sessions (by email, or by subject where they have none)."""
        await self._db.execute(
            "DELETE FROM bp_console_sessions WHERE kind = 'user' AND (email = $1 OR key_id = $1)",
            user_id,
        )

    async def sweep(self, now: float) -> int:
        return await self._db.execute("DELETE FROM bp_console_sessions WHERE expires_at <= $1", now)
