"""The audit log: who changed what, when, from where, with the fields before and after.

Append-only and tamper-evident: each row carries the SHA-256 of the row before it and of
its own content (``chain_hash``), so editing, inserting or deleting a row in the middle
breaks the chain from there on, which ``verify`` finds (``bedrock-proxy audit verify``).
Rows are appended in the transaction of the change they record (``recording``): no
change without its row, and no row without its change. Retention deletes the oldest rows
only; the chain is then checked from the oldest row kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..wire.clock import SYSTEM_CLOCK, Clock
from .database import Database
from .guard import StoreUnavailable

# pg_advisory_xact_lock key: one appender at a time across every replica (the chain is a
# sequence). SQLite's BEGIN IMMEDIATE already serialises writers.
_AUDIT_LOCK = 0x62_70_61_75_64  # "bpaud"
GENESIS = "0" * 64
_COLUMNS = (
    "seq, ts, actor, actor_kind, email, source, request_id, action, target, before, after,"
    " prev_hash, hash"
)
FILTERS = ("actor", "action", "target", "actor_kind")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change: the master key, a user signed in by single sign-on, an admin
    API token, a virtual key (its own), or the proxy itself."""

    kind: str  # "master", "user", "token", "key" or "system"
    name: str  # "master", the user's subject, the token's id, the key's id
    email: str | None = None
    source: str | None = None  # the client's address
    request_id: str | None = None


SYSTEM = Actor("system", "bedrock-proxy")


@dataclass(slots=True)
class Change:
    """One audited change, filled in as it is made: the row it becomes."""

    actor: Actor
    action: str  # "key.generate", "team.update", "token.revoke", "signin.failed", ...
    target: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """The row's hash: its content (every column but the hashes, keys sorted) chained to
    the hash of the row before."""
    content = {k: v for k, v in row.items() if k not in ("prev_hash", "hash")}
    payload = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(prev_hash.encode() + b"\n" + payload).hexdigest()


class AuditRepository:
    def __init__(self, db: Database, clock: Clock = SYSTEM_CLOCK) -> None:
        self._db = db
        self._clock = clock

    @contextlib.asynccontextmanager
    async def recording(self, change: Change) -> AsyncIterator[Change]:
        """Make the change inside the block; its row is appended in the same transaction
        when the block ends (set ``change.after`` and the target there)."""
        async with self._db.transaction():
            yield change
            await self._append(change)

    async def append(self, change: Change) -> int:
        """A row on its own (a sign-in, a refused one)."""
        async with self._db.transaction():
            return await self._append(change)

    async def _append(self, change: Change) -> int:
        if self._db.dialect == "postgres":
            await self._db.execute("SELECT pg_advisory_xact_lock($1)", _AUDIT_LOCK)
        last = await self._db.fetchrow("SELECT seq, hash FROM bp_audit ORDER BY seq DESC LIMIT 1")
        seq = int(last["seq"]) + 1 if last else 1
        prev = last["hash"] if last else GENESIS
        actor = change.actor
        row: dict[str, Any] = {
            "seq": seq,
            "ts": self._clock.time(),
            "actor": actor.name,
            "actor_kind": actor.kind,
            "email": actor.email,
            "source": actor.source,
            "request_id": actor.request_id,
            "action": change.action,
            "target": change.target,
            "before": _json(change.before),
            "after": _json({**(change.after or {}), **change.extra} or None),
            "prev_hash": prev,
        }
        row["hash"] = chain_hash(prev, row)
        await self._db.execute(
            f"INSERT INTO bp_audit ({_COLUMNS}) VALUES"
            " ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            *row.values(),
        )
        return seq

    async def page(
        self,
        filters: dict[str, str],
        since: float | None,
        until: float | None,
        size: int,
        page: int,
    ) -> tuple[list[dict[str, Any]], int]:
        where: list[str] = []
        args: list[Any] = []
        for bound, op in ((since, ">="), (until, "<")):
            if bound is not None:
                args.append(bound)
                where.append(f"ts {op} ${len(args)}")
        rows, total = await self._db.page(
            "bp_audit", _COLUMNS, FILTERS, filters, where, args, "seq DESC", size, (page - 1) * size
        )
        return [_decoded(r) for r in rows], total

    async def rows_after(self, seq: int, limit: int) -> list[dict[str, Any]]:
        """Rows in order, from after ``seq`` (the verifier and exports read in pages)."""
        return await self._db.fetch(
            f"SELECT {_COLUMNS} FROM bp_audit WHERE seq > $1 ORDER BY seq LIMIT $2", seq, limit
        )

    async def prune(self, before: float) -> int:
        """Retention: delete rows older than ``before`` (the oldest first, so the chain
        left is whole from its new first row)."""
        return await self._db.execute("DELETE FROM bp_audit WHERE ts < $1", before)

    async def retain(self, days: float) -> None:
        """Retention, run for the process's life: rows older than ``days`` deleted at
        start and hourly (the oldest first), each pruning recorded as a row of its own."""
        while True:
            try:
                deleted = await self.prune(self._clock.time() - days * 86400)
                if deleted:
                    await self.append(Change(SYSTEM, "audit.prune", after={"deleted": deleted}))
            except StoreUnavailable:
                pass  # the next hour's pruning catches up
            await asyncio.sleep(3600)

    async def verify(self, page_size: int = 1000) -> tuple[int, int | None]:
        """(rows checked, the first row whose chain is broken, or None)."""
        checked, seq, prev = 0, 0, None
        while True:
            rows = await self.rows_after(seq, page_size)
            if not rows:
                return checked, None
            for row in rows:
                expected = row["prev_hash"] if prev is None else prev
                if row["prev_hash"] != expected or chain_hash(expected, row) != row["hash"]:
                    return checked, int(row["seq"])
                if prev is not None and int(row["seq"]) != seq + 1:
                    return checked, int(row["seq"])  # a row deleted from the middle
                prev, seq = row["hash"], int(row["seq"])
                checked += 1


def _json(value: dict[str, Any] | None) -> str | None:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode() if value else None


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for name in ("before", "after"):
        out[name] = orjson.loads(out[name]) if out[name] else None
    return out
