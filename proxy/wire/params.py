"""Admin and query parameters, range-checked the same way everywhere.

Numbers past these bounds mean nothing, and stores, Redis and ``datetime`` have limits of
their own that would otherwise surface as a 500; every refusal is a ValidationException.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from . import errors

MAX_DURATION_SECONDS = 100 * 366 * 86400
MAX_LIMIT = 10**12
MAX_PAGE = 1000
MAX_PAGE_NUMBER = 1_000_000
# The fields that make a limit, on a key, a user, a team or a named limit alike.
LIMIT_FIELDS = ("max_budget", "budget_duration", "rpm_limit", "tpm_limit", "max_parallel_requests")
_DURATION_RE = re.compile(r"(\d+)\s*(s|m|h|d|w)")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(name: str, text: str) -> int:
    """'30s', '15m', '12h', '30d', '2w' (or combinations like '1d12h') → seconds."""
    text = text.strip().lower()
    total, pos = 0, 0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or total <= 0:
        raise errors.validation(f"{name}: {text!r} is not a duration like 30d, 12h or 15m")
    if total > MAX_DURATION_SECONDS:
        raise errors.validation(f"{name}: {text!r} is longer than 100 years")
    return total


def number_field(name: str, value: Any, kind: type) -> Any:
    """A non-negative number up to MAX_LIMIT, whole when ``kind`` is int; None passes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise errors.validation(f"{name} must be a non-negative number")
    if not value <= MAX_LIMIT:  # also false for NaN
        raise errors.validation(f"{name} must be at most {MAX_LIMIT}")
    if kind is int and int(value) != value:
        raise errors.validation(f"{name} must be a whole number")
    return kind(value)


def paging(query: Mapping[str, str]) -> tuple[int, int]:
    """``page`` and ``size`` from a query, range-checked (every admin listing pages alike)."""
    text_page, text_size = query.get("page", "1"), query.get("size", "100")
    if not (text_page.isdigit() and text_size.isdigit()) or len(text_page + text_size) > 12:
        raise errors.validation("page and size must be whole numbers")
    page, size = int(text_page), int(text_size)
    check_page(page, size)
    return page, size


def check_page(page: int, size: int) -> None:
    if not 1 <= page <= MAX_PAGE_NUMBER or not 1 <= size <= MAX_PAGE:
        raise errors.validation(
            f"page must be between 1 and {MAX_PAGE_NUMBER} and size between 1 and {MAX_PAGE}"
        )
