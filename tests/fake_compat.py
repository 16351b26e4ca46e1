"""A fake of Bedrock's OpenAI- and Anthropic-compatible APIs, on the fake Bedrock's
signature check (SigV4 recomputed with botocore's signer, scoped to ``bedrock`` for
bedrock-runtime or ``bedrock-mantle``), speaking the real wire formats: JSON answers,
server-sent event streams as the OpenAI and Anthropic APIs send them, stored responses.

Usage, for exact charges in the tests: every call reports 20 input tokens (8 of them
cached when a message says "cache") and 5 output tokens; an Anthropic call that asks for
an hour's cache reports 100 tokens written for an hour and 50 for five minutes.
Faults by model: ``test.cut`` ends a stream in the middle of an event; ``test.gate``
holds its last event until ``gate`` is set.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fake_bedrock import FakeBedrock, Received, _connection_of

_IDS = itertools.count(1)
WORDS = ["Hello", " from", " Bedrock", "!"]
MODELS = [
    "openai.gpt-oss-120b",
    "openai.gpt-oss-20b",
    "anthropic.claude-haiku-4-5",
    "anthropic.claude-sonnet-4-5",
]


def openai_error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": None, "param": None}}
    return web.json_response(body, status=status)


@dataclass
class FakeCompat(FakeBedrock):
    signing_name: str = "bedrock"
    # Stored responses: id -> the response object.
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    gate: threading.Event = field(default_factory=threading.Event)
    gate_timed_out: bool = False

    def reset(self) -> None:
        signing_name = self.signing_name  # which endpoint this fake is stays
        super().reset()
        self.signing_name = signing_name

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        error, region = self._check_auth(request, body)
        path = request.raw_path.split("?", 1)[0]
        self.requests.append(
            Received(
                request.method,
                request.raw_path,
                request.headers.copy(),  # type: ignore[arg-type]
                body,
                path,
                region,
                *_connection_of(request),
            )
        )
        if error is not None:
            return error
        for root in ("/openai/v1/", "/v1/"):
            if path.startswith(root):
                return await self.openai(request, path[len(root) :], body)
        if path.startswith("/anthropic/v1/"):
            return await self.anthropic(request, path[len("/anthropic/v1/") :], body)
        return openai_error(404, f"Unknown path {path}")

    # ------------------------------------------------------------------ OpenAI

    async def openai(self, request: web.Request, rest: str, body: bytes) -> web.StreamResponse:
        method = request.method
        if method == "GET" and rest == "models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "aws"} for m in MODELS]
            return web.json_response({"object": "list", "data": data})
        if method == "POST" and rest == "chat/completions":
            return await self.chat(request, json.loads(body))
        if method == "POST" and rest == "responses":
            return await self.create_response(request, json.loads(body))
        parts = rest.split("/")
        if parts[0] == "responses" and len(parts) >= 2:
            found = self.responses.get(parts[1])
            if found is None:
                return openai_error(404, f"Response with id '{parts[1]}' not found.")
            if method == "GET" and len(parts) == 2:
                return web.json_response(found)
            if method == "DELETE" and len(parts) == 2:
                del self.responses[parts[1]]
                return web.json_response({"id": parts[1], "object": "response", "deleted": True})
            if method == "POST" and parts[2:] == ["cancel"]:
                found["status"] = "cancelled"
                return web.json_response(found)
            if method == "GET" and parts[2:] == ["input_items"]:
                return web.json_response({"object": "list", "data": [], "has_more": False})
        return openai_error(404, f"Unknown path {rest}")

    def _openai_usage(self, request: dict[str, Any], names: tuple[str, str]) -> dict[str, Any]:
        cached = 8 if "cache" in json.dumps(request.get("messages", request.get("input"))) else 0
        details = "prompt_tokens_details" if names[0] == "prompt_tokens" else "input_tokens_details"
        return {
            names[0]: 20,
            names[1]: 5,
            "total_tokens": 25,
            details: {"cached_tokens": cached},
        }

    async def chat(self, request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
        model = payload["model"]
        chat_id = f"chatcmpl-{next(_IDS)}"
        usage = self._openai_usage(payload, ("prompt_tokens", "completion_tokens"))
        if not payload.get("stream"):
            return web.json_response(
                {
                    "id": chat_id,
                    "object": "chat.completion",
                    "created": 0,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(WORDS)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )

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
        lines = [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]
        return await self._sse(request, model, lines)

    async def create_response(
        self, request: web.Request, payload: dict[str, Any]
    ) -> web.StreamResponse:
        model = payload["model"]
        response_id = f"resp_{next(_IDS):08d}"
        response = {
            "id": response_id,
            "object": "response",
            "created_at": 0,
            "status": "completed",
            "model": model,
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{next(_IDS)}",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "".join(WORDS), "annotations": []}],
                }
            ],
            "previous_response_id": payload.get("previous_response_id"),
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                **self._openai_usage(payload, ("input_tokens", "output_tokens")),
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }
        if payload.get("store", True):
            self.responses[response_id] = response
        if not payload.get("stream"):
            return web.json_response(response)
        started = {**response, "status": "in_progress", "output": [], "usage": None}
        events: list[dict[str, Any]] = [{"type": "response.created", "response": started}]
        events += [
            {
                "type": "response.output_text.delta",
                "item_id": response["output"][0]["id"],
                "output_index": 0,
                "content_index": 0,
                "delta": w,
                "logprobs": [],
            }
            for w in WORDS
        ]
        events.append({"type": "response.completed", "response": response})
        lines = []
        for n, event in enumerate(events):
            event["sequence_number"] = n
            lines.append(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
        return await self._sse(request, model, lines)

    # ------------------------------------------------------------------ Anthropic

    async def anthropic(self, request: web.Request, rest: str, body: bytes) -> web.StreamResponse:
        if request.method == "POST" and rest == "messages/count_tokens":
            return web.json_response({"input_tokens": 20})
        if request.method == "GET" and rest == "models":
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-10-01T00:00:00Z"}
                for m in MODELS
            ]
            return web.json_response(
                {"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]}
            )
        if request.method != "POST" or rest != "messages":
            error = {"type": "not_found_error", "message": f"Unknown path {rest}"}
            return web.json_response({"type": "error", "error": error}, status=404)
        payload = json.loads(body)
        model = payload["model"]
        hour = '"ttl": "1h"' in json.dumps(payload)
        usage = {
            "input_tokens": 20,
            "cache_creation_input_tokens": 150 if hour else 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 50 if hour else 0,
                "ephemeral_1h_input_tokens": 100 if hour else 0,
            },
            "output_tokens": 5,
        }
        message = {
            "id": f"msg_bdrk_{next(_IDS)}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "".join(WORDS)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not payload.get("stream"):
            return web.json_response(message)
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {**usage, "output_tokens": 1},
        }
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": start}),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            ("ping", {"type": "ping"}),
        ]
        events += [
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": w},
                },
            )
            for w in WORDS
        ]
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 5},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        lines = [f"event: {name}\ndata: {json.dumps(e)}\n\n".encode() for name, e in events]
        return await self._sse(request, model, lines)

    # ------------------------------------------------------------------ streams

    async def _sse(
        self, request: web.Request, model: str, lines: list[bytes]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        if request.version.major == 1:  # (HTTP/2 frames the body itself)
            response.enable_chunked_encoding()
        await response.prepare(request)
        for n, line in enumerate(lines):
            if model == "test.cut" and n == len(lines) // 2:
                await response.write(line[: len(line) // 2])
                assert request.transport is not None
                request.transport.close()
                return response
            if model == "test.gate" and n == len(lines) - 1:
                self.gate_timed_out = not await asyncio.to_thread(self.gate.wait, 10)
            await response.write(line)
        await response.write_eof()
        return response
