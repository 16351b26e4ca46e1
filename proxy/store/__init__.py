"""The store: keys, spend, named limits, jobs and teams, as repositories over one database
(SQLite by default, PostgreSQL when a database URL is set)."""

from __future__ import annotations

from ..wire.clock import SYSTEM_CLOCK, Clock
from .admin_tokens import AdminTokenRepository
from .audit import AuditRepository
from .database import Database, StoreConflict
from .directory import DirectoryRepository
from .guard import SLOW_READ, GuardedDatabase, StoreHealth, StoreUnavailable
from .jobs import JobRepository
from .keys import KeyRepository
from .limits import LimitRepository
from .owned import OwnedSessionRepository
from .sessions import SessionRepository
from .spend import SpendRepository
from .teams import TeamRepository


class Store:
    def __init__(self, db: Database, clock: Clock = SYSTEM_CLOCK, timeout: float = 3.0) -> None:
        # Every repository's calls bounded by ``timeout``, failing as StoreUnavailable.
        guarded = self.db = GuardedDatabase(db, timeout)
        self.health: StoreHealth = guarded.health
        self.keys = KeyRepository(guarded, clock)
        self.spend = SpendRepository(guarded)
        self.limits = LimitRepository(guarded, clock)
        self.jobs = JobRepository(guarded, clock)
        self.teams = TeamRepository(guarded, clock)
        self.sessions = SessionRepository(guarded)
        self.owned = OwnedSessionRepository(guarded, clock)
        self.audit = AuditRepository(guarded, clock)
        self.admin_tokens = AdminTokenRepository(guarded)
        self.directory = DirectoryRepository(guarded, clock)

    @property
    def dialect(self) -> str:
        return self.db.dialect

    async def open(self) -> None:
        """Connect and apply pending migrations."""
        await self.db.connect()
        await self.db.migrate()

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> None:
        await self.db.ping()


def open_store(
    database_url: str | None,
    sqlite_path: str,
    pool_size: int = 10,
    clock: Clock = SYSTEM_CLOCK,
    timeout: float = 3.0,
) -> Store:
    """The store on its backend; every call is bounded by ``timeout`` seconds."""
    db: Database
    if database_url:
        from .postgres import PostgresDatabase

        db = PostgresDatabase(database_url, max_size=pool_size, timeout=timeout)
    else:
        from .sqlite import SqliteDatabase

        db = SqliteDatabase(sqlite_path)
    return Store(db, clock, timeout)


__all__ = [
    "SLOW_READ",
    "Database",
    "Store",
    "StoreConflict",
    "StoreHealth",
    "StoreUnavailable",
    "open_store",
]
