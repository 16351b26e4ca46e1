"""Asynchronous and batch jobs: which key started each, and whether its tokens are charged."""

from __future__ import annotations

from typing import Any

from ..wire.clock import SYSTEM_CLOCK, Clock
from .database import Database


class JobRepository:
    def __init__(self, db: Database, clock: Clock = SYSTEM_CLOCK) -> None:
        self._db = db
        self._clock = clock

    async def record(
        self,
        job_arn: str,
        key_id: str,
        model: str | None,
        output_uri: str | None = None,
        region: str | None = None,
    ) -> None:
        await self._db.execute(
            "INSERT INTO bp_jobs (job_arn, job_id, key_id, model, created_at, output_uri, region)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (job_arn) DO NOTHING",
            job_arn,
            job_arn.rsplit("/", 1)[-1],
            key_id,
            model,
            self._clock.time(),
            output_uri,
            region,
        )

    async def unsettled(self, limit: int) -> list[dict[str, Any]]:
        """Batch jobs whose tokens are not charged yet, oldest first."""
        return await self._db.fetch(
            "SELECT job_arn, job_id, key_id, model, output_uri, region FROM bp_jobs"
            " WHERE settled_at IS NULL AND output_uri IS NOT NULL ORDER BY created_at LIMIT $1",
            limit,
        )

    async def settle(self, job_arn: str) -> None:
        await self._db.execute(
            "UPDATE bp_jobs SET settled_at = $2 WHERE job_arn = $1", job_arn, self._clock.time()
        )

    async def owner(self, identifier: str) -> str | None:
        """The key that created a job, by its ARN or its id."""
        row = await self._db.fetchrow(
            "SELECT key_id FROM bp_jobs WHERE job_arn = $1 OR job_id = $2",
            identifier,
            identifier.rsplit("/", 1)[-1],
        )
        return row["key_id"] if row else None

    async def arn(self, job_id: str) -> str | None:
        row = await self._db.fetchrow("SELECT job_arn FROM bp_jobs WHERE job_id = $1", job_id)
        return row["job_arn"] if row else None

    async def owned(self, key_id: str, arns: list[str]) -> set[str]:
        """Which of these job ARNs the key created."""
        if not arns:
            return set()
        placeholders = ", ".join(f"${i + 2}" for i in range(len(arns)))
        rows = await self._db.fetch(
            f"SELECT job_arn FROM bp_jobs WHERE key_id = $1 AND job_arn IN ({placeholders})",
            key_id,
            *arns,
        )
        return {row["job_arn"] for row in rows}
