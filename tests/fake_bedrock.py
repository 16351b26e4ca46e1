"""A fake AWS Bedrock for the tests: the three services on one loopback port.

It checks requests the way AWS does, independently of the proxy's own signer: SigV4 is
recomputed with botocore's ``SigV4Auth`` (double-encoded canonical URI, only the signed
headers, the payload hash, clock skew, session token). Responses use the real wire shapes:
REST-JSON bodies, AWS error headers, and event-stream frames with CRCs.

Faults are chosen by model ID, so any client can trigger them:
``test.throttle`` 429, ``test.error500`` 500, ``test.reset`` reset before headers,
``test.stall`` no answer, ``test.cut`` stream cut mid-frame, ``test.slow`` paced frames,
``test.stall-stream`` a stream that stops sending, ``test.big`` a 3 MiB body,
``test.stall-body`` a small answer that stops after its headers, ``test.bad-crc`` a stream
whose second frame fails its message CRC, ``test.denied`` AWS's access denied naming the
caller's principal, ``test.hold`` an answer held until the test
sets the request's event in ``holds``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import re
import time
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from proxy.server import simulated_native as simulator
from proxy.wire.eventsig import STREAMING_EVENTS, ChunkSignatureError, SignatureChain
from proxy.wire.eventstream import FrameSplitter, exception_frame, iter_frames
from tests.sigcheck import expected_signature

UPSTREAM_ACCESS_KEY = "AKIDUPSTREAMFAKE0001"
UPSTREAM_SECRET_KEY = "upstream/secret+key/for/the/fake"
UPSTREAM_SESSION_TOKEN = "upstream-session-token-xyz"
UPSTREAM_BEARER = "bedrock-api-key-upstream-fake"
MAX_SKEW = 300
DENIED_PRINCIPAL = "arn:aws:sts::123456789012:assumed-role/BedrockProxyRole/proxy-session-1"

_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
    r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})"
)


@dataclass
class Received:
    method: str
    raw_path: str
    headers: CIMultiDict[str]
    body: bytes
    operation: str
    region: str | None
    # The HTTP version (1 or 2) and the proxy's port: which connection carried the request.
    http_version: int = 1
    peer_port: int = 0


def _connection_of(request: web.Request) -> tuple[int, int]:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return request.version.major, peer[1] if peer else 0


# Job and invocation ids: unique for the whole session, like AWS's.
_IDS = itertools.count(1)


@dataclass
class FakeBedrock:
    requests: list[Received] = field(default_factory=list)
    frame_delay: float = 0.05
    frames_sent_at: list[float] = field(default_factory=list)
    active_streams: int = 0
    stream_disconnects: int = 0
    jobs: dict[str, dict] = field(default_factory=dict)
    async_invokes: dict[str, dict] = field(default_factory=dict)
    # Real model ids whose streams are paced like test.slow's (reset by the fixture).
    slow_models: set[str] = field(default_factory=set)
    # Application inference profiles and provisioned throughput: ARN -> the model it runs.
    model_refs: dict[str, str] = field(default_factory=dict)
    expected_token: str | None = UPSTREAM_SESSION_TOKEN
    # When set, a job writes "<input>.out" under its output URI as it completes, as Bedrock does.
    s3: Any = None
    # InvokeModelWithBidirectionalStream: the client events received (decoded), how many
    # sessions ended with their signed empty frame, and frames refused for their signature.
    bidi_events: list[dict] = field(default_factory=list)
    bidi_completed: int = 0
    bidi_bad_signatures: int = 0
    bidi_disconnects: int = 0
    # Upstream routing: the account this fake stands for (in the ARNs it mints), the
    # credentials it accepts besides the default pair (access key -> (secret, token): an
    # account's own keys, or a role session issued by the fake STS), and a fault on every
    # model call ("throttle" 429, "unavailable" 503, "error500" 500) to force failovers.
    account_id: str = "123456789012"
    credentials: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    accept_default: bool = True
    fault: str | None = None
    # The service a signature's credential scope must name.
    signing_name: str = "bedrock"
    # test.hold: one event per request held, in arrival order; set it to let it answer.
    holds: list[asyncio.Event] = field(default_factory=list)

    def reset(self) -> None:
        """Every field back to its default between tests, so no test sees another's
        settings or records (open streams are counted by the connections themselves)."""
        for spec in fields(self):
            if spec.name in ("active_streams",):
                continue
            if spec.default_factory is not MISSING:
                setattr(self, spec.name, spec.default_factory())
            else:
                setattr(self, spec.name, spec.default)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2 * 1024**3)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    # ------------------------------------------------------------------ entry

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.raw_path.split("?", 1)[0].endswith("/invoke-with-bidirectional-stream"):
            return await self.bidirectional(request)
        body = await request.read()
        error, region = self._check_auth(request, body)
        operation, params = _route(request.method, request.raw_path.split("?", 1)[0])
        self.requests.append(
            Received(
                request.method,
                request.raw_path,
                CIMultiDict(request.headers),
                body,
                operation or "",
                region,
                *_connection_of(request),
            )
        )
        if error is not None:
            return error
        if operation is None:
            return aws_error(404, "UnknownOperationException", "Unknown operation")
        handler = getattr(self, "op_" + operation, None)
        if handler is None:
            return aws_error(404, "UnknownOperationException", f"fake has no {operation}")
        model = params.get("modelId", "")
        fault = await self._fault(request, model)
        if fault is not None:
            return fault
        return await handler(request, params, body)

    def _check_auth(
        self, request: web.Request, body: bytes
    ) -> tuple[web.Response | None, str | None]:
        authorization = request.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            if authorization[7:] != UPSTREAM_BEARER:
                return aws_error(403, "UnrecognizedClientException", "Invalid API key"), None
            return None, None
        m = _AUTH_RE.fullmatch(authorization)
        if m is None:
            return aws_error(
                403, "MissingAuthenticationTokenException", "Missing Authentication Token"
            ), None
        akid, day, region, service, signed, signature = m.groups()
        secret, expected_token = self.credentials.get(akid, (None, None))
        if akid == UPSTREAM_ACCESS_KEY and self.accept_default:
            secret, expected_token = UPSTREAM_SECRET_KEY, self.expected_token
        if secret is None:
            return aws_error(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            ), region
        if service != self.signing_name:
            return aws_error(
                403,
                "InvalidSignatureException",
                f"Credential should be scoped to correct service: '{self.signing_name}'.",
            ), region
        date = request.headers.get("X-Amz-Date", "")
        try:
            when = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            return aws_error(403, "IncompleteSignatureException", "Missing X-Amz-Date"), region
        if abs(time.time() - when.timestamp()) > MAX_SKEW or date[:8] != day:
            return aws_error(403, "InvalidSignatureException", "Signature expired"), region
        names = signed.split(";")
        for name in request.headers:
            lname = name.lower()
            if lname.startswith("x-amz-") and lname not in names:
                return aws_error(
                    403, "InvalidSignatureException", f"Header {lname} must be signed"
                ), region
        if "host" not in names:
            return aws_error(403, "InvalidSignatureException", "host must be signed"), region
        token = request.headers.get("X-Amz-Security-Token")
        if token != expected_token:
            return aws_error(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            ), region
        declared = request.headers.get("X-Amz-Content-SHA256")
        if (
            declared is not None
            and declared not in ("UNSIGNED-PAYLOAD", STREAMING_EVENTS)
            and declared != hashlib.sha256(body).hexdigest()
        ):
            return aws_error(400, "XAmzContentSHA256Mismatch", "payload hash mismatch"), region
        headers = {n: request.headers[n] for n in names if n in request.headers}
        if len(headers) != len(names):
            return aws_error(403, "InvalidSignatureException", "signed header missing"), region
        expected = expected_signature(
            request, body, names, (akid, secret, token), service, region, date
        )
        if expected != signature:
            return aws_error(
                403,
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided.",
            ), region
        return None, region

    async def bidirectional(self, request: web.Request) -> web.StreamResponse:
        """Nova Sonic's wire as AWS speaks it: HTTP/2 only; every client frame's chunk
        signature checked on the request's chain; each event answered as it arrives (a
        textOutput, then a cumulative usageEvent), while the request is still open."""
        error, region = self._check_auth(request, b"")
        model = unquote(request.raw_path.split("/")[2])
        self.requests.append(
            Received(
                request.method,
                request.raw_path,
                CIMultiDict(request.headers),
                b"",
                "InvokeModelWithBidirectionalStream",
                region,
                *_connection_of(request),
            )
        )
        if error is not None:
            return error
        if request.version.major != 2:
            return aws_error(400, "ValidationException", "HTTP/2 is required")
        if request.headers.get("X-Amz-Content-SHA256") != STREAMING_EVENTS:
            return aws_error(400, "ValidationException", "The event stream must be signed")
        m = _AUTH_RE.fullmatch(request.headers["Authorization"])
        assert m is not None  # checked above
        _, day, region, service, _, seed = m.groups()
        chain = SignatureChain.for_credentials(UPSTREAM_SECRET_KEY, day, region, service, seed)
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/vnd.amazon.eventstream",
                "x-amzn-RequestId": "fake-request-id",
            }
        )
        await response.prepare(request)
        splitter = FrameSplitter()
        turns = 0
        self.active_streams += 1
        try:
            async for data in request.content.iter_any():
                for frame in iter_frames(splitter.feed(data)):
                    try:
                        payload = chain.verify(frame)
                    except ChunkSignatureError as exc:
                        self.bidi_bad_signatures += 1
                        await response.write(exception_frame("validationException", str(exc)))
                        await response.write_eof()
                        return response
                    if not payload:
                        self.bidi_completed += 1
                        await response.write_eof()
                        return response
                    inner = next(iter_frames(payload))
                    event = json.loads(base64.b64decode(json.loads(inner.payload)["bytes"]))
                    self.bidi_events.append(event)
                    turns += 1
                    text = event.get("event", {}).get("text", "")
                    for answer in (
                        {"event": {"textOutput": {"content": f"{model}: {text}", "turn": turns}}},
                        {
                            "event": {
                                "usageEvent": {
                                    "totalInputTokens": 10 * turns,
                                    "totalOutputTokens": 5 * turns,
                                    "totalTokens": 15 * turns,
                                }
                            }
                        },
                    ):
                        encoded = base64.b64encode(json.dumps(answer).encode()).decode()
                        await response.write(event_frame("chunk", {"bytes": encoded}))
                    if model == "test.cut":  # the upstream goes away mid-session
                        request.transport.abort()
                        return response
            return response  # the client ended without its final frame
        except (ConnectionError, asyncio.CancelledError):
            self.bidi_disconnects += 1
            raise
        finally:
            self.active_streams -= 1

    async def _fault(self, request: web.Request, model: str) -> web.StreamResponse | None:
        if self.fault is not None:
            model = "test." + self.fault
        if model == "test.unavailable":
            return aws_error(503, "ServiceUnavailableException", "Service is unavailable.")
        if model == "test.throttle":
            return aws_error(
                429, "ThrottlingException", "Too many requests, please wait before trying again."
            )
        if model == "test.error500":
            return aws_error(
                500, "InternalServerException", "The server encountered an internal error."
            )
        if model == "test.reset":
            request.transport.abort()
            await asyncio.sleep(0.1)
            return web.Response()
        if model == "test.denied":  # as AWS words it: the caller's principal, named
            return aws_error(
                403,
                "AccessDeniedException",
                f"User: {DENIED_PRINCIPAL} is not authorized to perform: "
                "bedrock:InvokeModel on resource: arn:aws:bedrock:us-east-1::foundation-model/"
                "test.denied because no identity-based policy allows the bedrock:InvokeModel "
                "action",
            )
        if model == "test.stall":
            await asyncio.sleep(3600)
        if model == "test.stall-body":  # a small answer's head, a few bytes, then nothing
            response = web.StreamResponse(
                headers={"Content-Type": "application/json", "Content-Length": "200"}
            )
            await response.prepare(request)
            await response.write(b'{"output": ')
            await asyncio.sleep(3600)
        if model == "test.hold":
            held = asyncio.Event()
            self.holds.append(held)
            await held.wait()
        return None

    # ------------------------------------------------------------------ runtime

    async def op_Converse(self, request, params, body):
        try:
            payload = json.loads(body)
        except ValueError:
            return aws_error(
                400,
                "ValidationException",
                "Malformed input request, please reformat your input and try again.",
            )
        if not isinstance(payload, dict) or "messages" not in payload:
            return aws_error(400, "ValidationException", "messages is required")
        return json_response(simulator.converse_answer(params["modelId"]))

    async def op_ConverseStream(self, request, params, body):
        model = params["modelId"]
        deltas = None
        if model == "test.slow" or model in self.slow_models:
            deltas = [f"w{i} " for i in range(10)]
        frames = simulator.converse_stream_frames(model, deltas)
        return await self._stream(request, model, frames)

    async def op_InvokeModel(self, request, params, body):
        model = params["modelId"]
        if model == "test.big":
            data = bytes(range(256)) * (3 * 1024 * 1024 // 256)
            return web.Response(body=data, content_type="application/octet-stream")
        if model == "test.cut-body":  # a large answer that stops a third of the way
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.content_length = 3 * 1024 * 1024
            await response.prepare(request)
            await response.write(b"x" * (1024 * 1024))
            await asyncio.sleep(0.05)
            request.transport.abort()
            return response
        try:
            payload = json.loads(body)
        except ValueError:
            return aws_error(
                400,
                "ValidationException",
                "Malformed input request, please reformat your input and try again.",
            )
        reply = simulator.invoke_answer(model, body, payload)
        return web.Response(
            body=reply,
            headers={
                "Content-Type": request.headers.get("Accept", "application/json"),
                **simulator.INVOKE_USAGE_HEADERS,
                "x-amzn-RequestId": "fake-invoke-request-id",
            },
        )

    async def op_InvokeModelWithResponseStream(self, request, params, body):
        model = params["modelId"]
        frames = simulator.invoke_stream_frames(model)
        return await self._stream(request, model, frames)

    async def op_CountTokens(self, request, params, body):
        return json_response({"inputTokens": 17})

    async def op_ApplyGuardrail(self, request, params, body):
        return json_response(
            {
                "usage": {
                    "topicPolicyUnits": 1,
                    "contentPolicyUnits": 2,
                    "wordPolicyUnits": 1,
                    "sensitiveInformationPolicyUnits": 0,
                    "sensitiveInformationPolicyFreeUnits": 0,
                    "contextualGroundingPolicyUnits": 0,
                },
                "action": "NONE",
                "outputs": [],
                "assessments": [],
                "guardrailIdentifier": params["guardrailIdentifier"],
            }
        )

    # ------------------------------------------------------------------ agent runtime

    async def op_Retrieve(self, request, params, body):
        return json_response(simulator.retrieve_answer(params["knowledgeBaseId"]))

    async def op_Rerank(self, request, params, body):
        payload = json.loads(body)
        config = payload["rerankingConfiguration"]["bedrockRerankingConfiguration"]
        count = min(len(payload["sources"]), config.get("numberOfResults", 10))
        return json_response(
            {"results": [{"index": i, "relevanceScore": 1.0 - i / 100} for i in range(count)]}
        )

    async def op_RetrieveAndGenerate(self, request, params, body):
        return json_response(
            {"sessionId": "sess-1", "output": {"text": "generated answer"}, "citations": []}
        )

    async def op_InvokeAgent(self, request, params, body):
        frames = simulator.agent_frames(params["agentId"], json.loads(body))
        return await self._stream(
            request,
            "",
            frames,
            headers={
                "x-amz-bedrock-agent-session-id": params["sessionId"],
                "x-amzn-bedrock-agent-content-type": "application/json",
            },
        )

    # ------------------------------------------------------------------ control plane

    async def op_ListFoundationModels(self, request, params, body):
        return json_response(
            {
                "modelSummaries": [
                    {
                        "modelArn": "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-haiku-20240307-v1:0",
                        "modelId": "anthropic.claude-3-haiku-20240307-v1:0",
                        "providerName": "Anthropic",
                        "inputModalities": ["TEXT"],
                        "outputModalities": ["TEXT"],
                        "responseStreamingSupported": True,
                    }
                ]
            }
        )

    async def op_GetInferenceProfile(self, request, params, body):
        arn = params["inferenceProfileIdentifier"]
        model = self.model_refs.get(arn)
        if model is None:
            return aws_error(404, "ResourceNotFoundException", "No such inference profile")
        return json_response(
            {
                "inferenceProfileArn": arn,
                "inferenceProfileId": arn.rsplit("/", 1)[-1],
                "type": "APPLICATION",
                "status": "ACTIVE",
                "models": [
                    {"modelArn": f"arn:aws:bedrock:us-east-1::foundation-model/{model}"},
                    {"modelArn": f"arn:aws:bedrock:us-west-2::foundation-model/{model}"},
                ],
            }
        )

    async def op_GetProvisionedModelThroughput(self, request, params, body):
        arn = params["provisionedModelId"]
        model = self.model_refs.get(arn)
        if model is None:
            return aws_error(404, "ResourceNotFoundException", "No such provisioned model")
        return json_response(
            {
                "provisionedModelArn": arn,
                "modelArn": f"arn:aws:bedrock:us-east-1::foundation-model/{model}",
                "foundationModelArn": f"arn:aws:bedrock:us-east-1::foundation-model/{model}",
                "status": "InService",
            }
        )

    async def op_CreateModelInvocationJob(self, request, params, body):
        spec = json.loads(body)
        job_id = f"job{next(_IDS):04d}"  # never reused, across resets too, as on AWS
        arn = f"arn:aws:bedrock:{self._region(request)}:{self.account_id}:model-invocation-job/{job_id}"
        self.jobs[job_id] = {
            "jobArn": arn,
            "jobName": spec["jobName"],
            "modelId": spec["modelId"],
            "roleArn": spec["roleArn"],
            "status": "Submitted",
            "submitTime": "2026-11-22T00:00:00Z",
            "inputDataConfig": spec["inputDataConfig"],
            "outputDataConfig": spec["outputDataConfig"],
        }
        return json_response({"jobArn": arn})

    async def op_GetModelInvocationJob(self, request, params, body):
        job = self._job(params["jobIdentifier"])
        if job is None:
            return aws_error(404, "ResourceNotFoundException", "The specified job does not exist")
        if job["status"] == "Submitted":
            job["status"] = "Completed"
            self._write_output(job)
        return json_response(job)

    async def op_ListModelInvocationJobs(self, request, params, body):
        return _page(request, "invocationJobSummaries", list(self.jobs.values()))

    async def op_StartAsyncInvoke(self, request, params, body):
        spec = json.loads(body)
        invocation_id = f"{next(_IDS):012d}"
        arn = f"arn:aws:bedrock:{self._region(request)}:{self.account_id}:async-invoke/{invocation_id}"
        self.async_invokes[arn] = {
            "invocationArn": arn,
            "modelArn": f"arn:aws:bedrock:us-east-1::foundation-model/{spec['modelId']}",
            "status": "InProgress",
            "submitTime": "2026-11-22T00:00:00Z",
            "outputDataConfig": spec["outputDataConfig"],
        }
        return json_response({"invocationArn": arn})

    async def op_GetAsyncInvoke(self, request, params, body):
        found = self.async_invokes.get(params["invocationArn"])
        if found is None:
            return aws_error(404, "ResourceNotFoundException", "The invocation does not exist")
        return json_response(found)

    async def op_ListAsyncInvokes(self, request, params, body):
        return _page(request, "asyncInvokeSummaries", list(self.async_invokes.values()))

    async def op_StopModelInvocationJob(self, request, params, body):
        job = self._job(params["jobIdentifier"])
        if job is None:
            return aws_error(404, "ResourceNotFoundException", "The specified job does not exist")
        job["status"] = "Stopping"
        return json_response({})

    def _write_output(self, job: dict) -> None:
        if self.s3 is None:
            return
        from tests.fake_s3 import Obj

        in_bucket, _, in_key = job["inputDataConfig"]["s3InputDataConfig"]["s3Uri"][5:].partition(
            "/"
        )
        out_bucket, _, out_prefix = job["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"][
            5:
        ].partition("/")
        source = self.s3.buckets.get(in_bucket, {}).get(in_key)
        lines = source.data.decode().splitlines() if source else []
        out = "".join(
            json.dumps(
                {
                    "recordId": json.loads(line).get("recordId"),
                    "modelOutput": {"completion": "done"},
                }
            )
            + "\n"
            for line in lines
        )
        job_id = job["jobArn"].rsplit("/", 1)[-1]
        name = in_key.rsplit("/", 1)[-1]
        self.s3.buckets.setdefault(out_bucket, {})[f"{out_prefix}{job_id}/{name}.out"] = Obj(
            out.encode(), f'"{hashlib.md5(out.encode()).hexdigest()}"', "application/jsonl"
        )
        # The job's token counts, as Bedrock writes them: 10 in and 5 out per record.
        manifest = json.dumps(
            {
                "totalRecordCount": len(lines),
                "processedRecordCount": len(lines),
                "successRecordCount": len(lines),
                "errorRecordCount": 0,
                "inputTokenCount": 10 * len(lines),
                "outputTokenCount": 5 * len(lines),
            }
        ).encode()
        self.s3.buckets[out_bucket][f"{out_prefix}{job_id}/manifest.json.out"] = Obj(
            manifest, f'"{hashlib.md5(manifest).hexdigest()}"', "application/json"
        )

    def _region(self, request: web.Request) -> str:
        """The region the request was signed for (where the job is made), as AWS's."""
        m = _AUTH_RE.fullmatch(request.headers.get("Authorization", ""))
        return m.group(3) if m else "us-east-1"

    def _job(self, identifier: str) -> dict | None:
        return self.jobs.get(identifier.rsplit("/", 1)[-1])

    # ------------------------------------------------------------------ streaming

    async def _stream(self, request, model, frames, headers=None):
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/vnd.amazon.eventstream",
                "x-amzn-RequestId": "fake-stream-id",
                **(headers or {}),
            }
        )
        if request.version.major < 2:  # HTTP/2 frames the body itself
            response.enable_chunked_encoding()
        await response.prepare(request)
        self.active_streams += 1
        try:
            for i, frame in enumerate(frames):
                if model == "test.cut" and i == 2:
                    await response.write(frame[: len(frame) // 2])
                    await asyncio.sleep(0.05)
                    request.transport.abort()
                    return response
                if model == "test.stall-stream" and i == 1:
                    await asyncio.sleep(3600)
                if model == "test.bad-crc" and i == 1:
                    frame = frame[:-1] + bytes([frame[-1] ^ 0xFF])  # the message CRC
                if model == "test.slow" or model in self.slow_models:
                    await asyncio.sleep(self.frame_delay)
                self.frames_sent_at.append(time.monotonic())
                await response.write(frame)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.stream_disconnects += 1
            raise
        finally:
            self.active_streams -= 1
        return response


_ROUTES = [
    ("POST", r"/model/(?P<modelId>[^/]+)/converse", "Converse"),
    ("POST", r"/model/(?P<modelId>[^/]+)/converse-stream", "ConverseStream"),
    ("POST", r"/model/(?P<modelId>[^/]+)/invoke", "InvokeModel"),
    (
        "POST",
        r"/model/(?P<modelId>[^/]+)/invoke-with-response-stream",
        "InvokeModelWithResponseStream",
    ),
    ("POST", r"/model/(?P<modelId>[^/]+)/count-tokens", "CountTokens"),
    (
        "POST",
        r"/guardrail/(?P<guardrailIdentifier>[^/]+)/version/(?P<guardrailVersion>[^/]+)/apply",
        "ApplyGuardrail",
    ),
    ("POST", r"/knowledgebases/(?P<knowledgeBaseId>[^/]+)/retrieve", "Retrieve"),
    ("POST", r"/retrieveAndGenerate", "RetrieveAndGenerate"),
    ("POST", r"/rerank", "Rerank"),
    (
        "POST",
        r"/agents/(?P<agentId>[^/]+)/agentAliases/(?P<agentAliasId>[^/]+)/sessions/(?P<sessionId>[^/]+)/text",
        "InvokeAgent",
    ),
    ("GET", r"/foundation-models", "ListFoundationModels"),
    ("POST", r"/model-invocation-job", "CreateModelInvocationJob"),
    ("GET", r"/model-invocation-job/(?P<jobIdentifier>[^/]+)", "GetModelInvocationJob"),
    ("GET", r"/model-invocation-jobs", "ListModelInvocationJobs"),
    ("POST", r"/model-invocation-job/(?P<jobIdentifier>[^/]+)/stop", "StopModelInvocationJob"),
    ("POST", r"/async-invoke", "StartAsyncInvoke"),
    ("GET", r"/inference-profiles/(?P<inferenceProfileIdentifier>[^/]+)", "GetInferenceProfile"),
    (
        "GET",
        r"/provisioned-model-throughput/(?P<provisionedModelId>[^/]+)",
        "GetProvisionedModelThroughput",
    ),
    ("GET", r"/async-invoke/(?P<invocationArn>[^/]+)", "GetAsyncInvoke"),
    ("GET", r"/async-invoke", "ListAsyncInvokes"),
]
_COMPILED = [(method, re.compile(pattern), name) for method, pattern, name in _ROUTES]


def _route(method: str, raw_path: str) -> tuple[str | None, dict[str, str]]:
    """Route as AWS does: on the wire path, labels percent-decoded once."""
    from urllib.parse import unquote

    for m, pattern, name in _COMPILED:
        if m == method:
            match = pattern.fullmatch(raw_path)
            if match:
                return name, {k: unquote(v) for k, v in match.groupdict().items()}
    return None, {}


def _page(request: web.Request, member: str, items: list[dict]) -> web.Response:
    """AWS paging: maxResults per page, an opaque nextToken for the rest."""
    size = int(request.query.get("maxResults", "100"))
    start = int(request.query.get("nextToken", "0") or 0)
    page: dict[str, Any] = {member: items[start : start + size]}
    if start + size < len(items):
        page["nextToken"] = str(start + size)
    return json_response(page)


def json_response(data: dict, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data).encode(),
        headers={"Content-Type": "application/json", "x-amzn-RequestId": "fake-request-id"},
    )


def aws_error(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps({"message": message}).encode(),
        headers={
            "Content-Type": "application/json",
            "x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.bedrock/",
            "x-amzn-RequestId": "fake-error-id",
        },
    )


event_frame = simulator.event_frame
