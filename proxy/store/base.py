"""The store's queries, written once; each backend supplies connections and placeholders.

SQL here uses ``$1``-style placeholders (PostgreSQL's); the SQLite backend rewrites them
to its equivalent ``?1``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

import orjson

from .migrations import MIGRATIONS
from .records import KeyRecord, KeySpec

_KEY_COLUMNS = (
    "key_id, token_hash, token_hint, access_key_id, secret_enc, spec, created_at, updated_at"
)


SPEND_COLUMNS = (
    "request_id",
    "ts",
    "day",
    "key_id",
    "key_alias",
    "user_id",
    "team_id",
    "end_user",
    "operation",
    "service",
    "model",
    "status",
    "latency_ms",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "total_tokens",
    "cost",
    "incomplete",
    "use_case",
    "annotations",
    "error",
    "estimated",
    "model_ref",
)
LABEL_COLUMNS = ("request_id", "kind", "value", "ts", "cost", "total_tokens")
# Column types, for unpacking a JSON batch of rows in SQL (see insert_spend).
_COLUMN_TYPES = {
    "ts": "double precision",
    "latency_ms": "double precision",
    "cost": "double precision",
    "status": "integer",
    "incomplete": "integer",
    "estimated": "integer",
    "input_tokens": "bigint",
    "output_tokens": "bigint",
    "cache_read_tokens": "bigint",
    "cache_write_tokens": "bigint",
    "total_tokens": "bigint",
}


def _insert_batch_sql(table: str, columns: tuple[str, ...], dialect: str, upsert: str) -> str:
    """INSERT of every row of one JSON array of rows, passed as the only parameter."""
    if dialect == "sqlite":
        values = [f"json_extract(value, '$[{i}]')" for i in range(len(columns))]
        source = "json_each($1) WHERE true"  # WHERE: SQLite's upsert-after-SELECT rule
    else:
        values = [
            f"(r->>{i})::{_COLUMN_TYPES.get(column, 'text')}" for i, column in enumerate(columns)
        ]
        source = "json_array_elements($1::json) AS rows(r)"
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(values)} FROM {source}"
        f"{upsert}"
    )


# group_by name -> (column expression, FROM clause)
REPORT_GROUPS = {
    "key": ("key_id", "bp_spend"),
    "user": ("user_id", "bp_spend"),
    "team": ("team_id", "bp_spend"),
    "model": ("model", "bp_spend"),
    "operation": ("operation", "bp_spend"),
    "use_case": ("use_case", "bp_spend"),
    "end_user": ("end_user", "bp_spend"),
    "day": ("day", "bp_spend"),
    "tag": ("value", "bp_spend_labels"),
    "limit": ("value", "bp_spend_labels"),
}
LOG_FILTERS = (
    "key_id",
    "user_id",
    "team_id",
    "model",
    "operation",
    "end_user",
    "use_case",
    "request_id",
)


class SpendQueries:
    """The ledger's queries; mixed into Store."""

    async def insert_spend(self: Any, rows: list[tuple], labels: list[tuple]) -> None:
        """A batch is one statement with one JSON parameter, unpacked by the database:
        binding 23 parameters per row took the GIL from the event loop (SQLite's writer
        thread) or the loop's own time (asyncpg) for every row."""
        await self.execute(
            _insert_batch_sql(
                "bp_spend", SPEND_COLUMNS, self.dialect, " ON CONFLICT (request_id) DO NOTHING"
            ),
            orjson.dumps(rows).decode(),
        )
        if labels:
            await self.execute(
                _insert_batch_sql("bp_spend_labels", LABEL_COLUMNS, self.dialect, ""),
                orjson.dumps(labels).decode(),
            )

    async def spend_logs(
        self: Any,
        filters: dict[str, str],
        start: float | None,
        end: float | None,
        limit: int,
        offset: int,
    ) -> tuple[list[dict[str, Any]], int]:
        where, args = _time_range(start, end)
        return await self.page(
            "bp_spend",
            ", ".join(SPEND_COLUMNS),
            LOG_FILTERS,
            filters,
            where,
            args,
            "ts DESC, request_id",
            limit,
            offset,
        )

    async def page(
        self: Any,
        table: str,
        columns: str,
        filter_columns: tuple[str, ...],
        filters: dict[str, str],
        where: list[str],
        args: list[Any],
        order: str,
        limit: int,
        offset: int,
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of a table, filtered by equality on the given columns, and the total."""
        for column in filter_columns:
            if filters.get(column) is not None:
                args.append(filters[column])
                where.append(f"{column} = ${len(args)}")
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        total = await self.fetchrow(f"SELECT COUNT(*) AS n FROM {table}{clause}", *args)
        rows = await self.fetch(
            f"SELECT {columns} FROM {table}{clause} ORDER BY {order}"
            f" LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}",
            *args,
            limit,
            offset,
        )
        return rows, int(total["n"]) if total else 0

    async def spend_report(
        self: Any, group_by: str, start: float | None, end: float | None
    ) -> list[dict[str, Any]]:
        column, table = REPORT_GROUPS[group_by]
        where, args = _time_range(start, end)
        if table == "bp_spend_labels":
            args.append(group_by)
            where.append(f"kind = ${len(args)}")
            sums = "COUNT(*) AS requests, SUM(total_tokens) AS total_tokens, SUM(cost) AS cost"
        else:
            sums = (
                "COUNT(*) AS requests, SUM(input_tokens) AS input_tokens,"
                " SUM(output_tokens) AS output_tokens, SUM(cache_read_tokens) AS cache_read_tokens,"
                " SUM(cache_write_tokens) AS cache_write_tokens, SUM(total_tokens) AS total_tokens,"
                " SUM(cost) AS cost, SUM(CASE WHEN cost IS NULL THEN 1 ELSE 0 END) AS unpriced"
            )
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        return await self.fetch(
            f"SELECT {column} AS group_value, {sums} FROM {table}{clause}"
            f" GROUP BY {column} ORDER BY cost DESC NULLS LAST, group_value",
            *args,
        )

    async def spend_since(self: Any, scope: str, value: str, since: float) -> float:
        """Cost charged to a key, user, team or named limit since a time (budget periods)."""
        if scope == "limit":
            row = await self.fetchrow(
                "SELECT COALESCE(SUM(cost), 0) AS cost FROM bp_spend_labels"
                " WHERE kind = 'limit' AND value = $1 AND ts >= $2",
                value,
                since,
            )
        else:
            column = {"key": "key_id", "user": "user_id", "team": "team_id"}[scope]
            row = await self.fetchrow(
                "SELECT COALESCE(SUM(cost), 0) AS cost FROM bp_spend"
                f" WHERE {column} = $1 AND ts >= $2",
                value,
                since,
            )
        return float(row["cost"]) if row else 0.0

    async def spend_count(self: Any) -> int:
        row = await self.fetchrow("SELECT COUNT(*) AS n FROM bp_spend")
        return int(row["n"]) if row else 0

    # ---------------------------------------------------------------- named limits

    async def upsert_limit(self: Any, limit_id: str, spec: dict[str, Any]) -> None:
        now = time.time()
        await self.execute(
            "INSERT INTO bp_limits (limit_id, spec, created_at, updated_at) VALUES ($1, $2, $3, $3)"
            " ON CONFLICT (limit_id) DO UPDATE"
            " SET spec = excluded.spec, updated_at = excluded.updated_at",
            limit_id,
            orjson.dumps(spec).decode(),
            now,
        )

    async def get_limit(self: Any, limit_id: str) -> dict[str, Any] | None:
        row = await self.fetchrow(
            "SELECT limit_id, spec, created_at FROM bp_limits WHERE limit_id = $1", limit_id
        )
        return _limit(row) if row else None

    async def list_limits(self: Any) -> list[dict[str, Any]]:
        rows = await self.fetch(
            "SELECT limit_id, spec, created_at FROM bp_limits ORDER BY limit_id"
        )
        return [_limit(r) for r in rows]

    async def delete_limit(self: Any, limit_id: str) -> bool:
        return await self.execute("DELETE FROM bp_limits WHERE limit_id = $1", limit_id) > 0

    # ---------------------------------------------------------------- batch jobs

    async def record_job(
        self: Any,
        job_arn: str,
        key_id: str,
        model: str | None,
        output_uri: str | None = None,
        region: str | None = None,
    ) -> None:
        await self.execute(
            "INSERT INTO bp_jobs (job_arn, job_id, key_id, model, created_at, output_uri, region)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (job_arn) DO NOTHING",
            job_arn,
            job_arn.rsplit("/", 1)[-1],
            key_id,
            model,
            time.time(),
            output_uri,
            region,
        )

    async def unsettled_jobs(self: Any, limit: int) -> list[dict[str, Any]]:
        """Batch jobs whose tokens are not charged yet, oldest first."""
        return await self.fetch(
            "SELECT job_arn, job_id, key_id, model, output_uri, region FROM bp_jobs"
            " WHERE settled_at IS NULL AND output_uri IS NOT NULL ORDER BY created_at LIMIT $1",
            limit,
        )

    async def settle_job(self: Any, job_arn: str) -> None:
        await self.execute(
            "UPDATE bp_jobs SET settled_at = $2 WHERE job_arn = $1", job_arn, time.time()
        )

    async def job_owner(self: Any, identifier: str) -> str | None:
        """The key that created a job, by its ARN or its id."""
        row = await self.fetchrow(
            "SELECT key_id FROM bp_jobs WHERE job_arn = $1 OR job_id = $2",
            identifier,
            identifier.rsplit("/", 1)[-1],
        )
        return row["key_id"] if row else None

    async def owned_jobs(self: Any, key_id: str, arns: list[str]) -> set[str]:
        """Which of these job ARNs the key created."""
        if not arns:
            return set()
        placeholders = ", ".join(f"${i + 2}" for i in range(len(arns)))
        rows = await self.fetch(
            f"SELECT job_arn FROM bp_jobs WHERE key_id = $1 AND job_arn IN ({placeholders})",
            key_id,
            *arns,
        )
        return {row["job_arn"] for row in rows}


def _limit(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "limit_id": row["limit_id"],
        "created_at": float(row["created_at"]),
        **orjson.loads(row["spec"]),
    }


def _time_range(start: float | None, end: float | None) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    if start is not None:
        args.append(start)
        where.append(f"ts >= ${len(args)}")
    if end is not None:
        args.append(end)
        where.append(f"ts < ${len(args)}")
    return where, args


class StoreConflict(Exception):
    """A unique value (such as a key alias) is already taken."""


class Store(SpendQueries, ABC):
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
        rows, total = await self.page(
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
