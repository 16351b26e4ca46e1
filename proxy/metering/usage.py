"""Token usage, read from responses as they stream past, without changing a byte.

A meter sees the response headers and then the same chunks the client gets (whole frames,
for event streams). It keeps O(1) state per stream: the one frame or field that will hold
the usage, decoded only at the end.
"""

from __future__ import annotations

import base64
import contextlib
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import MultiMapping

from ..wire.eventstream import decode_headers
from ..wire.modelids import arn_model_id
from ..wire.strictjson import parse_strict

_PRELUDE = struct.Struct(">II")
# A JSON response body bigger than this is not kept for its usage field.
_MAX_JSON_BODY = 8 * 1024 * 1024


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    # Of the cache writes, those kept for an hour (Anthropic's API reports them apart;
    # they cost more than 5-minute writes).
    cache_write_1h_tokens: int = 0
    # Guardrail policy units, by policy.
    guardrail_units: dict[str, int] = field(default_factory=dict)
    # CountTokens answers a count and costs nothing.
    free: bool = False
    # False when the response that would carry usage was never seen.
    found: bool = False
    # True when the counts are the proxy's estimate, not the upstream's (a cut stream).
    estimated: bool = False
    # The model that consumed the tokens, when the response says and the request did not
    # (an agent's foundation model, from its trace).
    model: str | None = None
    # Rerank queries billed (one per search query per 100 document chunks).
    queries: int = 0

    @property
    def total_tokens(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "total_tokens": self.total_tokens,
        }


class Meter:
    """Default: an operation that is counted as a request, with no tokens."""

    __slots__ = ("usage",)
    # Whether the request body says what is billed (``on_request`` is then called).
    reads_request = False
    # Work the relay awaits before passing on what was just fed (a stream's first event
    # names stored state the client may read at once): set by a meter, taken by the relay.
    due: Callable[[], Awaitable[None]] | None = None

    def __init__(self) -> None:
        self.usage = Usage()

    def on_request(self, body: bytes) -> None:
        """The request body, for a meter that ``reads_request``; raises AwsError (400)
        when it cannot be read strictly, since what it bills could not be counted."""

    def on_headers(self, status: int, headers: MultiMapping[str]) -> None:
        pass

    def feed(self, data: bytes) -> None:
        pass

    def finish(self) -> Usage:
        return self.usage

    async def run_due(self) -> None:
        """Await what ``due`` holds, once."""


class JsonBodyMeter(Meter):
    """Converse, ApplyGuardrail, CountTokens: usage is a field of the JSON body."""

    __slots__ = ("_chunks", "_ok", "_size")

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []
        self._size = 0
        self._ok = False

    def on_headers(self, status: int, headers: MultiMapping[str]) -> None:
        self._ok = status == 200

    def feed(self, data: bytes) -> None:
        if self._ok and self._size <= _MAX_JSON_BODY:
            self._chunks.append(data)
            self._size += len(data)

    def finish(self) -> Usage:
        if not self._ok or not self._chunks or self._size > _MAX_JSON_BODY:
            return self.usage
        try:
            document = orjson.loads(
                b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
            )
        except orjson.JSONDecodeError:
            return self.usage
        if isinstance(document, dict):
            self.read(document)
        return self.usage

    def read(self, document: dict[str, Any]) -> None:
        _converse_usage(self.usage, document.get("usage"))


class GuardrailMeter(JsonBodyMeter):
    __slots__ = ()

    def read(self, document: dict[str, Any]) -> None:
        units = document.get("usage")
        if isinstance(units, dict):
            self.usage.guardrail_units = {k: int(v) for k, v in units.items() if isinstance(v, int)}
            self.usage.found = True


class CountTokensMeter(JsonBodyMeter):
    __slots__ = ()

    def read(self, document: dict[str, Any]) -> None:
        self.usage.free = True
        if isinstance(document.get("inputTokens"), int):
            self.usage.input_tokens = document["inputTokens"]
            self.usage.found = True


class InvokeHeadersMeter(Meter):
    """InvokeModel: token counts arrive as response headers."""

    __slots__ = ()

    def on_headers(self, status: int, headers: MultiMapping[str]) -> None:
        u = self.usage
        u.input_tokens = _int(headers.get("X-Amzn-Bedrock-Input-Token-Count"))
        u.output_tokens = _int(headers.get("X-Amzn-Bedrock-Output-Token-Count"))
        u.cache_read_tokens = _int(headers.get("X-Amzn-Bedrock-Cache-Read-Input-Token-Count"))
        u.cache_write_tokens = _int(headers.get("X-Amzn-Bedrock-Cache-Write-Input-Token-Count"))
        u.found = "X-Amzn-Bedrock-Input-Token-Count" in headers


