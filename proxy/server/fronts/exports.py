"""Exports operators open in a spreadsheet or ship elsewhere (the console's CSVs, the
audit log's CSV and JSON lines, from the admin API and the console alike)."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

import orjson

from ...metering.reports import parse_time
from ...store import Store
from ...store.audit import FILTERS
from ...wire import errors

# What a spreadsheet reads as a formula at the start of a cell (OWASP's list).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A value as an export cell. Text a key holder chose (an alias, a user, a model id the
    ledger kept although AWS refused it) must not run as a formula in the operator's
    spreadsheet: text that starts like one is prefixed with a quote, shown as text. A
    mapping is one JSON cell."""
    if value is None:
        return ""
    if isinstance(value, dict):
        value = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


_AUDIT_COLUMNS = (
    "seq", "ts", "actor", "actor_kind", "email", "source", "request_id", "action", "target",
    "before", "after", "prev_hash", "hash",
)  # fmt: skip
_EXPORT_PAGE = 500
# The most rows one export gathers (an export is not a page; narrow the dates past it).
_EXPORT_ROWS = 100_000


async def audit_rows(store: Store, query: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every audit row the query's filters and dates match, newest first, page by page."""
    filters = {k: query[k] for k in FILTERS if query.get(k)}
    since = parse_time("start", query.get("start") or None)
    until = parse_time("end", query.get("end") or None)
    rows: list[dict[str, Any]] = []
    for page in range(1, _EXPORT_ROWS // _EXPORT_PAGE + 1):
        found, total = await store.audit.page(filters, since, until, _EXPORT_PAGE, page)
        rows += found
        if len(rows) >= total:
            return rows
    raise errors.validation(f"More than {_EXPORT_ROWS} rows match: narrow the dates")


def audit_file(rows: list[dict[str, Any]], kind: str) -> tuple[bytes, str]:
    """The rows as an export: JSON lines, or CSV with no cell a spreadsheet runs."""
    if kind == "jsonl":
        return b"".join(orjson.dumps(r) + b"\n" for r in rows), "application/x-ndjson"
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(_AUDIT_COLUMNS)
    writer.writerows([csv_cell(r.get(c)) for c in _AUDIT_COLUMNS] for r in rows)
    return out.getvalue().encode(), "text/csv"
