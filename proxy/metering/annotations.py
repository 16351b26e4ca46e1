"""Spend annotations clients attach as headers (Pay-i's ``xProxy-*`` and our own
``x-bedrock-proxy-*``). They are recorded in the ledger and never sent upstream: the
upstream allow-list in ``headers`` does not include them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from ..wire.headers import ANNOTATION_PREFIXES

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
_LISTS = ("limit_ids", "tags")
_MAX_VALUE = 1024


def read_annotations(headers: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The annotations in ``headers`` (lower-case names, each with one of
    ``ANNOTATION_PREFIXES``: see ``sort_request_headers``); empty for the common request."""
    found: dict[str, Any] = {}
    for lname, value in headers:
        for prefix in ANNOTATION_PREFIXES:
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
