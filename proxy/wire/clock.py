"""Time, in one place: an injectable clock and the one timestamp format the API returns.

Limits, metering and the ledger read time through a ``Clock`` so tests can move it instead
of sleeping for a window or a flush; the default is the system's.
"""

from __future__ import annotations

import time as _time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (calendar windows, ledger rows, expiry)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (TTLs, intervals)."""
        ...


class SystemClock:
    """The system's clocks, as the C functions themselves: read on every request's path,
    where a Python method around each costs a frame."""

    __slots__ = ()
    time = staticmethod(_time.time)
    monotonic = staticmethod(_time.monotonic)


SYSTEM_CLOCK: Clock = SystemClock()


def iso(ts: float | None) -> str | None:
    """UTC, second or finer, with a ``Z``: ``2026-11-23T22:19:13Z`` (as AWS writes it)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def parse_iso(text: str) -> float:
    """The inverse of ``iso``; a naive time is read as UTC. Raises ValueError (not a time)
    or OverflowError (a time past what the platform represents)."""
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
