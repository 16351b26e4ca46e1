"""The key and ledger store: SQLite by default, PostgreSQL when a database URL is set."""

from __future__ import annotations

from .base import Store


def open_store(database_url: str | None, sqlite_path: str, pool_size: int = 10) -> Store:
    if database_url:
        from .postgres import PostgresStore

        return PostgresStore(database_url, max_size=pool_size)
    from .sqlite import SqliteStore

    return SqliteStore(sqlite_path)


__all__ = ["Store", "open_store"]
