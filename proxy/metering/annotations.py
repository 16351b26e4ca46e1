"""Spend annotations clients attach as headers (Pay-i's ``xProxy-*`` and our own
``x-bedrock-proxy-*``). They are recorded in the ledger and never sent upstream: the
upstream allow-list in ``headers`` does not include them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

# field -> header suffixes, after the "xproxy-" or "x-bedrock-proxy-" prefix.
_FIELDS = {
    "end_user_id": "user-id",
    "account_name": "account-name",
    "use_case_name": "usecase-name",
    "use_case_id": "usecase-id",
    "use_case_version": "usecase-version",
    "use_case_step": "usecase-step",
    "limit_ids": "limit-ids",
    "tags": "request-tags",
    "properties": "request-properties",
    "logging_disabled": "logging-disable",
}
_PREFIXES = ("xproxy-", "x-bedrock-proxy-")
_LISTS = ("limit_ids", "tags")
_MAX_VALUE = 1024


def read_annotations(headers: Mapping[str, str]) -> dict[str, Any]:
    """The annotations present; empty for the common request that has none."""
    found: dict[str, Any] = {}
    for name, value in headers.items():
        lname = name.lower()
        if not lname.startswith(_PREFIXES):  # nearly every header: one test, not two
            continue
        for prefix in _PREFIXES:
            if lname.startswith(prefix):
                suffix = lname[len(prefix) :].replace("_", "-")
                for field, expected in _FIELDS.items():
                    if suffix == expected or suffix == expected.replace("usecase", "use-case"):
                        found[field] = _value(field, value[:_MAX_VALUE])
                break
    return found


def _value(field: str, value: str) -> Any:
    if field in _LISTS:
        return [item.strip() for item in value.split(",") if item.strip()][:32]
    if field == "logging_disabled":
        return value.strip().lower() in ("1", "true", "yes")
    if field == "properties":
        try:
            parsed = orjson.loads(value)
            return parsed if isinstance(parsed, dict) else value
        except orjson.JSONDecodeError:
            return value
    return value.strip()
