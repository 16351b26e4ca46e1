"""The store's queries, written once; each backend supplies connections and placeholders.

SQL here uses ``$1``-style placeholders (PostgreSQL's); the SQLite backend rewrites them
to its equivalent ``?1``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

import orjson

from ..keys import KeyRecord, KeySpec
from .migrations import MIGRATIONS

_KEY_COLUMNS = (
    "key_id, token_hash, token_hint, access_key_id, secret_enc, spec, created_at, updated_at"
)


class StoreConflict(Exception):
    """A unique value (such as a key alias) is already taken."""


class Store(ABC):
    dialect: str

    # ---------------------------------------------------------------- backend primitives

    @abstractmethod
    async def open(self) -> None:
        """Connect and apply pending migrations."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; return the number of rows it changed."""

    @abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]: ...

    @abstractmethod
    async def apply_migrations(self, migrations: list[tuple[int, Any]]) -> list[int]:
        """Apply the migrations not yet recorded, under a lock; return those applied."""

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def ping(self) -> None:
        await self.fetch("SELECT 1 AS ok")

    async def migrate(self) -> list[int]:
        return await self.apply_migrations(MIGRATIONS)

    # ---------------------------------------------------------------- keys

    async def insert_key(self, record: KeyRecord) -> None:
        spec = record.spec
        await self.execute(
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

    async def key_by(self, column: str, value: str) -> KeyRecord | None:
        if column not in ("key_id", "token_hash", "access_key_id", "key_alias"):
            raise ValueError(column)
        row = await self.fetchrow(f"SELECT {_KEY_COLUMNS} FROM bp_keys WHERE {column} = $1", value)
        return _key(row) if row else None

    async def update_key(
        self,
        key_id: str,
        spec: KeySpec | None = None,
        credentials: tuple[str, str, str, str] | None = None,
    ) -> KeyRecord | None:
        """Replace the spec and/or (token_hash, token_hint, access_key_id, secret_enc)."""
        now = time.time()
        if spec is not None:
            await self.execute(
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
            await self.execute(
                "UPDATE bp_keys SET token_hash = $1, token_hint = $2, access_key_id = $3,"
                " secret_enc = $4, updated_at = $5 WHERE key_id = $6",
                *credentials,
                now,
                key_id,
            )
        return await self.key_by("key_id", key_id)

    async def reseal_secret(self, key_id: str, secret_enc: str) -> None:
        await self.execute(
            "UPDATE bp_keys SET secret_enc = $1 WHERE key_id = $2", secret_enc, key_id
        )

    async def delete_key(self, key_id: str) -> bool:
        return await self.execute("DELETE FROM bp_keys WHERE key_id = $1", key_id) > 0

    async def list_keys(
        self, filters: dict[str, str], limit: int, offset: int
    ) -> tuple[list[KeyRecord], int]:
        where, args = [], []
        for column in ("user_id", "team_id", "key_alias"):
            if filters.get(column) is not None:
                args.append(filters[column])
                where.append(f"{column} = ${len(args)}")
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        total_row = await self.fetchrow(f"SELECT COUNT(*) AS n FROM bp_keys{clause}", *args)
        rows = await self.fetch(
            f"SELECT {_KEY_COLUMNS} FROM bp_keys{clause} ORDER BY created_at, key_id"
            f" LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}",
            *args,
            limit,
            offset,
        )
        return [_key(r) for r in rows], int(total_row["n"]) if total_row else 0


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
