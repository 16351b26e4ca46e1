"""Teams' settings: the upstream pool their keys use when a key names none."""

from __future__ import annotations

from typing import Any

from ..wire.clock import SYSTEM_CLOCK, Clock
from .database import Database


class TeamRepository:
    def __init__(self, db: Database, clock: Clock = SYSTEM_CLOCK) -> None:
        self._db = db
        self._clock = clock

    async def set_upstream(self, team_id: str, upstream: str | None) -> None:
        await self._db.execute(
            "INSERT INTO bp_teams (team_id, upstream, updated_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (team_id) DO UPDATE"
            " SET upstream = excluded.upstream, updated_at = excluded.updated_at",
            team_id,
            upstream,
            self._clock.time(),
        )

    async def get(self, team_id: str) -> dict[str, Any] | None:
        row = await self._db.fetchrow(
            "SELECT team_id, upstream, updated_at FROM bp_teams WHERE team_id = $1", team_id
        )
        return dict(row) if row else None

    async def upstreams(self) -> dict[str, str]:
        """Every team that names a pool: team id -> pool."""
        rows = await self._db.fetch(
            "SELECT team_id, upstream FROM bp_teams WHERE upstream IS NOT NULL"
        )
        return {row["team_id"]: row["upstream"] for row in rows}

    async def list(self) -> list[dict[str, Any]]:
        rows = await self._db.fetch(
            "SELECT team_id, upstream, updated_at FROM bp_teams ORDER BY team_id"
        )
        return [dict(row) for row in rows]