class EventStreamMeter(Meter):
    """Keeps the last frame of one event type; decodes it at the end. Counts the payload
    bytes of the other frames, for an estimate when the stream ends before its usage."""

    __slots__ = ("_last", "streamed")
    event_type = b""

    def __init__(self) -> None:
        super().__init__()
        self._last: bytes | None = None
        self.streamed = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        end = len(view)
        event = self.event_type
        while pos + 12 <= end:
            total, headers_len = _PRELUDE.unpack_from(view, pos)
            # The event-type header value is short: a substring test rejects most frames
            # without decoding any header.
            headers = view[pos + 12 : pos + 12 + headers_len]
            if event in headers.tobytes():
                decoded = decode_headers(headers)
                if decoded.get(":event-type") == event.decode():
                    payload = view[pos + 12 + headers_len : pos + total - 4]
                    if self.wanted(payload):
                        self._last = bytes(payload)
            self.streamed += total - headers_len - 16
            pos += total

    def finish(self) -> Usage:
        if self._last is not None:
            with contextlib.suppress(orjson.JSONDecodeError, ValueError, TypeError):
                self.read(orjson.loads(self._last))
        return self.usage

    def wanted(self, payload: memoryview) -> bool:
        """Whether a frame of ``event_type`` is one to keep (all are, unless overridden)."""
        return True

    def estimate(self, input_bytes: int) -> None:
        """Usage for a stream that ended before the upstream reported it: input from the
        request's size, output from the event payloads that passed (about 4 bytes a token,
        JSON framing included, so it errs on the side of charging)."""
        u = self.usage
        if u.found or not self.streamed:
            return
        u.input_tokens = input_bytes // 4
        u.output_tokens = self.streamed // 4
        u.found = u.estimated = True

    def read(self, payload: Any) -> None:
        raise NotImplementedError


class ConverseStreamMeter(EventStreamMeter):
    __slots__ = ()
    event_type = b"metadata"

    def read(self, payload: Any) -> None:
        if isinstance(payload, dict):
            _converse_usage(self.usage, payload.get("usage"))


class InvokeStreamMeter(EventStreamMeter):
    """InvokeModelWithResponseStream: metrics ride in the final chunk's base64 bytes."""

    __slots__ = ()
    event_type = b"chunk"

    def read(self, payload: Any) -> None:
        if not isinstance(payload, dict) or not isinstance(payload.get("bytes"), str):
            return
        chunk = orjson.loads(base64.b64decode(payload["bytes"]))
        metrics = chunk.get("amazon-bedrock-invocationMetrics") if isinstance(chunk, dict) else None
        if isinstance(metrics, dict):
            u = self.usage
            u.input_tokens = _int(metrics.get("inputTokenCount"))
            u.output_tokens = _int(metrics.get("outputTokenCount"))
            u.cache_read_tokens = _int(metrics.get("cacheReadInputTokenCount"))
            u.cache_write_tokens = _int(metrics.get("cacheWriteInputTokenCount"))
            u.found = True


