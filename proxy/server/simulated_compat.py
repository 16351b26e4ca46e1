"""The simulator's OpenAI- and Anthropic-compatible answers, in their real wire formats:
Chat Completions, Responses and Messages, as JSON or as server-sent events, and model
listings. The tests' fake upstream serves the same answers (and adds faults)."""

from __future__ import annotations

import itertools
from typing import Any

import orjson

_IDS = itertools.count(1)
WORDS = ["Hello", " from", " Bedrock", "!"]
MODELS = [
    "openai.gpt-oss-120b",
    "openai.gpt-oss-20b",
    "anthropic.claude-haiku-4-5",
    "anthropic.claude-sonnet-4-5",
]


def openai_usage(names: tuple[str, str], cached: int = 0) -> dict[str, Any]:
    details = "prompt_tokens_details" if names[0] == "prompt_tokens" else "input_tokens_details"
    return {names[0]: 20, names[1]: 5, "total_tokens": 25, details: {"cached_tokens": cached}}


def openai_models() -> dict[str, Any]:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "aws"} for m in MODELS]
    return {"object": "list", "data": data}


def anthropic_models() -> dict[str, Any]:
    data = [
        {"type": "model", "id": m, "display_name": m, "created_at": "2025-10-01T00:00:00Z"}
        for m in MODELS
    ]
    return {"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]}


def chat(payload: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any] | list[bytes]:
    """A chat completion, or its stream's events when the request asks for one."""
    model = payload.get("model")
    chat_id = f"chatcmpl-{next(_IDS)}"
    if not payload.get("stream"):
        message = {"role": "assistant", "content": "".join(WORDS)}
        return {
            "id": chat_id,
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": usage,
        }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": chat_id,
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": w}) for w in WORDS]
    events.append(chunk({}, "stop"))
    if (payload.get("stream_options") or {}).get("include_usage"):
        events.append({**chunk({}), "choices": [], "usage": usage})
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def response(payload: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    """A completed Responses API response."""
    text = {"type": "output_text", "text": "".join(WORDS), "annotations": []}
    return {
        "id": f"resp_{next(_IDS):08d}",
        "object": "response",
        "created_at": 0,
        "status": "completed",
        "model": payload.get("model"),
        "output": [
            {
                "type": "message",
                "id": f"msg_{next(_IDS)}",
                "role": "assistant",
                "status": "completed",
                "content": [text],
            }
        ],
        "previous_response_id": payload.get("previous_response_id"),
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {**usage, "output_tokens_details": {"reasoning_tokens": 0}},
    }


def response_events(answer: dict[str, Any]) -> list[bytes]:
    started = {**answer, "status": "in_progress", "output": [], "usage": None}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": started}]
    events += [
        {
            "type": "response.output_text.delta",
            "item_id": answer["output"][0]["id"],
            "output_index": 0,
            "content_index": 0,
            "delta": w,
            "logprobs": [],
        }
        for w in WORDS
    ]
    events.append({"type": "response.completed", "response": answer})
    lines = []
    for n, event in enumerate(events):
        event["sequence_number"] = n
        lines.append(
            f"event: {event['type']}\n".encode() + b"data: " + orjson.dumps(event) + b"\n\n"
        )
    return lines


def message(payload: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any] | list[bytes]:
    """An Anthropic message, or its stream's events when the request asks for one."""
    answer = {
        "id": f"msg_bdrk_{next(_IDS)}",
        "type": "message",
        "role": "assistant",
        "model": payload.get("model"),
        "content": [{"type": "text", "text": "".join(WORDS)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    if not payload.get("stream"):
        return answer
    start = {
        **answer,
        "content": [],
        "stop_reason": None,
        "usage": {**usage, "output_tokens": 1},
    }
    block = {"type": "text", "text": ""}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": block},
        {"type": "ping"},
    ]
    events += [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}
        for w in WORDS
    ]
    events += [
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": usage.get("output_tokens", 5)},
        },
        {"type": "message_stop"},
    ]
    return [
        f"event: {e['type']}\n".encode() + b"data: " + orjson.dumps(e) + b"\n\n" for e in events
    ]


def anthropic_usage(hour: bool = False) -> dict[str, Any]:
    return {
        "input_tokens": 20,
        "cache_creation_input_tokens": 150 if hour else 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {
            "ephemeral_5m_input_tokens": 50 if hour else 0,
            "ephemeral_1h_input_tokens": 100 if hour else 0,
        },
        "output_tokens": 5,
    }
