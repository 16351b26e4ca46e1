"""Usage of the OpenAI- and Anthropic-compatible APIs, read from JSON answers and from
server-sent event streams as they pass.

Where each API reports it:
- OpenAI Chat Completions: ``usage`` in the answer; in a stream, the last chunk's, when
  the request asked for ``stream_options.include_usage``. ``prompt_tokens`` includes the
  cached ``prompt_tokens_details.cached_tokens``.
- OpenAI Responses: ``usage`` in the answer, or in the stream's ``response.completed``
  (``response.incomplete``, ``response.failed``) event. ``input_tokens`` includes
  ``input_tokens_details.cached_tokens``.
- Anthropic Messages: ``usage`` in the answer; in a stream, ``message_start``'s (input
  and cache tokens) then ``message_delta``'s (cumulative output). Cache writes are
  reported apart from input, with ``cache_creation.ephemeral_1h_input_tokens`` priced
  higher than 5-minute writes.

A stream that ends without usage (cut, or a chat stream whose client did not ask for it)
is never free: it is charged an estimate, flagged as such in the ledger: the request's
bytes / 4 as input tokens, and for output the larger of the streamed chunks (a chunk
carries a token or more) and the streamed text's characters / 4.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from multidict import MultiMapping

from ..wire import compat
from .usage import Meter, Usage, _int

_MAX_JSON_BODY = 8 * 1024 * 1024
_SSE = "text/event-stream"


class CompatMeter(Meter):
    """A JSON answer, or an event stream (told apart by the answer's Content-Type)."""

    __slots__ = (
        "_chunks", "_ok", "_size", "_sse", "chars", "chunks", "created", "due", "on_created"
    )  # fmt: skip

    def __init__(self) -> None:
        self.usage = Usage()  # (Meter's own __init__, without a second call)
        self._ok = False
        self._sse = False
        self._chunks: list[bytes] = []
        self._size = 0
        # Streamed output, for an estimate when no usage comes.
        self.chunks = 0
        self.chars = 0
        # The id of the response the call created (the Responses API), and what to do
        # with it as soon as the stream names it (record it as the key's).
        self.created: str | None = None
        self.due: Callable[[], Awaitable[None]] | None = None
        self.on_created: Callable[[str], Awaitable[None]] | None = None

    async def run_due(self) -> None:
        due, self.due = self.due, None
        if due is not None:
            await due()

    def on_headers(self, status: int, headers: MultiMapping[str]) -> None:
        self._ok = status == 200
        self._sse = _SSE in headers.get("Content-Type", "")

    def feed(self, data: bytes) -> None:
        if not self._ok:
            return
        if self._sse:  # whole events: the relay cuts the stream at event boundaries
            for name, payload in compat.sse_events(data):
                if payload == b"[DONE]":
                    continue
                try:
                    event = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(event, dict):
                    self.event(name, event)
        elif self._size <= _MAX_JSON_BODY:
            self._chunks.append(data)
            self._size += len(data)

    def finish(self) -> Usage:
        if self._sse or not self._ok or not self._chunks or self._size > _MAX_JSON_BODY:
            return self.usage
        chunks = self._chunks
        try:
            document = orjson.loads(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except orjson.JSONDecodeError:
            return self.usage
        if isinstance(document, dict):
            self.answer(document)
        return self.usage

    @property
    def unreported(self) -> bool:
        """A stream that carried output but no usage: it gets an estimate."""
        return self._sse and self._ok and not self.usage.found and self.chunks > 0

    def estimate(self, input_bytes: int) -> None:
        u = self.usage
        if u.found or not self.chunks:
            return
        u.input_tokens = max(u.input_tokens, input_bytes // 4)
        u.output_tokens = max(self.chunks, self.chars // 4)
        u.found = u.estimated = True

    def answer(self, document: dict[str, Any]) -> None:
        raise NotImplementedError

    def event(self, name: str, event: dict[str, Any]) -> None:
        raise NotImplementedError


class ChatCompletionsMeter(CompatMeter):
    __slots__ = ()

    def answer(self, document: dict[str, Any]) -> None:
        _openai_usage(self.usage, document.get("usage"), _CHAT)

    def event(self, name: str, event: dict[str, Any]) -> None:
        usage = event.get("usage")
        if isinstance(usage, dict):
            _openai_usage(self.usage, usage, _CHAT)
        choices = event.get("choices")
        if isinstance(choices, list) and choices:
            self.chunks += 1
            for choice in choices:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict):
                    self.chars += _text_length(delta)


class ResponsesMeter(CompatMeter):
    __slots__ = ()
    _FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})

    def answer(self, document: dict[str, Any]) -> None:
        if isinstance(document.get("id"), str):
            self.created = document["id"]
        _openai_usage(self.usage, document.get("usage"), _RESPONSES)

    def event(self, name: str, event: dict[str, Any]) -> None:
        kind = event.get("type", name)
        response = event.get("response")
        if kind == "response.created" and isinstance(response, dict):
            if isinstance(response.get("id"), str):
                created = self.created = response["id"]
                if self.on_created is not None:  # before the event reaches the client
                    self.due = functools.partial(self.on_created, created)
        elif kind in self._FINAL and isinstance(response, dict):
            _openai_usage(self.usage, response.get("usage"), _RESPONSES)
        elif isinstance(kind, str) and kind.endswith(".delta"):
            self.chunks += 1
            delta = event.get("delta")
            if isinstance(delta, str):
                self.chars += len(delta)


class MessagesMeter(CompatMeter):
    __slots__ = ("_final",)

    def __init__(self) -> None:
        super().__init__()
        self._final = False

    def answer(self, document: dict[str, Any]) -> None:
        _anthropic_usage(self.usage, document.get("usage"))

    def event(self, name: str, event: dict[str, Any]) -> None:
        kind = event.get("type", name)
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                _anthropic_usage(self.usage, message.get("usage"))
        elif kind == "message_delta":
            # Cumulative counts: output always, input and cache counts when they are sent.
            _anthropic_usage(self.usage, event.get("usage"), partial=True)
            self._final = True
        elif kind == "content_block_delta":
            self.chunks += 1
            delta = event.get("delta")
            if isinstance(delta, dict):
                self.chars += _text_length(delta)

    @property
    def unreported(self) -> bool:
        # message_start reports input at once; output is final only in message_delta.
        return self._sse and self._ok and self.chunks > 0 and not self._final

    def estimate(self, input_bytes: int) -> None:
        u = self.usage
        if not self.chunks:
            return
        if not u.found:
            u.input_tokens = input_bytes // 4
        u.output_tokens = max(u.output_tokens, self.chunks, self.chars // 4)
        u.found = u.estimated = True


class CountTokensMeter(CompatMeter):
    """Counting tokens costs nothing."""

    __slots__ = ()

    def answer(self, document: dict[str, Any]) -> None:
        self.usage.free = True
        self.usage.input_tokens = _int(document.get("input_tokens"))
        self.usage.found = True

    def event(self, name: str, event: dict[str, Any]) -> None:
        pass


_METERS: dict[str, type[Meter]] = {
    "OpenAIChatCompletions": ChatCompletionsMeter,
    "OpenAICreateResponse": ResponsesMeter,
    "AnthropicMessages": MessagesMeter,
    "AnthropicCountTokens": CountTokensMeter,
}


def meter_for(operation: str) -> Meter:
    """The meter of a compatible operation (a plain request count for the others)."""
    return _METERS.get(operation, Meter)()


def _text_length(delta: dict[str, Any]) -> int:
    """Characters of generated text in a streamed delta (text, reasoning, tool input)."""
    n = 0
    for name in ("content", "text", "reasoning_content", "reasoning", "partial_json", "thinking"):
        value = delta.get(name)
        if isinstance(value, str):
            n += len(value)
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                n += len(function["arguments"])
    return n


# Where each OpenAI API puts its counts: (input, output, the input's details).
_CHAT = ("prompt_tokens", "completion_tokens", "prompt_tokens_details")
_RESPONSES = ("input_tokens", "output_tokens", "input_tokens_details")


def _openai_usage(usage: Usage, data: Any, names: tuple[str, str, str]) -> None:
    """OpenAI counts cached tokens inside the input: they are taken out, to be priced as
    cache reads."""
    if not isinstance(data, dict):
        return
    input_name, output_name, details_name = names
    details = data.get(details_name)
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    # (An int as it is, without a call: the usual case.)
    n = data.get(input_name)
    usage.input_tokens = max(0, (n if type(n) is int else _int(n)) - cached)
    usage.cache_read_tokens = cached
    n = data.get(output_name)
    usage.output_tokens = n if type(n) is int else _int(n)
    usage.found = True


def _anthropic_usage(usage: Usage, data: Any, partial: bool = False) -> None:
    if not isinstance(data, dict):
        return
    if "output_tokens" in data:
        usage.output_tokens = _int(data.get("output_tokens"))
    if partial and "input_tokens" not in data:
        return
    usage.input_tokens = _int(data.get("input_tokens"))
    usage.cache_read_tokens = _int(data.get("cache_read_input_tokens"))
    usage.cache_write_tokens = _int(data.get("cache_creation_input_tokens"))
    creation = data.get("cache_creation")
    if isinstance(creation, dict):
        usage.cache_write_1h_tokens = _int(creation.get("ephemeral_1h_input_tokens"))
    usage.found = True
