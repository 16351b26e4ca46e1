"""A fake Bedrock AgentCore data plane (bedrock-agentcore) for the tests, on the fake
Bedrock's signature check (SigV4 recomputed with botocore's signer, scoped to
``bedrock-agentcore``) and the real wire shapes: an agent runtime's streamed answer (a
blob, here server-sent events) with its session header, memory events and records, and a
code interpreter's sessions with its event-stream answers."""

from __future__ import annotations

import itertools
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

from aiohttp import web
from multidict import CIMultiDict

from proxy.wire.eventstream import encode_frame
from tests.fake_bedrock import (
    FakeBedrock,
    Received,
    _connection_of,
    aws_error,
    json_response,
)

RUNTIME_SESSION = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"
CI_SESSION = "x-amzn-code-interpreter-session-id"

_ROUTES = [
    ("POST", r"/runtimes/(?P<agentRuntimeArn>[^/]+)/invocations", "InvokeAgentRuntime"),
    ("POST", r"/runtimes/(?P<agentRuntimeArn>[^/]+)/stopruntimesession", "StopRuntimeSession"),
    ("POST", r"/memories/(?P<memoryId>[^/]+)/events", "CreateEvent"),
    (
        "POST",
        r"/memories/(?P<memoryId>[^/]+)/actor/(?P<actorId>[^/]+)/sessions/(?P<sessionId>[^/]+)",
        "ListEvents",
    ),
    ("POST", r"/memories/(?P<memoryId>[^/]+)/retrieve", "RetrieveMemoryRecords"),
    ("PUT", r"/code-interpreters/(?P<id>[^/]+)/sessions/start", "StartCodeInterpreterSession"),
    ("PUT", r"/code-interpreters/(?P<id>[^/]+)/sessions/stop", "StopCodeInterpreterSession"),
    ("POST", r"/code-interpreters/(?P<id>[^/]+)/sessions/list", "ListCodeInterpreterSessions"),
    ("POST", r"/code-interpreters/(?P<id>[^/]+)/tools/invoke", "InvokeCodeInterpreter"),
]
_COMPILED = [(m, re.compile(p), name) for m, p, name in _ROUTES]
_EVENT_IDS = itertools.count(1)


@dataclass
class FakeAgentCore(FakeBedrock):
    signing_name: str = "bedrock-agentcore"
    # (code interpreter, session id) -> "READY" or "TERMINATED"
    ci_sessions: dict[tuple[str, str], str] = field(default_factory=dict)
    # (memory, actor, session) -> events
    events: dict[tuple[str, str, str], list[dict[str, Any]]] = field(default_factory=dict)
    # what each runtime invocation received: (runtime ARN, session id, payload)
    invocations: list[tuple[str, str, bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        error, _ = self._check_auth(request, body)
        path, _, query = request.raw_path.partition("?")
        operation, params = None, {}
        for method, pattern, name in _COMPILED:
            m = pattern.fullmatch(path)
            if m and method == request.method:
                operation, params = name, {k: unquote(v) for k, v in m.groupdict().items()}
                break
        self.requests.append(_received(request, body, operation or ""))
        if error is not None:
            return error
        if operation is None:
            return aws_error(404, "UnknownOperationException", "Unknown operation")
        handler = getattr(self, "op_" + operation)
        return await handler(request, params, body, parse_qs(query))

    # ------------------------------------------------------------------ runtime

    async def op_InvokeAgentRuntime(self, request, params, body, query):
        session = request.headers.get(RUNTIME_SESSION) or str(uuid.uuid4())
        self.invocations.append((params["agentRuntimeArn"], session, body))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", RUNTIME_SESSION: session}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        for word in ("Hello", "from", "the", "agent"):
            await response.write(f"data: {json.dumps({'text': word})}\n\n".encode())
        await response.write_eof()
        return response

    async def op_StopRuntimeSession(self, request, params, body, query):
        response = json_response({})
        response.headers[RUNTIME_SESSION] = request.headers.get(RUNTIME_SESSION, "")
        return response

    # ------------------------------------------------------------------ memory

    async def op_CreateEvent(self, request, params, body, query):
        payload = json.loads(body)
        key = (params["memoryId"], payload["actorId"], payload["sessionId"])
        event = {
            "memoryId": params["memoryId"],
            "actorId": payload["actorId"],
            "sessionId": payload["sessionId"],
            "eventId": f"0000001-{next(_EVENT_IDS):08d}",
            "eventTimestamp": payload.get("eventTimestamp", time.time()),
            "payload": payload.get("payload", []),
        }
        self.events.setdefault(key, []).append(event)
        return json_response({"event": event})

    async def op_ListEvents(self, request, params, body, query):
        key = (params["memoryId"], params["actorId"], params["sessionId"])
        return json_response({"events": self.events.get(key, [])})

    async def op_RetrieveMemoryRecords(self, request, params, body, query):
        records = [
            {
                "memoryRecordId": "mem-rec-0001",
                "content": {"text": "The user prefers short answers."},
                "memoryStrategyId": "preferences-0001",
                "namespaces": ["/users/alice"],
                "createdAt": time.time(),
                "score": 0.9,
            }
        ]
        return json_response({"memoryRecordSummaries": records})

    # ------------------------------------------------------------------ code interpreter

    async def op_StartCodeInterpreterSession(self, request, params, body, query):
        session = uuid.uuid4().hex
        self.ci_sessions[(params["id"], session)] = "READY"
        return json_response(
            {"codeInterpreterIdentifier": params["id"], "sessionId": session, "createdAt": 0}
        )

    async def op_StopCodeInterpreterSession(self, request, params, body, query):
        session = query.get("sessionId", [""])[0]
        if self.ci_sessions.get((params["id"], session)) is None:
            return aws_error(404, "ResourceNotFoundException", "No such session")
        self.ci_sessions[(params["id"], session)] = "TERMINATED"
        return json_response(
            {"codeInterpreterIdentifier": params["id"], "sessionId": session, "lastUpdatedAt": 0}
        )

    async def op_ListCodeInterpreterSessions(self, request, params, body, query):
        items = [
            {
                "codeInterpreterIdentifier": ci,
                "sessionId": session,
                "status": status,
                "createdAt": 0,
                "lastUpdatedAt": 0,
            }
            for (ci, session), status in self.ci_sessions.items()
            if ci == params["id"]
        ]
        return json_response({"items": items})

    async def op_InvokeCodeInterpreter(self, request, params, body, query):
        session = request.headers.get(CI_SESSION, "")
        if self.ci_sessions.get((params["id"], session)) != "READY":
            return aws_error(404, "ResourceNotFoundException", "No such session")
        arguments = json.loads(body).get("arguments", {})
        text = f"ran: {arguments.get('code', '')}"
        result = {"content": [{"type": "text", "text": text}], "isError": False}
        frame = encode_frame(
            {
                ":event-type": "result",
                ":content-type": "application/json",
                ":message-type": "event",
            },
            json.dumps(result).encode(),
        )
        return await self._stream(request, "ci", [frame], {CI_SESSION: session})


def _received(request: web.Request, body: bytes, operation: str) -> Received:
    return Received(
        request.method,
        request.raw_path,
        CIMultiDict(request.headers),
        body,
        operation,
        None,
        *_connection_of(request),
    )
