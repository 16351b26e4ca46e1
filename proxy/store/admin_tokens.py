"""Admin API tokens: one row each, found by the SHA-256 of the token (never stored). A
developer machine's token may hold its user's refresh token, sealed, read only by
``due`` (never listed)."""

from __future__ import annotations

from typing import Any

from .database import Database

_COLUMNS = (
    "token_id, name, role, team_id, expires_at, created_at, created_by, revoked_at, email, teams"
)


class AdminTokenRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert(self, row: dict[str, Any], token_hash: str) -> None:
        await self._db.execute(
            "INSERT INTO bp_admin_tokens (token_id, token_hash, name, role, team_id,"
            " expires_at, created_at, created_by, email, teams, refresh, checked_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            row["token_id"],
            token_hash,
            row["name"],
            row["role"],
            row["team_id"],
            row["expires_at"],
            row["created_at"],
            row["created_by"],
            row.get("email"),
            ",".join(row.get("teams") or ()) or None,
            row.get("refresh"),
            row["created_at"] if row.get("refresh") else None,
        )

    async def due(
        self, checked_before: float, now: float, token_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Live machine tokens with a refresh token, last asked about before
        ``checked_before`` (or the one named ``token_id``)."""
        sql = (
            "SELECT token_id, email, teams, refresh, checked_at FROM bp_admin_tokens"
            " WHERE refresh IS NOT NULL AND revoked_at IS NULL AND expires_at > $1"
            " AND checked_at < $2"
        )
        if token_id is not None:
            return await self._db.fetch(sql + " AND token_id = $3", now, checked_before, token_id)
        return await self._db.fetch(sql + " ORDER BY checked_at LIMIT 500", now, checked_before)

    async def claim(self, token_id: str, was: float, now: float) -> bool:
        """This replica asks about the token now (no other one that read ``was`` does)."""
        changed = await self._db.execute(
            "UPDATE bp_admin_tokens SET checked_at = $1 WHERE token_id = $2 AND checked_at = $3",
            now,
            token_id,
            was,
        )
        return changed > 0

    async def refreshed(self, token_id: str, refresh: str, teams: list[str]) -> None:
        await self._db.execute(
            "UPDATE bp_admin_tokens SET refresh = $1, teams = $2 WHERE token_id = $3",
            refresh,
            ",".join(teams) or None,
            token_id,
        )

    async def by_hash(self, token_hash: str) -> dict[str, Any] | None:
        return await self._db.fetchrow(
            f"SELECT {_COLUMNS} FROM bp_admin_tokens WHERE token_hash = $1", token_hash
        )

    async def get(self, token_id: str) -> dict[str, Any] | None:
        return await self._db.fetchrow(
            f"SELECT {_COLUMNS} FROM bp_admin_tokens WHERE token_id = $1", token_id
        )

    async def of_user(self, email: str) -> list[dict[str, Any]]:
        return await self._db.fetch(
            f"SELECT {_COLUMNS} FROM bp_admin_tokens WHERE email = $1 AND revoked_at IS NULL",
            email,
        )

    async def list(self) -> list[dict[str, Any]]:
        return await self._db.fetch(
            f"SELECT {_COLUMNS} FROM bp_admin_tokens ORDER BY created_at, token_id"
        )

    async def revoke(self, token_id: str, now: float) -> bool:
        changed = await self._db.execute(
            "UPDATE bp_admin_tokens SET revoked_at = $1 WHERE token_id = $2 AND revoked_at IS NULL",
            now,
            token_id,
        )
        return changed > 0
