"""Every store call bounded in time, and every store failure one error value.

A store that is down, full or partitioned must cost a request a bounded wait and a 503 the
client may retry, never a traceback or a 500: ``GuardedDatabase`` wraps a backend, bounds
each call by ``timeout``, and turns whatever the backend raises (a refused or dropped
connection, a timeout, SQLite's "database or disk is full") into ``StoreUnavailable``. It
also keeps the store's health, which readiness and the metrics report and which callers
holding a cached answer read to serve it at once rather than wait out a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ..wire import errors
from .database import Database, RowBatch, StoreConflict

log = logging.getLogger("bedrock_proxy.store")

_T = TypeVar("_T")

# How long a caller holding an answer it read before (a key, the named limits) waits for
# the store to read it again (a healthy store answers in milliseconds) before it uses
# the answer as last read: what a slow or partitioned store costs a request for a known
# key, before the store is known to be down.
SLOW_READ = 1.0


class StoreUnavailable(errors.AwsError):
    """The store failed or did not answer within its deadline (a 503, with Retry-After)."""

    def __init__(self, cause: str) -> None:
        super().__init__(
            503,
            "ServiceUnavailableException",
            "The proxy's key and ledger store is unavailable; retry shortly",
            {"Retry-After": "1"},
        )
        self.cause = cause


class StoreHealth:
    """Up or down, as the last call found it: one warning when an outage starts, one line
    when it ends (not a traceback per failed call)."""

    __slots__ = ("_monotonic", "down_since", "failures", "last_cause")

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self.down_since: float | None = None
        self.failures = 0  # outages seen since start
        self.last_cause = ""

    @property
    def up(self) -> bool:
        return self.down_since is None

    def succeeded(self) -> None:
        if self.down_since is not None:
            log.warning("store available again after %.1f s", self._monotonic() - self.down_since)
            self.down_since = None

    def failed(self, cause: str) -> None:
        self.last_cause = cause
        if self.down_since is None:
            self.down_since = self._monotonic()
            self.failures += 1
            log.warning("store unavailable: %s (calls fail with 503 until it answers)", cause)


def describe(exc: BaseException) -> str:
    """The failure's type and first line: enough to tell a timeout from a full disk. The
    backends' messages name tables and values, never a credential or a row's content."""
    if isinstance(exc, TimeoutError):
        return "TimeoutError: no answer within the store deadline"
    text = str(exc).split("\n", 1)[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class GuardedDatabase(Database):
    """A backend with a deadline on every call and one failure type."""

    def __init__(self, inner: Database, timeout: float, health: StoreHealth | None = None):
        self.inner = inner
        self.dialect = inner.dialect
        self.timeout = timeout
        self.health = health or StoreHealth()

    async def _guard(self, work: Awaitable[_T], deadline: bool = True) -> _T:
        try:
            async with asyncio.timeout(self.timeout if deadline else None):
                result = await work
        except StoreConflict:
            self.health.succeeded()  # the store answered: it refused a duplicate
            raise
        except Exception as exc:
            cause = describe(exc)
            self.health.failed(cause)
            raise StoreUnavailable(cause) from None
        self.health.succeeded()
        return result

    async def connect(self) -> None:
        # At startup, like the migrations, and bounded by the backends themselves: SQLite
        # waits up to its busy_timeout for another worker's migration to end (a worker
        # started beside it would otherwise exit), asyncpg bounds each connection.
        await self._guard(self.inner.connect(), deadline=False)

    async def close(self) -> None:
        await self.inner.close()

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._guard(self.inner.execute(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return await self._guard(self.inner.fetch(sql, *args))

    async def insert_rows(self, batches: Sequence[RowBatch]) -> None:
        await self._guard(self.inner.insert_rows(batches))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """The backend's transaction, its start and its commit bounded and failing as
        StoreUnavailable; what the block raises is the block's own, after the rollback."""
        manager = self.inner.transaction()
        await self._guard(manager.__aenter__())
        try:
            yield
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await manager.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        await self._guard(manager.__aexit__(None, None, None))

    async def apply_migrations(self, migrations: list[tuple[int, Any]]) -> list[int]:
        # At startup, under a lock another replica may hold for a while: no deadline.
        return await self.inner.apply_migrations(migrations)
