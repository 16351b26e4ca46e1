"""A simulated Bedrock for trying the proxy without AWS (``serve --simulate``, ``make demo``)
and for pointing a team's own CI at: Converse and InvokeModel with their streams (InvokeModel
in each model family's own format: Anthropic, Nova, Llama, Titan), event frames with usage,
the agent runtime's Retrieve and InvokeAgent, ListFoundationModels, and the OpenAI- and
Anthropic-compatible APIs (``simulated_compat``), in the real wire formats.

The answers are built in ``simulated_native`` and ``simulated_compat``; the tests' fake
upstream serves the same ones (and adds signature checks, faults and jobs). Every response
says it is simulated (``x-bedrock-proxy-simulated: true``), and the proxy logs it at
startup and shows it in the console: a simulated answer is never mistaken for a model's.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from ..wire import eventstream
from ..wire.routing import RouteMatch, Router, load_operations
from . import simulated_compat as answers
from .simulated_native import (
    AGENT_WORDS,
    INVOKE_USAGE_HEADERS,
    RUNTIME_SESSION_HEADER,
    agent_frames,
    converse_answer,
    converse_stream_frames,
    foundation_models,
    invoke_answer,
    invoke_stream_frames,
    retrieve_answer,
)

SIMULATED_HEADER = "x-bedrock-proxy-simulated"
# Paced like a model: a stream's frames this far apart.
FRAME_INTERVAL = 0.02


def aws_error(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"message": message}),
        headers={
            "Content-Type": "application/json",
            "x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.bedrock/",
            "x-amzn-RequestId": "simulated-error-id",
        },
    )


# ---------------------------------------------------------------------- the server

# What the simulator answers natively (the compatible APIs besides).
SIMULATED_OPERATIONS = (
    "Converse",
    "ConverseStream",
    "InvokeModel",
    "InvokeModelWithResponseStream",
    "Retrieve",
    "InvokeAgent",
    "ListFoundationModels",
    "InvokeAgentRuntime (AgentCore)",
)


class Simulator:
    """The answers above, served on the proxy's own routes (the service models')."""

    def __init__(self, frame_interval: float = FRAME_INTERVAL) -> None:
        self._router = Router(load_operations())
        self._interval = frame_interval

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        body = await request.read()
        if path.startswith(("/openai/v1/", "/v1/", "/anthropic/v1/")):
            return await self._compat(request, path, body)
        if (
            request.method == "POST"
            and path.startswith("/runtimes/")
            and path.endswith("/invocations")
        ):  # AgentCore's InvokeAgentRuntime: an agent's answer, streamed as it speaks
            session = request.headers.get(RUNTIME_SESSION_HEADER) or "simulated-session"
            return await self._stream(
                request,
                [f"data: {orjson.dumps({'text': w}).decode()}\n\n".encode() for w in AGENT_WORDS],
                "text/event-stream",
                headers={RUNTIME_SESSION_HEADER: session},
            )
        match = self._router.match(request.method, path)
        if match is None:
            return self._label(aws_error(404, "UnknownOperationException", "Unknown operation"))
        try:
            payload = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return self._label(
                aws_error(400, "ValidationException", "Malformed input request, please reformat it")
            )
        return await self._native(request, match, body, payload)

    async def _native(
        self, request: web.Request, match: RouteMatch, body: bytes, payload: Any
    ) -> web.StreamResponse:
        """A native Bedrock operation the simulator answers (SIMULATED_OPERATIONS)."""
        op = match.operation.name
        model = match.labels.get("modelId", "")
        if op == "Converse":
            return self._json(converse_answer(model))
        if op == "ConverseStream":
            return await self._stream(request, converse_stream_frames(model))
        if op == "InvokeModel":
            return web.Response(
                body=invoke_answer(model, body, payload),
                headers={
                    "Content-Type": "application/json",
                    "x-amzn-RequestId": "simulated-request-id",
                    SIMULATED_HEADER: "true",
                    **INVOKE_USAGE_HEADERS,
                },
            )
        if op == "InvokeModelWithResponseStream":
            return await self._stream(request, invoke_stream_frames(model))
        if op == "Retrieve":
            return self._json(retrieve_answer(match.labels.get("knowledgeBaseId", "")))
        if op == "InvokeAgent":
            agent = match.labels.get("agentId", "")
            return await self._stream(
                request,
                agent_frames(agent, payload),
                headers={
                    "x-amz-bedrock-agent-session-id": match.labels.get("sessionId", ""),
                    "x-amzn-bedrock-agent-content-type": "application/json",
                },
            )
        if op == "ListFoundationModels":
            return self._json(foundation_models())
        return self._label(
            aws_error(
                400,
                "ValidationException",
                f"The simulator answers {', '.join(SIMULATED_OPERATIONS)}; not {op}",
            )
        )

    async def _compat(self, request: web.Request, path: str, body: bytes) -> web.StreamResponse:
        """bedrock-runtime's and bedrock-mantle's OpenAI and Anthropic APIs."""
        api, _, rest = path.partition("/v1/")
        anthropic = api == "/anthropic"
        if request.method == "GET" and rest == "models":
            return self._json(answers.anthropic_models() if anthropic else answers.openai_models())
        try:
            payload = orjson.loads(body) if request.method == "POST" else None
        except orjson.JSONDecodeError:
            payload = None
        answer: dict[str, Any] | list[bytes] | None = None
        if isinstance(payload, dict) and request.method == "POST":
            if anthropic and rest == "messages":
                answer = answers.message(payload, answers.anthropic_usage())
            elif anthropic and rest == "messages/count_tokens":
                answer = {"input_tokens": 20}
            elif not anthropic and rest == "chat/completions":
                usage = answers.openai_usage(("prompt_tokens", "completion_tokens"))
                answer = answers.chat(payload, usage)
            elif not anthropic and rest == "responses":
                made = answers.response(
                    payload, answers.openai_usage(("input_tokens", "output_tokens"))
                )
                answer = answers.response_events(made) if payload.get("stream") else made
        if answer is None:
            message = (
                "The simulator answers chat/completions, responses, models and Anthropic's "
                f"messages; not {request.method} {path}"
            )
            error = (
                {"type": "error", "error": {"type": "not_found_error", "message": message}}
                if anthropic
                else {"error": {"message": message, "type": "invalid_request_error", "code": None}}
            )
            return self._label(
                web.Response(status=404, body=orjson.dumps(error), content_type="application/json")
            )
        if isinstance(answer, dict):
            return self._json(answer)
        return await self._stream(request, answer, "text/event-stream")

    def _json(self, data: dict[str, Any]) -> web.Response:
        return self._label(
            web.Response(
                body=orjson.dumps(data),
                headers={
                    "Content-Type": "application/json",
                    "x-amzn-RequestId": "simulated-request-id",
                },
            )
        )

    @staticmethod
    def _label(response: web.Response) -> web.Response:
        response.headers[SIMULATED_HEADER] = "true"
        return response

    async def _stream(
        self,
        request: web.Request,
        frames: list[bytes],
        content_type: str = eventstream.CONTENT_TYPE,
        headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": content_type,
                "x-amzn-RequestId": "simulated-stream-id",
                SIMULATED_HEADER: "true",
                **(headers or {}),
            }
        )
        if request.version.major < 2:  # HTTP/2 frames the body itself
            response.enable_chunked_encoding()
        await response.prepare(request)
        for frame in frames:
            await response.write(frame)
            await asyncio.sleep(self._interval)
        await response.write_eof()
        return response
