"""Batch jobs are charged when they complete, from their own output.

A CreateModelInvocationJob call costs nothing when it is made; the tokens are consumed
hours later, and Bedrock writes their count to the job's ``manifest.json.out`` beside its
output. One replica at a time (each poll is claimed, in Redis when configured) looks at the
jobs not yet charged, reads the manifest of each that has ended, and charges its key —
budget, user, team and named limits — with one ledger row whose request id is the job ARN,
so a job is charged once however many replicas see it end. Batch inference is billed at
half the on-demand price (``batch_discount``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import orjson

from ..store import StoreUnavailable
from ..wire.background import stop as stop_task
from .usage import Usage

log = logging.getLogger("bedrock_proxy.batches")

_ENDED = frozenset({"Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired"})
_PER_POLL = 100

# (region, path, the job's ARN: whose account answers) -> (status, body)
ControlGet = Callable[[str, str, str], Awaitable[tuple[int, bytes]]]
# (region, bucket, key, the job's ARN) -> (status, body)
S3Get = Callable[[str, str, str, str], Awaitable[tuple[int, bytes]]]
Charge = Callable[[dict[str, Any], Usage], Awaitable[None]]
ClaimOnce = Callable[[str, float], Awaitable[bool]]


class BatchSettler:
    def __init__(
        self,
        store: Any,
        control_get: ControlGet,
        s3_get: S3Get,
        charge: Charge,
        claim_once: ClaimOnce,
        default_region: str,
        interval: float = 60.0,
    ) -> None:
        self._store = store
        self._control_get = control_get
        self._s3_get = s3_get
        self._charge = charge
        self._claim = claim_once
        self._region = default_region
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        await stop_task(self._task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            tick = int(time.time() // self.interval)
            try:
                if await self._claim(f"batch-poll:{tick}", self.interval * 2):
                    await self.poll()
            except StoreUnavailable:  # the store's outage is logged once, by its health
                log.debug("batch settlement waits for the store")
            except Exception as exc:  # the next poll tries again
                log.error("batch settlement failed: %s: %s", type(exc).__name__, exc)

    async def poll(self) -> int:
        """Charge every ended job among the oldest unsettled ones; how many were."""
        settled = 0
        for job in await self._store.jobs.unsettled(_PER_POLL):
            if await self._settle(job):
                settled += 1
        return settled

    async def _settle(self, job: dict[str, Any]) -> bool:
        region = job.get("region") or self._region
        status, body = await self._control_get(
            region, "/model-invocation-job/" + quote(job["job_arn"], safe=""), job["job_arn"]
        )
        if status == 404:
            await self._store.jobs.settle(job["job_arn"])  # gone: nothing will ever be read
            return False
        if status != 200:
            return False
        state = orjson.loads(body).get("status")
        if state not in _ENDED:
            return False
        usage = await self._manifest_usage(region, job)
        if usage is not None:
            await self._charge(job, usage)
        await self._store.jobs.settle(job["job_arn"])
        return True

    async def _manifest_usage(self, region: str, job: dict[str, Any]) -> Usage | None:
        """The token counts Bedrock wrote for the job, or None when it wrote none."""
        uri: str = job["output_uri"]
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        status, body = await self._s3_get(
            region, bucket, f"{prefix}{job['job_id']}/manifest.json.out", job["job_arn"]
        )
        if status != 200:
            log.warning("no manifest for batch job %s (S3 answered %d)", job["job_arn"], status)
            return None
        try:
            manifest = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return Usage(
            input_tokens=int(manifest.get("inputTokenCount") or 0),
            output_tokens=int(manifest.get("outputTokenCount") or 0),
            found=True,
        )
