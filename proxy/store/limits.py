"""Named limits: a budget or rate limit shared by the keys, users and teams it lists."""

from __future__ import annotations

from typing import Any

import orjson

from ..wire.clock import SYSTEM_CLOCK, Clock
from .database import Database


class LimitRepository:
    def __init__(self, db: Database, clock: Clock = SYSTEM_CLOCK) -> None:
        self._db = db
        self._clock = clock

    async def upsert(self, limit_id: str, spec: dict[str, Any]) -> None:
        await self._db.execute(
            "INSERT INTO bp_limits (limit_id, spec, created_at, updated_at) VALUES ($1, $2, $3, $3)"
            " ON CONFLICT (limit_id) DO UPDATE"
            " SET spec = excluded.spec, updated_at = excluded.updated_at",
            limit_id,
            orjson.dumps(spec).decode(),
            self._clock.time(),
        )

    async def get(self, limit_id: str) -> dict[str, Any] | None:
        row = await self._db.fetchrow(
            "SELECT limit_id, spec, created_at FROM bp_limits WHERE limit_id = $1", limit_id
        )
        return _limit(row) if row else None

    async def list(self) -> list[dict[str, Any]]:
        rows = await self._db.fetch(
            "SELECT limit_id, spec, created_at FROM bp_limits ORDER BY limit_id"
        )
        return [_limit(r) for r in rows]

    async def delete(self, limit_id: str) -> bool:
        return await self._db.execute("DELETE FROM bp_limits WHERE limit_id = $1", limit_id) > 0


def _limit(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "limit_id": row["limit_id"],
        "created_at": float(row["created_at"]),
        **orjson.loads(row["spec"]),
    }
