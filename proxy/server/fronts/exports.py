"""Exports operators open in a spreadsheet (the console's CSVs, the audit log's)."""

from __future__ import annotations

from typing import Any

import orjson

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
