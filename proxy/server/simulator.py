"""A simulated Bedrock for trying the proxy without AWS (``serve --simulate``, ``make demo``)
and for pointing a team's own CI at: Converse and InvokeModel with their streams (InvokeModel
in each model family's own format: Anthropic, Nova, Llama, Titan), event frames with usage,
the agent runtime's Retrieve and InvokeAgent, ListFoundationModels, and the OpenAI- and
Anthropic-compatible APIs (``simulated_compat``), in the real wire formats.

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


def model_family(model: str) -> str:
    """The request and answer format an InvokeModel call of this model speaks: anthropic,
    nova, llama, titan, or "" (an unknown model: a generic answer)."""
    for family, marker in _FAMILIES:
        if marker in model:
            return family
    return ""


_FAMILIES = (
    ("anthropic", "anthropic."),
    ("nova", "amazon.nova"),
    ("llama", "meta.llama"),
    ("titan", "amazon.titan-text"),
)
# A streamed answer's text, in this many pieces.
_STREAM_TEXT = ("one ", "two ", "three")
_INVOKE_IN, _INVOKE_OUT = 25, 13
_STREAM_IN, _STREAM_OUT = 30, 3


def invoke_answer(model: str, body: bytes, payload: Any) -> bytes:
    """InvokeModel's body in the model family's own format (Anthropic's Messages, Nova's
    Converse-like shape, Llama's generation, Titan's results); every answer also carries
    ``completion`` and the request's hash, for tests."""
    text = f"model={model}"
    answer: dict[str, Any] = {
        "completion": text,
        "echo_sha256": hashlib.sha256(body).hexdigest(),
    }
    family = model_family(model)
    if family == "anthropic" or (isinstance(payload, dict) and "anthropic_version" in payload):
        answer.update(
            id="msg_simulated",
            type="message",
            role="assistant",
            model=model,
            content=[{"type": "text", "text": text}],
            stop_reason="end_turn",
            usage={"input_tokens": _INVOKE_IN, "output_tokens": _INVOKE_OUT},
        )
    elif family == "nova":
        answer.update(
            output={"message": {"role": "assistant", "content": [{"text": text}]}},
            stopReason="end_turn",
            usage={
                "inputTokens": _INVOKE_IN,
                "outputTokens": _INVOKE_OUT,
                "totalTokens": _INVOKE_IN + _INVOKE_OUT,
            },
        )
    elif family == "llama":
        answer.update(
            generation=text,
            prompt_token_count=_INVOKE_IN,
            generation_token_count=_INVOKE_OUT,
            stop_reason="stop",
        )
    elif family == "titan":
        answer.update(
            inputTextTokenCount=_INVOKE_IN,
            results=[{"tokenCount": _INVOKE_OUT, "outputText": text, "completionReason": "FINISH"}],
        )
    return orjson.dumps(answer)


def invoke_stream_chunks(model: str = "") -> list[dict[str, Any]]:
    """InvokeModelWithResponseStream's chunks, each as the model family streams them; the
    last carries Bedrock's ``amazon-bedrock-invocationMetrics``."""
    family = model_family(model)
    chunks: list[dict[str, Any]]
    if family == "anthropic":
        chunks = [
            {
                "type": "message_start",
                "message": {
                    "id": "msg_simulated",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": _STREAM_IN, "output_tokens": 1},
                },
            },
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            *(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": t},
                }
                for t in _STREAM_TEXT
            ),
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": _STREAM_OUT},
            },
            {"type": "message_stop"},
        ]
    elif family == "nova":
        chunks = [
            {"messageStart": {"role": "assistant"}},
            *(
                {"contentBlockDelta": {"delta": {"text": t}, "contentBlockIndex": 0}}
                for t in _STREAM_TEXT
            ),
            {"contentBlockStop": {"contentBlockIndex": 0}},
            {"messageStop": {"stopReason": "end_turn"}},
            {"metadata": {"usage": {"inputTokens": _STREAM_IN, "outputTokens": _STREAM_OUT}}},
        ]
    elif family == "llama":
        chunks = [
            {
                "generation": t,
                "prompt_token_count": _STREAM_IN if i == 0 else None,
                "generation_token_count": i + 1,
                "stop_reason": "stop" if i == len(_STREAM_TEXT) - 1 else None,
            }
            for i, t in enumerate(_STREAM_TEXT)
        ]
    elif family == "titan":
        chunks = [
            {
                "outputText": t,
                "index": 0,
                "totalOutputTextTokenCount": i + 1,
                "completionReason": "FINISH" if i == len(_STREAM_TEXT) - 1 else None,
                "inputTextTokenCount": _STREAM_IN,
            }
            for i, t in enumerate(_STREAM_TEXT)
        ]
    else:
        chunks = [{"type": "content_block_delta", "delta": {"text": t}} for t in _STREAM_TEXT]
    chunks[-1]["amazon-bedrock-invocationMetrics"] = {
        "inputTokenCount": _STREAM_IN,
        "outputTokenCount": _STREAM_OUT,
        "invocationLatency": 200,
        "firstByteLatency": 50,
    }
    return chunks


