"""The console's spend, limits and live pages: daily spend by model, team or key as SVG
charts and tables (and CSV exports that never run as formulas), budgets and rates as they
stand, and the traffic now."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from ....wire import errors
from ....wire.params import MAX_PAGE
from ..exports import csv_cell
from . import charts
from .base import ConsoleBase
from .doors import REACH
from .security import SECURITY_HEADERS
from .sessions import ConsoleSession

_GROUPS = ("model", "team", "key")
# The most rows a request export gathers before it asks for a narrower range.
_EXPORT_ROWS = 100_000


class SpendPages(ConsoleBase):
    async def _all_logs(self, query: dict[str, str]) -> list[dict[str, Any]]:
        """Every ledger row a query matches, page by page (an export is not a page)."""
        rows: list[dict[str, Any]] = []
        for page in range(1, _EXPORT_ROWS // MAX_PAGE + 1):
            found = await self._reports.logs({**query, "page": str(page), "size": str(MAX_PAGE)})
            rows += found["logs"]
            if page >= found["total_pages"]:
                return rows
        raise errors.validation(
            f"More than {_EXPORT_ROWS} requests match: narrow the dates, or use /spend/logs"
        )

    async def _spend_view(self, request: web.Request) -> dict[str, Any]:
        q = request.query
        by = q.get("by", "model")
        if by not in _GROUPS:
            raise errors.validation(f"by must be one of {', '.join(_GROUPS)}")
        metric = q.get("metric", "cost")
        if metric not in ("cost", "total_tokens"):
            raise errors.validation("metric must be cost or total_tokens")
        start = q.get("start") or _days_ago(30)
        end = q.get("end") or None
        where = {k: q[k] for k in ("team_id", "key_id") if q.get(k)}
        reach = request[REACH]
        if reach.scoped:  # a team-admin's teams, a member's own keys; a drill-down within
            where.update(reach.narrow({k: v for k, v in where.items() if k == "team_id"}))
            if "key_id" in where:
                found = await self._store.keys.by("key_id", where["key_id"])
                reach.check_key(found)
        daily = await self._reports.daily(by, start, end, **where)
        chart, names = _chart(daily, metric)
        top: dict[str, dict[str, Any]] = {}
        for row in daily:
            name = row["group"] or "-"
            total = top.setdefault(
                name, {"group": name, "requests": 0, "total_tokens": 0, "cost": 0.0}
            )
            if row.get("key_alias"):  # shown beside the key's id
                total["alias"] = row["key_alias"]
            total["requests"] += row["requests"] or 0
            total["total_tokens"] += row["total_tokens"] or 0
            total["cost"] += row["cost"] or 0.0
        table = sorted(top.values(), key=lambda r: (-r["cost"], r["group"]))
        return {
            "by": by,
            "metric": metric,
            "start": start,
            "end": end or "",
            "where": where,
            "chart": chart,
            "legend": charts.legend(names),
            "table": table,
            "total": sum(r["cost"] for r in table),
        }

    async def _spend(self, request: web.Request, session: ConsoleSession) -> web.Response:
        view = await self._spend_view(request)
        logs = None
        if "key_id" in view["where"]:
            logs = (
                await self._reports.logs(
                    {"key_id": view["where"]["key_id"], "start": view["start"], "size": "100"}
                )
            )["logs"]
        return self._render("spend.html", session=session, logs=logs, **view)

    async def _spend_csv(self, request: web.Request, session: ConsoleSession) -> web.Response:
        view = await self._spend_view(request)
        if request.query.get("table") == "requests" and "key_id" in view["where"]:
            columns = ("time", "request_id", "operation", "model", "status", "input_tokens",
                       "output_tokens", "total_tokens", "cost", "account", "region")  # fmt: skip
            rows = [
                [r.get(c) for c in columns]
                for r in await self._all_logs(
                    {"key_id": view["where"]["key_id"], "start": view["start"]}
                )
            ]
            return csv_response(f"requests-{view['where']['key_id']}", columns, rows)
        return csv_response(
            f"spend-by-{view['by']}",
            (view["by"], "requests", "total_tokens", "cost_usd"),
            [
                [r["group"], r["requests"], r["total_tokens"], f"{r['cost']:.10f}"]
                for r in view["table"]
            ],
        )

    async def _limits(self, request: web.Request, session: ConsoleSession) -> web.Response:
        listing = await self.keys.list({}, 1, 500, full=True)
        budgets = []
        for key in listing["keys"]:
            if key.get("max_budget") is None:
                continue
            record = await self.keys.find(key["key_id"])
            totals = await self._reports.key_totals(record)
            spent = totals.get("budget_period_spend", 0.0) or 0.0
            budgets.append(
                {
                    "key": key,
                    "spent": spent,
                    "limit": key["max_budget"],
                    "share": min(1.0, spent / key["max_budget"]) if key["max_budget"] else 1.0,
                    "resets": totals.get("budget_resets_at"),
                }
            )
        named = await self._store.limits.list()
        for limit in named:
            if limit.get("max_budget"):
                totals = await self._reports.limit_totals(limit)
                spent = totals.get("budget_period_spend", 0.0) or 0.0
                budgets.append(
                    {
                        "key": {"key_id": None, "key_alias": "limit " + limit["limit_id"]},
                        "spent": spent,
                        "limit": limit["max_budget"],
                        "share": min(1.0, spent / limit["max_budget"]),
                        "resets": totals.get("budget_resets_at"),
                    }
                )
        rates = []
        for key in listing["keys"]:
            if key.get("rpm_limit") or key.get("tpm_limit") or key.get("max_parallel_requests"):
                now = await self._current("key", key["key_id"]) if self._current else {}
                rates.append({"key": key, "now": now})
        return self._render(
            "limits.html",
            session=session,
            budgets=budgets,
            named=named,
            rates=rates,
            alerts=self._alerts,
        )

    async def _live_page(self, request: web.Request, session: ConsoleSession) -> web.Response:
        return self._render("live.html", session=session, live=self._live())

    async def _live_json(self, request: web.Request, session: ConsoleSession) -> web.Response:
        recent = await self._reports.logs({"size": "20"})
        data = {**self._live(), "recent": recent["logs"]}
        return web.json_response(data, headers=SECURITY_HEADERS)


def csv_response(name: str, columns: tuple[str, ...], rows: list[list[Any]]) -> web.Response:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    writer.writerows([csv_cell(v) for v in row] for row in rows)
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        headers={**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


def _chart(rows: list[dict[str, Any]], metric: str) -> tuple[str, list[str]]:
    days = sorted({r["day"] for r in rows})
    series: dict[str, dict[str, float]] = {}
    for row in rows:
        name = row["group"] or "-"
        value = float(row[metric] or 0)
        series.setdefault(name, {})[row["day"]] = series.get(name, {}).get(row["day"], 0.0) + value
    names = sorted(series, key=lambda n: -sum(series[n].values()))[:9]
    ordered = {n: series[n] for n in names}  # bars coloured in the legend's order
    if len(series) > len(names):  # the rest, as one series
        other: dict[str, float] = {}
        for name in series:
            if name not in ordered:
                for day, value in series[name].items():
                    other[day] = other.get(day, 0.0) + value
        ordered["other"] = other
        names.append("other")
    return charts.stacked_bars(days, ordered, "$" if metric == "cost" else "tokens"), names


def _days_ago(days: int) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%d")
