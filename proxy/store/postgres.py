"""PostgreSQL through an asyncpg pool, for replicas that share keys and the ledger."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import orjson

from .database import Database, RowBatch, StoreConflict
from .migrations import statements

# pg_advisory_xact_lock key: one migrator at a time across every replica.
_MIGRATION_LOCK = 0x62_70_6D_69_67  # "bpmig"
# The database and connection of the transaction the running task is in.
_IN_TRANSACTION: contextvars.ContextVar[tuple[PostgresDatabase, Any] | None] = (
    contextvars.ContextVar("bedrock_proxy_postgres_transaction", default=None)
)


class _QuietReconnects(logging.Filter):
    """asyncpg logs a traceback each time its pool fails to reconnect, every few seconds
    of an outage; the store's health already said when the outage began and will say when
    it ends, in one line each."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to restore the pool connection floor")


logging.getLogger("asyncpg.pool").addFilter(_QuietReconnects())


class PostgresDatabase(Database):
    dialect = "postgres"

    def __init__(
        self, url: str, min_size: int = 1, max_size: int = 10, timeout: float = 3.0
    ) -> None:
        self.url = url
        self._min = min_size
        self._max = max_size
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None

    async def connect(self) -> None:
        # asyncpg waits 60 s for a connection by default, and a partitioned server never
        # refuses one: every new connection (the pool's reconnects too) gets the store's
        # deadline, and so does every command (``guard`` bounds the whole call as well).
        self._pool = await asyncpg.create_pool(
            self.url,
            min_size=self._min,
            max_size=self._max,
            timeout=self._timeout,
            command_timeout=self._timeout,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _target(self) -> Any:
        """The transaction's connection for a task inside one, the pool otherwise."""
        current = _IN_TRANSACTION.get()
        if current is not None and current[0] is self:
            return current[1]
        assert self._pool is not None
        return self._pool

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        current = _IN_TRANSACTION.get()
        if current is not None and current[0] is self:  # nested: part of the enclosing one
            yield
            return
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            token = _IN_TRANSACTION.set((self, conn))
            try:
                yield
            finally:
                _IN_TRANSACTION.reset(token)

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            status = await self._target().execute(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            raise StoreConflict(str(exc)) from None
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._target().fetch(sql, *args)]

    async def insert_rows(self, batches: Sequence[RowBatch]) -> None:
        """Each table's rows as one JSON parameter unpacked by PostgreSQL: binding 25
        parameters per row would hold the event loop (asyncpg encodes on it) per row."""
        # One transaction: a reader never sees a request's row without its labels.
        async with self.transaction():
            for batch in batches:
                if batch.rows:
                    # (Rows may be named tuples, which orjson serialises only as plain ones.)
                    rows = orjson.dumps(batch.rows, default=tuple).decode()
                    await self.execute(_json_insert(batch), rows)

    async def apply_migrations(self, migrations: list[tuple[int, Any]]) -> list[int]:
        assert self._pool is not None
        applied: list[int] = []
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS bp_schema_migrations"
                " (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            done = {
                r["version"] for r in await conn.fetch("SELECT version FROM bp_schema_migrations")
            }
            for version, migration in migrations:
                if version in done:
                    continue
                for statement in statements(migration, self.dialect):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO bp_schema_migrations (version, applied_at) VALUES ($1, $2)",
                    version,
                    time.time(),
                )
                applied.append(version)
        return applied


def _json_insert(batch: RowBatch) -> str:
    values = ", ".join(
        f"(r->>{i})::{batch.types.get(column, 'text')}" for i, column in enumerate(batch.columns)
    )
    return (
        f"INSERT INTO {batch.table} ({', '.join(batch.columns)}) SELECT {values}"
        f" FROM json_array_elements($1::json) AS rows(r){batch.suffix}"
    )