def invoke_stream_frames(model: str = "") -> list[bytes]:
    return [
        eventstream.encode_frame(
            {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"},
            orjson.dumps({"bytes": base64.b64encode(orjson.dumps(c)).decode()}),
        )
        for c in invoke_stream_chunks(model)
    ]


def agent_frames(agent_id: str, payload: Any) -> list[bytes]:
    """InvokeAgent's event stream: with ``enableTrace``, the orchestration's two model
    invocations (their input and output as two trace events each, as Bedrock sends the
    union), then the answer's chunks."""
    payload = payload if isinstance(payload, dict) else {}
    frames = []
    if payload.get("enableTrace"):
        for tokens in ((100, 20), (150, 30)):
            for step in (
                {"modelInvocationInput": {"foundationModel": AGENT_MODEL, "type": "ORCHESTRATION"}},
                {
                    "modelInvocationOutput": {
                        "metadata": {"usage": {"inputTokens": tokens[0], "outputTokens": tokens[1]}}
                    }
                },
            ):
                trace = {"agentId": agent_id, "trace": {"orchestrationTrace": step}}
                frames.append(event_frame("trace", trace))
    for part in (str(payload.get("inputText", "")), "done"):
        chunk = base64.b64encode(f"agent {agent_id} says: {part}".encode()).decode()
        frames.append(
            eventstream.encode_frame(
                {
                    ":event-type": "chunk",
                    ":content-type": "application/json",
                    ":message-type": "event",
                },
                orjson.dumps({"bytes": chunk}),
            )
        )
    return frames


AGENT_MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
# AgentCore's runtime session header, and what a simulated runtime says.
RUNTIME_SESSION_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"
AGENT_WORDS = ("Hello", "from", "the", "agent")


def foundation_models() -> dict[str, Any]:
    """ListFoundationModels: the models the simulator answers, one per family."""
    summaries = []
    for model_id, provider in (
        ("anthropic.claude-3-haiku-20240307-v1:0", "Anthropic"),
        ("anthropic.claude-sonnet-4-5-20250929-v1:0", "Anthropic"),
        ("amazon.nova-lite-v1:0", "Amazon"),
        ("amazon.titan-text-express-v1", "Amazon"),
        ("meta.llama3-1-8b-instruct-v1:0", "Meta"),
    ):
        summaries.append(
            {
                "modelArn": f"arn:aws:bedrock:us-east-1::foundation-model/{model_id}",
                "modelId": model_id,
                "modelName": model_id.split(".", 1)[1],
                "providerName": provider,
                "inputModalities": ["TEXT"],
                "outputModalities": ["TEXT"],
                "responseStreamingSupported": True,
                "customizationsSupported": [],
                "inferenceTypesSupported": ["ON_DEMAND"],
                "modelLifecycle": {"status": "ACTIVE"},
            }
        )
    return {"modelSummaries": summaries}


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
