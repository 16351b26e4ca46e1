"""The database under the repositories: a small protocol, one implementation per backend.

SQL is written once, PostgreSQL-style (``$1`` placeholders); the SQLite backend translates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from .migrations import MIGRATIONS


class StoreConflict(Exception):
    """A unique value (such as a key alias) is already taken."""


@dataclass(frozen=True, slots=True)
class RowBatch:
    """Rows for one table, each a tuple in ``columns`` order. ``types`` names the SQL type
    of the columns that are not text (a backend that ships rows as JSON casts with it);
    ``suffix`` follows the INSERT (an ``ON CONFLICT`` clause)."""

    table: str
    columns: tuple[str, ...]
    rows: Sequence[tuple[Any, ...]]
    types: Mapping[str, str] = field(default_factory=dict)
    suffix: str = ""


class Database(ABC):
    dialect: str

    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; return the number of rows it changed."""

    @abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]: ...

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[None]:
        """Every call this task makes inside the block runs in one transaction: committed
        when the block ends, rolled back when it raises (an audited change and its audit
        row, together or not at all). Nested blocks are part of the outer one."""

    @abstractmethod
    async def insert_rows(self, batches: Sequence[RowBatch]) -> None:
        """Insert many rows into one or more tables at once (the ledger's batches): the
        cheapest way each backend has, since the ledger writes a row per request."""

    @abstractmethod
    async def apply_migrations(self, migrations: list[tuple[int, Any]]) -> list[int]:
        """Apply the migrations not yet recorded, under a lock; return those applied."""

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def ping(self) -> None:
        await self.fetch("SELECT 1 AS ok")

    async def migrate(self) -> list[int]:
        return await self.apply_migrations(MIGRATIONS)

    async def page(
        self,
        table: str,
        columns: str,
        filter_columns: tuple[str, ...],
        filters: dict[str, str],
        where: list[str],
        args: list[Any],
        order: str,
        limit: int,
        offset: int,
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of a table, filtered by equality on the given columns, and the total."""
        for column in filter_columns:
            if filters.get(column) is not None:
                args.append(filters[column])
                where.append(f"{column} = ${len(args)}")
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        total = await self.fetchrow(f"SELECT COUNT(*) AS n FROM {table}{clause}", *args)
        rows = await self.fetch(
            f"SELECT {columns} FROM {table}{clause} ORDER BY {order}"
            f" LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}",
            *args,
            limit,
            offset,
        )
        return rows, int(total["n"]) if total else 0
