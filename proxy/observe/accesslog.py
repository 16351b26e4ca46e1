"""One JSON line per request: what was called, by whom, how it went. Never a body or a key."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import IO, TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from ..exchange import Exchange


class AccessLog:
    """Lines written in the same event-loop turn go out in one write, at the end of it."""

    def __init__(self, enabled: bool = True, stream: IO[bytes] | None = None) -> None:
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._pending: list[bytes] = []

    def completed(self, x: Exchange) -> None:
        if not self.enabled:
            return
        entry: dict[str, Any] = {
            "request_id": x.request_id,
            "method": x.method,
            "status": x.status,
            "latency_ms": x.latency_ms,
            "bytes_in": x.bytes_in,
            "bytes_out": x.bytes_out,
        }
        op = x.operation
        if op is not None:
            entry["operation"] = op.name
            entry["service"] = op.service.name
        if x.model is not None:
            entry["model"] = x.model
        if x.identity is not None:
            entry["identity"] = x.identity.key_id or x.identity.kind
        if x.usage is not None and x.usage.found:
            entry["tokens"] = x.usage.total_tokens
            entry["cost"] = x.cost
        if x.upstream_request_id:
            entry["upstream_request_id"] = x.upstream_request_id
        if x.error:
            entry["error"] = x.error
        if x.incomplete:
            entry["incomplete"] = True
        self.write(entry)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record["ts"] = round(time.time() * 1000) / 1000  # (see Exchange.end)
        self._pending.append(orjson.dumps(record))
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop: write now
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        lines = self._pending
        self._pending = []
        lines.append(b"")
        try:
            self._stream.write(b"\n".join(lines))
            self._stream.flush()
        except (OSError, ValueError):  # a closed or full log pipe must not fail a request
            pass


class JsonFormatter(logging.Formatter):
    """Server logs as JSON lines, like the access log, so one parser reads both."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The AWS libraries narrate every lookup at INFO; only their warnings matter here.
    for name in ("botocore", "aiobotocore", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
