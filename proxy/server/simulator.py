"""A simulated Bedrock for trying the proxy without AWS (``serve --simulate``, ``make demo``)
and for pointing a team's own CI at: Converse and InvokeModel with their streams, event
frames with usage, the agent runtime's Retrieve, and the OpenAI- and Anthropic-compatible
APIs (``simulated_compat``), in the real wire formats.

The answers are built here once; the tests' fake upstream serves the same ones (and adds
signature checks, faults and jobs). Every response says it is simulated
(``x-bedrock-proxy-simulated: true``), and the proxy logs it at startup and shows it in the
console: a simulated answer is never mistaken for a model's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

import orjson
from aiohttp import web

from ..wire import eventstream
from ..wire.routing import Router, load_operations
from . import simulated_compat as answers

SIMULATED_HEADER = "x-bedrock-proxy-simulated"
# Paced like a model: a stream's frames this far apart.
FRAME_INTERVAL = 0.02


# ---------------------------------------------------------------------- the answers


def converse_answer(model: str) -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": f"model={model}"}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 11, "outputTokens": 7, "totalTokens": 18},
        "metrics": {"latencyMs": 42},
    }


def converse_stream_frames(model: str, deltas: list[str] | None = None) -> list[bytes]:
    deltas = deltas if deltas is not None else ["Hel", "lo ", "from ", model]
    events: list[tuple[str, dict[str, Any]]] = [("messageStart", {"role": "assistant"})]
    events += [
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": d}}) for d in deltas
    ]
    events += [
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("messageStop", {"stopReason": "end_turn"}),
        (
            "metadata",
            {
                "usage": {"inputTokens": 12, "outputTokens": 9, "totalTokens": 21},
                "metrics": {"latencyMs": 77},
            },
        ),
    ]
    return [event_frame(name, data) for name, data in events]


INVOKE_USAGE_HEADERS = {
    "X-Amzn-Bedrock-Input-Token-Count": "25",
    "X-Amzn-Bedrock-Output-Token-Count": "13",
    "X-Amzn-Bedrock-Cache-Read-Input-Token-Count": "4",
    "X-Amzn-Bedrock-Cache-Write-Input-Token-Count": "3",
    "X-Amzn-Bedrock-Invocation-Latency": "120",
}


def invoke_answer(model: str, body: bytes, payload: Any) -> bytes:
    """InvokeModel's body: Anthropic's Messages shape for an Anthropic request."""
    answer: dict[str, Any] = {
        "completion": f"model={model}",
        "echo_sha256": hashlib.sha256(body).hexdigest(),
    }
    if isinstance(payload, dict) and "anthropic_version" in payload:
        answer.update(
            id="msg_fake",
            type="message",
            role="assistant",
            model=model,
            content=[{"type": "text", "text": f"model={model}"}],
            stop_reason="end_turn",
            usage={"input_tokens": 25, "output_tokens": 13},
        )
    return orjson.dumps(answer)


def invoke_stream_frames() -> list[bytes]:
    chunks: list[dict[str, Any]] = [
        {"type": "content_block_delta", "delta": {"text": t}} for t in ("one ", "two ", "three")
    ]
    chunks[-1]["amazon-bedrock-invocationMetrics"] = {
        "inputTokenCount": 30,
        "outputTokenCount": 3,
        "invocationLatency": 200,
        "firstByteLatency": 50,
    }
    return [
        eventstream.encode_frame(
            {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"},
            orjson.dumps({"bytes": base64.b64encode(orjson.dumps(c)).decode()}),
        )
        for c in chunks
    ]


def retrieve_answer(knowledge_base_id: str) -> dict[str, Any]:
    return {
        "retrievalResults": [
            {
                "content": {"text": f"doc from {knowledge_base_id}"},
                "score": 0.9,
                "location": {"type": "S3", "s3Location": {"uri": "s3://kb/doc1.txt"}},
            }
        ]
    }


def event_frame(event_type: str, data: dict[str, Any]) -> bytes:
    return eventstream.encode_frame(
        {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"},
        orjson.dumps(data),
    )


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
        match = self._router.match(request.method, path)
        if match is None:
            return self._label(aws_error(404, "UnknownOperationException", "Unknown operation"))
        op = match.operation.name
        model = match.labels.get("modelId", "")
        try:
            payload = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return self._label(
                aws_error(400, "ValidationException", "Malformed input request, please reformat it")
            )
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
            return await self._stream(request, invoke_stream_frames())
        if op == "Retrieve":
            return self._json(retrieve_answer(match.labels.get("knowledgeBaseId", "")))
        return self._label(
            aws_error(
                400,
                "ValidationException",
                f"The simulator answers Converse, ConverseStream, InvokeModel, "
                f"InvokeModelWithResponseStream and Retrieve; not {op}",
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
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": content_type,
                "x-amzn-RequestId": "simulated-stream-id",
                SIMULATED_HEADER: "true",
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
