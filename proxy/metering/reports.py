"""Spend reports and named limits: one implementation behind the admin API and the CLI."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from ..store import Store
from ..store.base import LOG_FILTERS, REPORT_GROUPS
from ..store.records import KeyRecord
from ..wire import errors
from ..wire.clock import iso
from ..wire.params import LIMIT_FIELDS, number_field, paging, parse_duration
from .limits import LimitSpec

# Who a named limit applies to (besides user:ID and team:ID limits, which apply to their
# user or team by name).
_MEMBER_FIELDS = ("key_ids", "user_ids", "team_ids")


def parse_time(name: str, value: str | None) -> float | None:
    """An ISO 8601 time, a date, or epoch seconds."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
            seconds = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
        except (ValueError, OverflowError):
            raise errors.validation(
                f"{name}: {value!r} is not an ISO 8601 time or epoch seconds"
            ) from None
    if not 0 <= seconds <= 253402300799:  # also refuses NaN
        raise errors.validation(f"{name}: {value!r} is not between 1970 and 9999")
    return seconds


class Reports:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def logs(self, query: dict[str, str]) -> dict[str, Any]:
        page, size = paging(query)
        filters = {k: query[k] for k in LOG_FILTERS if k in query}
        rows, total = await self._store.spend_logs(
            filters,
            parse_time("start", query.get("start")),
            parse_time("end", query.get("end")),
            size,
            (page - 1) * size,
        )
        return {
            "logs": [_log_row(r) for r in rows],
            "total_count": total,
            "current_page": page,
            "total_pages": (total + size - 1) // size,
        }

    async def report(self, group_by: str, start: str | None, end: str | None) -> dict[str, Any]:
        if group_by not in REPORT_GROUPS:
            raise errors.validation(f"group_by must be one of {', '.join(REPORT_GROUPS)}")
        rows = await self._store.spend_report(
            group_by, parse_time("start", start), parse_time("end", end)
        )
        out = [{"group": r.pop("group_value"), **{k: _num(v) for k, v in r.items()}} for r in rows]
        totals: dict[str, Any] = {}
        for row in out:
            for k, v in row.items():
                if k != "group" and v is not None:
                    totals[k] = totals.get(k, 0) + v
        return {"group_by": group_by, "start": start, "end": end, "rows": out, "totals": totals}

    async def key_totals(self, record: KeyRecord) -> dict[str, Any]:
        spent_all = await self._store.spend_since("key", record.key_id, 0.0)
        totals: dict[str, Any] = {"spend": spent_all}
        if record.spec.max_budget is not None:
            spec = LimitSpec(
                "key",
                record.key_id,
                max_budget=record.spec.max_budget,
                budget_seconds=_seconds(record.spec.budget_duration),
                anchor=record.created_at,
            )
            _, start, end = spec.period(time.time())
            totals["budget_period_spend"] = await self._store.spend_since(
                "key", record.key_id, start
            )
            totals["budget_resets_at"] = None if end == float("inf") else iso(end)
        return totals

    # ---------------------------------------------------------------- named limits

    async def upsert_limit(self, body: dict[str, Any], create: bool) -> dict[str, Any]:
        limit_id = body.get("limit_id")
        if not isinstance(limit_id, str) or not limit_id or len(limit_id) > 200:
            raise errors.validation("limit_id is required (e.g. project-x, user:alice, team:ml)")
        existing = await self._store.get_limit(limit_id)
        if create and existing is not None:
            raise errors.validation(f"limit {limit_id!r} already exists")
        if not create and existing is None:
            raise errors.AwsError(404, "ResourceNotFoundException", f"No limit {limit_id!r}")
        fields = (*LIMIT_FIELDS, *_MEMBER_FIELDS)
        spec = {k: existing[k] for k in fields if existing and k in existing}
        for name, value in body.items():
            if name == "limit_id":
                continue
            if name in _MEMBER_FIELDS:
                if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                    raise errors.validation(f"{name} must be a list of ids")
                spec[name] = value
                continue
            if name not in LIMIT_FIELDS:
                raise errors.validation(f"Unknown field {name!r}")
            spec[name] = _limit_value(name, value)
        await self._store.upsert_limit(limit_id, spec)
        return await self._store.get_limit(limit_id) or {}

    async def limit_info(self, limit_id: str) -> dict[str, Any]:
        found = await self._store.get_limit(limit_id)
        if found is None:
            raise errors.AwsError(404, "ResourceNotFoundException", f"No limit {limit_id!r}")
        return found

    async def list_limits(self) -> dict[str, Any]:
        return {"limits": await self._store.list_limits()}

    async def delete_limit(self, limit_id: str) -> dict[str, Any]:
        if not await self._store.delete_limit(limit_id):
            raise errors.AwsError(404, "ResourceNotFoundException", f"No limit {limit_id!r}")
        return {"deleted_limits": [limit_id]}


def _log_row(row: dict[str, Any]) -> dict[str, Any]:
    import orjson

    row = dict(row)
    row["time"] = iso(row.pop("ts"))
    row["incomplete"] = bool(row["incomplete"])
    row["estimated"] = bool(row.get("estimated"))
    row["annotations"] = orjson.loads(row["annotations"]) if row["annotations"] else {}
    return row


def _num(value: Any) -> Any:
    if value is None:
        return None
    as_float = float(value)
    return int(as_float) if as_float.is_integer() and not isinstance(value, float) else as_float


def _seconds(duration: str | None) -> int | None:
    return parse_duration("budget_duration", duration) if duration else None


def _limit_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "budget_duration":
        if not isinstance(value, str):
            raise errors.validation("budget_duration must be a string like 30d")
        parse_duration(name, value)
        return value
    return number_field(name, value, float if name == "max_budget" else int)
