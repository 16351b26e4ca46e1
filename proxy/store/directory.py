"""Teams and users as records: a team's settings and policy, users and their spend caps,
and team membership. Each record's fields are one JSON document beside its id."""

from __future__ import annotations

from typing import Any

import orjson

from ..wire.clock import SYSTEM_CLOCK, Clock
from .database import Database


class DirectoryRepository:
    def __init__(self, db: Database, clock: Clock = SYSTEM_CLOCK) -> None:
        self._db = db
        self._clock = clock

    # ------------------------------------------------------------------ teams

    async def put_team(self, team_id: str, spec: dict[str, Any], upstream: str | None) -> None:
        await self._db.execute(
            "INSERT INTO bp_teams (team_id, upstream, spec, updated_at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (team_id) DO UPDATE SET upstream = excluded.upstream,"
            " spec = excluded.spec, updated_at = excluded.updated_at",
            team_id,
            upstream,
            orjson.dumps(spec).decode(),
            self._clock.time(),
        )

    async def team(self, team_id: str) -> dict[str, Any] | None:
        row = await self._db.fetchrow(
            "SELECT team_id, upstream, spec FROM bp_teams WHERE team_id = $1", team_id
        )
        return _team(row) if row else None

    async def teams(self) -> list[dict[str, Any]]:
        rows = await self._db.fetch("SELECT team_id, upstream, spec FROM bp_teams ORDER BY team_id")
        return [_team(r) for r in rows]

    async def delete_team(self, team_id: str) -> bool:
        await self._db.execute("DELETE FROM bp_team_members WHERE team_id = $1", team_id)
        return await self._db.execute("DELETE FROM bp_teams WHERE team_id = $1", team_id) > 0

    # ------------------------------------------------------------------ members

    async def add_member(
        self, team_id: str, user_id: str, role: str, source: str | None = None
    ) -> None:
        """A member, by hand (``source`` None: it stays whatever the groups say) or from
        the identity provider's ``"groups"``; adding by hand makes a membership the
        groups gave a hand-made one."""
        await self._db.execute(
            "INSERT INTO bp_team_members (team_id, user_id, role, source) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (team_id, user_id) DO UPDATE SET role = excluded.role,"
            " source = excluded.source",
            team_id,
            user_id,
            role,
            source,
        )

    async def set_role(self, team_id: str, user_id: str, role: str) -> None:
        await self._db.execute(
            "UPDATE bp_team_members SET role = $3 WHERE team_id = $1 AND user_id = $2",
            team_id,
            user_id,
            role,
        )

    async def remove_member(self, team_id: str, user_id: str) -> bool:
        return (
            await self._db.execute(
                "DELETE FROM bp_team_members WHERE team_id = $1 AND user_id = $2",
                team_id,
                user_id,
            )
            > 0
        )

    async def members(self, team_id: str) -> list[dict[str, Any]]:
        return await self._db.fetch(
            "SELECT user_id, role FROM bp_team_members WHERE team_id = $1 ORDER BY user_id",
            team_id,
        )

    async def memberships(self) -> list[dict[str, Any]]:
        return await self._db.fetch("SELECT team_id, user_id, role FROM bp_team_members")

    async def teams_of(self, user_id: str) -> list[dict[str, Any]]:
        return await self._db.fetch(
            "SELECT team_id, role, source FROM bp_team_members WHERE user_id = $1 ORDER BY team_id",
            user_id,
        )

    # ------------------------------------------------------------------ users

    async def put_user(self, user_id: str, spec: dict[str, Any]) -> None:
        now = self._clock.time()
        await self._db.execute(
            "INSERT INTO bp_users (user_id, spec, created_at, updated_at) VALUES ($1, $2, $3, $3)"
            " ON CONFLICT (user_id) DO UPDATE SET spec = excluded.spec,"
            " updated_at = excluded.updated_at",
            user_id,
            orjson.dumps(spec).decode(),
            now,
        )

    async def user(self, user_id: str) -> dict[str, Any] | None:
        row = await self._db.fetchrow(
            "SELECT user_id, spec, created_at FROM bp_users WHERE user_id = $1", user_id
        )
        return _user(row) if row else None

    async def users(self) -> list[dict[str, Any]]:
        rows = await self._db.fetch(
            "SELECT user_id, spec, created_at FROM bp_users ORDER BY user_id"
        )
        return [_user(r) for r in rows]

    async def delete_user(self, user_id: str) -> bool:
        await self._db.execute("DELETE FROM bp_team_members WHERE user_id = $1", user_id)
        return await self._db.execute("DELETE FROM bp_users WHERE user_id = $1", user_id) > 0


def _team(row: dict[str, Any]) -> dict[str, Any]:
    spec = orjson.loads(row["spec"]) if row.get("spec") else {}
    return {"team_id": row["team_id"], "upstream": row["upstream"], **spec}


def _user(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "user_id": row["user_id"],
        "created_at": float(row["created_at"]),
        **orjson.loads(row["spec"]),
    }
