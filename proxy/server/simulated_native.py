"""The simulator's answers to Bedrock's native operations, in their real wire formats:
Converse and its stream, InvokeModel and its stream in each model family's own format
(Anthropic, Nova, Llama, Titan), InvokeAgent's event stream, Retrieve,
ListFoundationModels and AgentCore's InvokeAgentRuntime. Built here once: the simulator
serves them, and so does the tests' fake upstream (which adds signature checks, faults and
jobs). ``simulated_compat`` holds the OpenAI and Anthropic APIs' answers."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import orjson

from ..wire import eventstream


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
    chunks = _STREAMS.get(model_family(model), _generic_stream)(model)
    chunks[-1]["amazon-bedrock-invocationMetrics"] = {
        "inputTokenCount": _STREAM_IN,
        "outputTokenCount": _STREAM_OUT,
        "invocationLatency": 200,
        "firstByteLatency": 50,
    }
    return chunks


def _anthropic_stream(model: str) -> list[dict[str, Any]]:
    message: dict[str, Any] = {
        "id": "msg_simulated",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": _STREAM_IN, "output_tokens": 1},
    }
    return [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        *(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}
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


def _nova_stream(model: str) -> list[dict[str, Any]]:
    return [
        {"messageStart": {"role": "assistant"}},
        *(
            {"contentBlockDelta": {"delta": {"text": t}, "contentBlockIndex": 0}}
            for t in _STREAM_TEXT
        ),
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "end_turn"}},
        {"metadata": {"usage": {"inputTokens": _STREAM_IN, "outputTokens": _STREAM_OUT}}},
    ]


def _llama_stream(model: str) -> list[dict[str, Any]]:
    last = len(_STREAM_TEXT) - 1
    return [
        {
            "generation": t,
            "prompt_token_count": _STREAM_IN if i == 0 else None,
            "generation_token_count": i + 1,
            "stop_reason": "stop" if i == last else None,
        }
        for i, t in enumerate(_STREAM_TEXT)
    ]


def _titan_stream(model: str) -> list[dict[str, Any]]:
    last = len(_STREAM_TEXT) - 1
    return [
        {
            "outputText": t,
            "index": 0,
            "totalOutputTextTokenCount": i + 1,
            "completionReason": "FINISH" if i == last else None,
            "inputTextTokenCount": _STREAM_IN,
        }
        for i, t in enumerate(_STREAM_TEXT)
    ]


def _generic_stream(model: str) -> list[dict[str, Any]]:
    return [{"type": "content_block_delta", "delta": {"text": t}} for t in _STREAM_TEXT]


_STREAMS = {
    "anthropic": _anthropic_stream,
    "nova": _nova_stream,
    "llama": _llama_stream,
    "titan": _titan_stream,
}


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
