"""SQLite: zero setup, one file, WAL mode. Every call runs on one dedicated thread, so the
event loop never blocks on disk and the connection is only ever used from one thread."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from .database import Database, RowBatch, StoreConflict
from .migrations import statements

_T = TypeVar("_T")

# The sqlite3 module binds int, float, str and bytes directly, but sends every other value,
# None included, through its adaptation protocol, which for None fails two attribute
# lookups, formatting an AttributeError message for each: a ledger row binds 8-10 NULLs,
# and that was a third of the ledger writer's work (callgrind, 16,000 rows: 53.6k
# instructions a row, 36.8k with this). An adapter registered for None is found in the
# registry first; ``dict.get`` returns None for it in C.
sqlite3.register_adapter(type(None), cast(Callable[[None], None], {}.get))

_PLACEHOLDER = re.compile(r"\$(\d+)")
# The database whose transaction the running task is in (``transaction``).
_IN_TRANSACTION: contextvars.ContextVar[SqliteDatabase | None] = contextvars.ContextVar(
    "bedrock_proxy_sqlite_transaction", default=None
)
# Rows per multi-row INSERT: 256 rows of 27 columns stay well under SQLite's 32,766 bound
# parameters. A smaller remainder goes in power-of-two chunks, so a table has at most nine
# distinct statements to prepare and cache.
_CHUNK = 256


def _chunk_size(remaining: int) -> int:
    """256, or the largest power of two not above what remains."""
    return _CHUNK if remaining >= _CHUNK else 1 << (remaining.bit_length() - 1)


def _owner_only(path: str) -> None:
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except FileNotFoundError:
        pass


class SqliteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="bedrock-proxy-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._sql: dict[str, str] = {}
        self._transaction = asyncio.Lock()

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        # One connection: while a task holds a transaction on it, another task's calls
        # wait for its end rather than run inside it. (No lock taken otherwise: checking
        # and queueing to the one thread happen in one step of the loop.)
        if self._transaction.locked() and _IN_TRANSACTION.get() is not self:
            async with self._transaction:
                return await self._on_thread(fn, *args)
        return await self._on_thread(fn, *args)

    async def _on_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        if _IN_TRANSACTION.get() is self:  # nested: part of the enclosing one
            yield
            return
        async with self._transaction:
            token = _IN_TRANSACTION.set(self)
            try:
                await self._on_thread(self._statement, "BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    await asyncio.shield(self._on_thread(self._statement, "ROLLBACK"))
                    raise
                await self._on_thread(self._statement, "COMMIT")
            finally:
                _IN_TRANSACTION.reset(token)

    def _statement(self, sql: str) -> None:
        assert self._conn is not None
        self._conn.execute(sql)

    def _translate(self, sql: str) -> str:
        out = self._sql.get(sql)
        if out is None:
            out = self._sql[sql] = _PLACEHOLDER.sub(r"?\1", sql)
        return out

    async def connect(self) -> None:
        await self._run(self._connect)

    def _connect(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        # Owner-only, whatever the umask: the file holds token hashes and sealed secrets.
        # SQLite creates the -wal and -shm files with the database file's mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        _owner_only(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        for suffix in ("-wal", "-shm"):  # made by an older version with the umask's mode
            _owner_only(self.path + suffix)
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        # Its one thread has run the close: nothing is left to wait for on the loop.
        self._executor.shutdown(wait=False)

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._run(self._execute, self._translate(sql), args)

    def _execute(self, sql: str, args: tuple[Any, ...]) -> int:
        assert self._conn is not None
        try:
            return self._conn.execute(sql, args).rowcount
        except sqlite3.IntegrityError as exc:
            raise StoreConflict(str(exc)) from None

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return await self._run(self._fetch, self._translate(sql), args)

    async def insert_rows(self, batches: Sequence[RowBatch]) -> None:
        await self._run(self._insert_rows, batches)

    def _insert_rows(self, batches: Sequence[RowBatch]) -> None:
        """One transaction of multi-row ``INSERT ... VALUES``: binding is one C call per
        chunk and ``sqlite3_step`` runs the whole chunk with the GIL released. Measured
        per ledger row (27 columns, four indexes): 12-15 us of CPU, against 26-35 us for
        one JSON parameter unpacked with ``json_each``/``json_extract`` (which parses
        every row again per column) and a GIL hand-off per row for ``executemany`` (the
        event loop's thread holds the GIL, so each row waits out a switch interval)."""
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN")
        try:
            for batch in batches:
                rows = batch.rows
                start = 0
                while start < len(rows):
                    size = _chunk_size(len(rows) - start)
                    chunk = rows[start : start + size]
                    conn.execute(
                        self._values_sql(batch, size), list(itertools.chain.from_iterable(chunk))
                    )
                    start += size
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _values_sql(self, batch: RowBatch, rows: int) -> str:
        key = f"{batch.table}:{rows}:{batch.suffix}"
        sql = self._sql.get(key)
        if sql is None:
            one = "(" + ", ".join("?" * len(batch.columns)) + ")"
            sql = self._sql[key] = (
                f"INSERT INTO {batch.table} ({', '.join(batch.columns)}) VALUES "
                + ", ".join([one] * rows)
                + batch.suffix
            )
        return sql

    def _fetch(self, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        assert self._conn is not None
        return [dict(row) for row in self._conn.execute(sql, args).fetchall()]

    async def apply_migrations(self, migrations: list[tuple[int, Any]]) -> list[int]:
        return await self._run(self._apply, migrations)

    def _apply(self, migrations: list[tuple[int, Any]]) -> list[int]:
        conn = self._conn
        assert conn is not None
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bp_schema_migrations"
            " (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
        )
        applied: list[int] = []
        conn.execute("BEGIN IMMEDIATE")  # one migrator at a time across processes
        try:
            done = {r[0] for r in conn.execute("SELECT version FROM bp_schema_migrations")}
            for version, migration in migrations:
                if version in done:
                    continue
                for statement in statements(migration, self.dialect):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO bp_schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, time.time()),
                )
                applied.append(version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return applied
