"""Budget alerts: a webhook when a key, user, team or named limit crosses 80 % and 100 % of
its budget, once per budget period.

"Once" holds across replicas: the first to see a crossing claims it (in Redis when
configured, in-process otherwise). Delivery runs in the background with retries and a
timeout, so an alert never delays or fails a request; one that cannot be delivered is
logged. The body is JSON, or Slack's ``{"text": …}`` with ``alert_webhook_format: slack``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from ..wire.clock import iso
from .limits import LimitSpec

log = logging.getLogger("bedrock_proxy.alerts")

THRESHOLDS = (0.8, 1.0)
_ATTEMPTS = 4
_TIMEOUT = 10.0

ClaimOnce = Callable[[str, float], Awaitable[bool]]


class BudgetAlerts:
    def __init__(
        self,
        url: str,
        claim_once: ClaimOnce,
        slack: bool = False,
        backoff: float = 1.0,
    ) -> None:
        self._url = url
        self._claim = claim_once
        self._slack = slack
        self._backoff = backoff
        self._session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.delivered = 0

    async def spent(self, spec: LimitSpec, before: float, after: float) -> None:
        """A budget's spend went from ``before`` to ``after``: alert on each threshold crossed."""
        budget = spec.max_budget
        if not budget:
            return
        now = time.time()
        index, _, end = spec.period(now)
        for threshold in THRESHOLDS:
            if before < threshold * budget <= after:
                ttl = (end - now if not math.isinf(end) else 400 * 86400) + 86400
                name = f"alert:{spec.scope}:{spec.id}:{index}:{threshold}"
                if await self._claim(name, ttl):
                    self._send(self._body(spec, threshold, after, end))

    def _body(self, spec: LimitSpec, threshold: float, spent: float, end: float) -> dict[str, Any]:
        resets = None if math.isinf(end) else iso(end)
        alert = {
            "event": "budget_exceeded" if threshold >= 1.0 else "budget_threshold",
            "threshold": threshold,
            "scope": spec.scope,
            "id": spec.id,
            "max_budget": spec.max_budget,
            "spent": round(spent, 10),
            "period_resets_at": resets,
        }
        if not self._slack:
            return alert
        text = (
            f"bedrock-proxy: {spec.scope} {spec.id} has spent ${spent:.4f} of its "
            f"${spec.max_budget:.4f} budget ({threshold:.0%} reached)"
            + (f"; the period resets at {resets}" if resets else "")
        )
        return {"text": text, "alert": alert}

    def _send(self, body: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(body))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _deliver(self, body: dict[str, Any]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_TIMEOUT))
        for attempt in range(_ATTEMPTS):
            try:
                async with self._session.post(self._url, json=body) as response:
                    if response.status < 300:
                        self.delivered += 1
                        return
                    reason = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = type(exc).__name__
            if attempt + 1 < _ATTEMPTS:
                await asyncio.sleep(self._backoff * 2**attempt)
        alert = body.get("alert", body)
        log.error("budget alert for %s %s not delivered: %s", alert["scope"], alert["id"], reason)

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=_TIMEOUT)
        if self._session is not None:
            await self._session.close()
