"""The ledger's table: batched inserts, the spend logs, reports and budget sums."""

from __future__ import annotations

from typing import Any

from .database import Database, RowBatch
from .records import LABEL_COLUMNS, SPEND_COLUMNS, LabelRow, SpendRow

# Column types besides text, for a backend that unpacks a JSON batch of rows in SQL.
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


class SpendRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert(self, rows: list[SpendRow], labels: list[LabelRow]) -> None:
        await self._db.insert_rows(
            [
                RowBatch(
                    "bp_spend",
                    SPEND_COLUMNS,
                    rows,
                    _COLUMN_TYPES,
                    " ON CONFLICT (request_id) DO NOTHING",
                ),
                RowBatch(
                    "bp_spend_labels",
                    LABEL_COLUMNS,
                    labels,
                    _COLUMN_TYPES,
                ),
            ]
        )

    async def logs(
        self,
        filters: dict[str, str],
        start: float | None,
        end: float | None,
        limit: int,
        offset: int,
    ) -> tuple[list[dict[str, Any]], int]:
        where, args = _time_range(start, end)
        return await self._db.page(
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

    async def report(
        self, group_by: str, start: float | None, end: float | None
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
                # Unpriced: served, yet with no price. A refusal or an error costs nothing.
                " SUM(cost) AS cost,"
                " SUM(CASE WHEN cost IS NULL AND status < 400 THEN 1 ELSE 0 END) AS unpriced"
            )
            if column == "key_id":  # the alias beside the id (the latest a key had)
                sums += ", MAX(key_alias) AS key_alias"
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        return await self._db.fetch(
            f"SELECT {column} AS group_value, {sums} FROM {table}{clause}"
            f" GROUP BY {column} ORDER BY cost DESC NULLS LAST, group_value",
            *args,
        )

    async def daily(
        self, group_by: str, start: float | None, end: float | None, where_eq: dict[str, str]
    ) -> list[dict[str, Any]]:
        """Cost, tokens and requests per (day, group): the console's stacked charts."""
        column, table = REPORT_GROUPS[group_by]
        assert table == "bp_spend"
        where, args = _time_range(start, end)
        for name, value in where_eq.items():
            assert name in LOG_FILTERS
            args.append(value)
            where.append(f"{name} = ${len(args)}")
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        alias = ", MAX(key_alias) AS key_alias" if column == "key_id" else ""
        return await self._db.fetch(
            f"SELECT day, {column} AS group_value, COUNT(*) AS requests{alias},"
            f" SUM(total_tokens) AS total_tokens, SUM(cost) AS cost FROM bp_spend{clause}"
            f" GROUP BY day, {column} ORDER BY day",
            *args,
        )

    async def since(self, scope: str, value: str, since: float) -> float:
        """Cost charged to a key, user, team or named limit since a time (budget periods)."""
        if scope == "limit":
            row = await self._db.fetchrow(
                "SELECT COALESCE(SUM(cost), 0) AS cost FROM bp_spend_labels"
                " WHERE kind = 'limit' AND value = $1 AND ts >= $2",
                value,
                since,
            )
        else:
            column = {"key": "key_id", "user": "user_id", "team": "team_id"}[scope]
            row = await self._db.fetchrow(
                "SELECT COALESCE(SUM(cost), 0) AS cost FROM bp_spend"
                f" WHERE {column} = $1 AND ts >= $2",
                value,
                since,
            )
        return float(row["cost"]) if row else 0.0

    async def count(self) -> int:
        row = await self._db.fetchrow("SELECT COUNT(*) AS n FROM bp_spend")
        return int(row["n"]) if row else 0


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
