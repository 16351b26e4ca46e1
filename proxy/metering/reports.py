"""Spend reports: one implementation behind the admin API and the CLI."""

from __future__ import annotations

from typing import Any

from ..store import Store
from ..store.records import KeyRecord
from ..store.spend import LOG_FILTERS, REPORT_GROUPS
from ..wire import errors
from ..wire.clock import SYSTEM_CLOCK, Clock, iso, parse_iso
from ..wire.params import paging, parse_duration
from .limits import LimitSpec
from .named import limit_spec


def parse_time(name: str, value: str | None) -> float | None:
    """An ISO 8601 time, a date, or epoch seconds."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parse_iso(value)
        except (ValueError, OverflowError):
            raise errors.validation(
                f"{name}: {value!r} is not an ISO 8601 time or epoch seconds"
            ) from None
    if not 0 <= seconds <= 253402300799:  # also refuses NaN
        raise errors.validation(f"{name}: {value!r} is not between 1970 and 9999")
    return seconds


class Reports:
    def __init__(self, store: Store, clock: Clock = SYSTEM_CLOCK) -> None:
        self._store = store
        self._clock = clock

    async def logs(self, query: dict[str, str]) -> dict[str, Any]:
        page, size = paging(query)
        filters = {k: query[k] for k in LOG_FILTERS if k in query}
        rows, total = await self._store.spend.logs(
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
        rows = await self._store.spend.report(
            group_by, parse_time("start", start), parse_time("end", end)
        )
        out = [
            {
                "group": r.pop("group_value"),
                **{k: v if k == "key_alias" else _num(v) for k, v in r.items()},
            }
            for r in rows
        ]
        totals: dict[str, Any] = {}
        for row in out:
            for k, v in row.items():
                if k not in ("group", "key_alias") and v is not None:
                    totals[k] = totals.get(k, 0) + v
        return {"group_by": group_by, "start": start, "end": end, "rows": out, "totals": totals}

    async def daily(
        self, group_by: str, start: str | None, end: str | None, **where: str
    ) -> list[dict[str, Any]]:
        """Per day and group (model, team, key...): requests, tokens and cost."""
        if group_by not in REPORT_GROUPS or REPORT_GROUPS[group_by][1] != "bp_spend":
            raise errors.validation("group_by must be one of key, user, team, model, operation")
        rows = await self._store.spend.daily(
            group_by, parse_time("start", start), parse_time("end", end), where
        )
        return [
            {
                "day": r["day"],
                "group": r["group_value"],
                "key_alias": r.get("key_alias"),
                **{k: _num(r[k]) for k in ("requests", "total_tokens", "cost")},
            }
            for r in rows
        ]

    async def limit_totals(self, limit: dict[str, Any]) -> dict[str, Any]:
        """A named limit's spend in its current budget period, when it has a budget."""
        spec = limit_spec("limit", limit["limit_id"], limit, float(limit["created_at"]))
        if spec is None or spec.max_budget is None:
            return {}
        _, start, end = spec.period(self._clock.time())
        return {
            "budget_period_spend": await self._store.spend.since("limit", limit["limit_id"], start),
            "budget_resets_at": None if end == float("inf") else iso(end),
        }

    async def key_totals(self, record: KeyRecord) -> dict[str, Any]:
        spent_all = await self._store.spend.since("key", record.key_id, 0.0)
        totals: dict[str, Any] = {"spend": spent_all}
        if record.spec.max_budget is not None:
            spec = LimitSpec(
                "key",
                record.key_id,
                max_budget=record.spec.max_budget,
                budget_seconds=_seconds(record.spec.budget_duration),
                anchor=record.created_at,
            )
            _, start, end = spec.period(self._clock.time())
            totals["budget_period_spend"] = await self._store.spend.since(
                "key", record.key_id, start
            )
            totals["budget_resets_at"] = None if end == float("inf") else iso(end)
        return totals


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
