"""Virtual keys: one row each; the spec is one JSON document beside the columns looked up."""

from __future__ import annotations

from typing import Any

import orjson

from ..wire.clock import SYSTEM_CLOCK, Clock
from .database import Database
from .records import KeyRecord, KeySpec

_KEY_COLUMNS = (
    "key_id, token_hash, token_hint, access_key_id, secret_enc, spec, created_at, updated_at"
)
_LOOKUP_COLUMNS = frozenset({"key_id", "token_hash", "access_key_id", "key_alias"})


class KeyRepository:
    def __init__(self, db: Database, clock: Clock = SYSTEM_CLOCK) -> None:
        self._db = db
        self._clock = clock

    async def insert(self, record: KeyRecord) -> None:
        spec = record.spec
        await self._db.execute(
            "INSERT INTO bp_keys (key_id, token_hash, token_hint, access_key_id, secret_enc,"
            " key_alias, user_id, team_id, spec, created_at, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            record.key_id,
            record.token_hash,
            record.token_hint,
            record.access_key_id,
            record.secret_enc,
            spec.key_alias,
            spec.user_id,
            spec.team_id,
            orjson.dumps(spec.to_json()).decode(),
            record.created_at,
            record.updated_at,
        )

    async def by(self, column: str, value: str) -> KeyRecord | None:
        if column not in _LOOKUP_COLUMNS:
            raise ValueError(column)
        row = await self._db.fetchrow(
            f"SELECT {_KEY_COLUMNS} FROM bp_keys WHERE {column} = $1", value
        )
        return _key(row) if row else None

    async def update(
        self,
        key_id: str,
        spec: KeySpec | None = None,
        credentials: tuple[str, str, str, str] | None = None,
    ) -> KeyRecord | None:
        """Replace the spec and/or (token_hash, token_hint, access_key_id, secret_enc)."""
        now = self._clock.time()
        if spec is not None:
            await self._db.execute(
                "UPDATE bp_keys SET spec = $1, key_alias = $2, user_id = $3, team_id = $4,"
                " updated_at = $5 WHERE key_id = $6",
                orjson.dumps(spec.to_json()).decode(),
                spec.key_alias,
                spec.user_id,
                spec.team_id,
                now,
                key_id,
            )
        if credentials is not None:
            await self._db.execute(
                "UPDATE bp_keys SET token_hash = $1, token_hint = $2, access_key_id = $3,"
                " secret_enc = $4, updated_at = $5 WHERE key_id = $6",
                *credentials,
                now,
                key_id,
            )
        return await self.by("key_id", key_id)

    async def reseal_secret(self, key_id: str, secret_enc: str) -> None:
        await self._db.execute(
            "UPDATE bp_keys SET secret_enc = $1 WHERE key_id = $2", secret_enc, key_id
        )

    async def delete(self, key_id: str) -> bool:
        return await self._db.execute("DELETE FROM bp_keys WHERE key_id = $1", key_id) > 0

    async def list(
        self, filters: dict[str, str], limit: int, offset: int
    ) -> tuple[list[KeyRecord], int]:
        rows, total = await self._db.page(
            "bp_keys",
            _KEY_COLUMNS,
            ("user_id", "team_id", "key_alias"),
            filters,
            [],
            [],
            "created_at, key_id",
            limit,
            offset,
        )
        return [_key(r) for r in rows], total


def _key(row: dict[str, Any]) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        token_hash=row["token_hash"],
        token_hint=row["token_hint"],
        access_key_id=row["access_key_id"],
        secret_enc=row["secret_enc"],
        spec=KeySpec.from_json(orjson.loads(row["spec"])),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )
