"""Stopping the process's background loops (ledger writer, health sync, refreshers)."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("bedrock_proxy")


async def stop(task: asyncio.Task[None] | None, timeout: float = 5.0) -> None:
    """Cancel a background loop and wait for its end, at most ``timeout`` seconds.

    Cancelled again at every wait: a client library that swallows the CancelledError
    inside a call (redis-py can, mid-command, turning it into a connection error the
    loop logs and carries on from) leaves the task looping, and a shutdown awaiting it
    waited for ever (a replica's Redis health sync held a test's teardown for 30 s).
    """
    if task is None or task.done():
        return
    loop = asyncio.get_running_loop()
    until = loop.time() + timeout
    while not task.done() and loop.time() < until:
        task.cancel()
        await asyncio.wait([task], timeout=0.1)
    if not task.done():
        log.warning("a background task did not stop within %g s: %r", timeout, task)
    elif not task.cancelled() and task.exception() is not None:
        log.warning("a background task ended with %r", task.exception())
