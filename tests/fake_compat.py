"""A fake of Bedrock's OpenAI- and Anthropic-compatible APIs, on the fake Bedrock's
signature check (SigV4 recomputed with botocore's signer, scoped to ``bedrock`` for
bedrock-runtime or ``bedrock-mantle``), speaking the real wire formats: JSON answers,
server-sent event streams as the OpenAI and Anthropic APIs send them, stored responses.

The answers are the simulator's (``proxy.server.simulated_compat``). Usage, for exact
charges in the tests: every call reports 20 input tokens (8 of them cached when a message
says "cache") and 5 output tokens; an Anthropic call that asks for an hour's cache
reports 100 tokens written for an hour and 50 for five minutes.
Faults by model: ``test.cut`` ends a stream in the middle of an event; ``test.gate``
holds its last event until ``gate`` is set, ``test.hold`` its third.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.server import simulated_compat as answers
from tests.fake_bedrock import FakeBedrock, Received, _connection_of


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
            return web.json_response(answers.openai_models())
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

    @staticmethod
    def _cached(payload: dict[str, Any]) -> int:
        return 8 if "cache" in json.dumps(payload.get("messages", payload.get("input"))) else 0

    async def chat(self, request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
        usage = answers.openai_usage(("prompt_tokens", "completion_tokens"), self._cached(payload))
        answer = answers.chat(payload, usage)
        if isinstance(answer, dict):
            return web.json_response(answer)
        return await self._sse(request, payload["model"], answer)

    async def create_response(
        self, request: web.Request, payload: dict[str, Any]
    ) -> web.StreamResponse:
        usage = answers.openai_usage(("input_tokens", "output_tokens"), self._cached(payload))
        response = answers.response(payload, usage)
        if payload.get("store", True):
            self.responses[response["id"]] = response
        if not payload.get("stream"):
            return web.json_response(response)
        return await self._sse(request, payload["model"], answers.response_events(response))

    # ------------------------------------------------------------------ Anthropic

    async def anthropic(self, request: web.Request, rest: str, body: bytes) -> web.StreamResponse:
        if request.method == "POST" and rest == "messages/count_tokens":
            return web.json_response({"input_tokens": 20})
        if request.method == "GET" and rest == "models":
            return web.json_response(answers.anthropic_models())
        if request.method != "POST" or rest != "messages":
            error = {"type": "not_found_error", "message": f"Unknown path {rest}"}
            return web.json_response({"type": "error", "error": error}, status=404)
        payload = json.loads(body)
        hour = '"ttl": "1h"' in json.dumps(payload)
        answer = answers.message(payload, answers.anthropic_usage(hour))
        if isinstance(answer, dict):
            return web.json_response(answer)
        return await self._sse(request, payload["model"], answer)

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
            if model == "test.hold" and n == 2:
                self.gate_timed_out = not await asyncio.to_thread(self.gate.wait, 10)
            await response.write(line)
        await response.write_eof()
        return response