class BidirectionalStreamMeter(EventStreamMeter):
    """InvokeModelWithBidirectionalStream (Nova Sonic): usage comes in ``usageEvent``
    chunks whose totals are cumulative, so the last one counts. A chunk's bytes are base64
    JSON; only the first 48 decoded bytes are looked at to tell a usage event from audio."""

    __slots__ = ("_read",)
    event_type = b"chunk"

    def __init__(self) -> None:
        super().__init__()
        self._read: bytes | None = None

    def so_far(self) -> Usage | None:
        """The totals of the latest usage event, while the session goes on (a session
        lasts minutes: budgets bind on it before it ends); None when no new one came."""
        last = self._last
        if last is None or last is self._read:
            return None
        self._read = last
        with contextlib.suppress(orjson.JSONDecodeError, ValueError, TypeError):
            self.read(orjson.loads(last))
        return self.usage

    def wanted(self, payload: memoryview) -> bool:
        head = bytes(payload[:120])
        start = head.find(b'"bytes"')
        if start < 0:
            return False
        quote = head.find(b'"', head.find(b":", start) + 1)
        if quote < 0:
            return False
        encoded = head[quote + 1 : quote + 65]
        try:
            return base64.b64decode(encoded[: len(encoded) // 4 * 4]).find(b"usageEvent") >= 0
        except ValueError:
            return False

    def read(self, payload: Any) -> None:
        if not isinstance(payload, dict) or not isinstance(payload.get("bytes"), str):
            return
        event = _dig(orjson.loads(base64.b64decode(payload["bytes"])), "event", "usageEvent")
        if isinstance(event, dict):
            u = self.usage
            u.input_tokens = _int(event.get("totalInputTokens"))
            u.output_tokens = _int(event.get("totalOutputTokens"))
            u.found = True


class AgentTraceMeter(Meter):
    """InvokeAgent and InvokeInlineAgent: with ``enableTrace``, every model invocation of
    the orchestration reports its tokens in a trace event; they are summed as they pass.
    Without a trace there is nothing to read, and the operation's per-request price (if
    configured) applies."""

    __slots__ = ()

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos + 12 <= end:
            total, headers_len = _PRELUDE.unpack_from(view, pos)
            headers = view[pos + 12 : pos + 12 + headers_len]
            if (
                headers.tobytes().find(b"trace") >= 0  # (not ``in``: see access.compat)
                and decode_headers(headers).get(":event-type") == "trace"
            ):
                with contextlib.suppress(orjson.JSONDecodeError, ValueError, TypeError):
                    self._read(orjson.loads(view[pos + 12 + headers_len : pos + total - 4]))
            pos += total

    def _read(self, event: Any) -> None:
        trace = event.get("trace") if isinstance(event, dict) else None
        if not isinstance(trace, dict):
            return
        for step in trace.values():  # orchestrationTrace, preProcessingTrace, ...
            if not isinstance(step, dict):
                continue
            invocation = step.get("modelInvocationInput")
            if isinstance(invocation, dict) and isinstance(invocation.get("foundationModel"), str):
                self.usage.model = invocation["foundationModel"]
            output = step.get("modelInvocationOutput")
            metadata = output.get("metadata") if isinstance(output, dict) else None
            counts = metadata.get("usage") if isinstance(metadata, dict) else None
            if isinstance(counts, dict):
                u = self.usage
                u.input_tokens += _int(counts.get("inputTokens"))
                u.output_tokens += _int(counts.get("outputTokens"))
                u.found = True


class RerankMeter(Meter):
    """Rerank is billed per query: each search query over up to 100 document chunks is
    one query, and more chunks are more queries. The response says nothing of it, so the
    count comes from the request; the model from its ``modelArn``."""

    __slots__ = ("_ok",)
    reads_request = True
    CHUNKS_PER_QUERY = 100

    def __init__(self) -> None:
        super().__init__()
        self._ok = False

    def on_request(self, body: bytes) -> None:
        # Strictly, or a 400: what is billed is counted from the document AWS reads.
        request = parse_strict(body)
        if not isinstance(request, dict):
            return
        queries = request.get("queries")
        sources = request.get("sources")
        if not isinstance(queries, list) or not isinstance(sources, list):
            return
        chunks = -(-len(sources) // self.CHUNKS_PER_QUERY)  # ceiling
        self.usage.queries = len(queries) * max(1, chunks)
        config = request.get("rerankingConfiguration")
        model = _dig(config, "bedrockRerankingConfiguration", "modelConfiguration", "modelArn")
        if isinstance(model, str):
            self.usage.model = arn_model_id(model) or model

    def on_headers(self, status: int, headers: MultiMapping[str]) -> None:
        self._ok = status == 200

    def finish(self) -> Usage:
        self.usage.found = self._ok and self.usage.queries > 0
        if not self._ok:
            self.usage.queries = 0  # a refused call is not billed
        return self.usage


def _dig(node: Any, *path: str) -> Any:
    for name in path:
        if not isinstance(node, dict):
            return None
        node = node.get(name)
    return node


_METERS: dict[str, type[Meter]] = {
    "Converse": JsonBodyMeter,
    "ConverseStream": ConverseStreamMeter,
    "InvokeModel": InvokeHeadersMeter,
    "InvokeModelWithResponseStream": InvokeStreamMeter,
    "ApplyGuardrail": GuardrailMeter,
    "CountTokens": CountTokensMeter,
    "InvokeAgent": AgentTraceMeter,
    "InvokeInlineAgent": AgentTraceMeter,
    "Rerank": RerankMeter,
    "InvokeModelWithBidirectionalStream": BidirectionalStreamMeter,
}


def meter_for(operation: str) -> Meter:
    return _METERS.get(operation, Meter)()


def _converse_usage(usage: Usage, data: Any) -> None:
    if not isinstance(data, dict):
        return
    usage.input_tokens = _int(data.get("inputTokens"))
    usage.output_tokens = _int(data.get("outputTokens"))
    usage.cache_read_tokens = _int(
        data.get("cacheReadInputTokens") or data.get("cacheReadInputTokenCount")
    )
    usage.cache_write_tokens = _int(
        data.get("cacheWriteInputTokens") or data.get("cacheWriteInputTokenCount")
    )
    usage.found = True


def _int(value: Any) -> int:
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0
