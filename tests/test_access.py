"""Access that binds, tried as an attacker would: every resource-bearing member of every
operation, duplicate and unsigned headers, bodies only one parser accepts, S3
sub-resources, other keys' jobs, and anonymous junk that must leave nothing behind.

Each refusal is checked at both ends: the client gets the AWS-shaped error, and the fake
upstream's log shows that nothing forbidden reached it. Each field also has a positive
control (the same request with an allowed value reaches the fake), so a test that cannot
fail would be caught.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import stat
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, unquote

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.access import resources
from proxy.access.keys import OPERATION_GROUPS
from proxy.server.app import STORE
from proxy.wire.routing import AGENTCORE, SERVICE_NAMES, load_operations
from tests.conftest import MASTER_KEY, REGION, boto_client, client_config
from tests.helpers.admin import admin, new_key, sigv4_client

ACCOUNT = "123456789012"
ARN = f"arn:aws:bedrock:{REGION}:{ACCOUNT}"
AC = f"arn:aws:bedrock-agentcore:{REGION}:{ACCOUNT}"
RESTRICTIONS = {
    "agent_runtime_arns": [f"{AC}:runtime/agent_ok-0000000001"],
    "memory_ids": ["memory_ok-0000000001"],
    "code_interpreter_ids": ["ci_ok-0000000001"],
    "browser_ids": [f"{AC}:browser/browser_ok-0000000001"],
    "evaluator_ids": ["evaluator_ok-0000000001"],
    "gateway_ids": ["gateway_ok-0000000001"],
    "registry_ids": ["registry_ok-0000000001"],
    "models": ["anthropic.claude-3-haiku*"],
    "guardrail_ids": ["gr-ok"],
    "knowledge_base_ids": ["KBOK000001"],
    "agent_ids": ["AGENTOK001"],
    "flow_ids": ["FLOWOK0001"],
    "file_buckets": ["team-bucket"],
    "file_prefixes": ["team-a/"],
    "operation_groups": list(OPERATION_GROUPS),
}
GOOD: dict[str, Any] = {
    resources.MODEL: "anthropic.claude-3-haiku-20240307-v1:0",
    resources.GUARDRAIL: "gr-ok",
    resources.KNOWLEDGE_BASE: "KBOK000001",
    resources.AGENT: "AGENTOK001",
    resources.AGENT_ALIAS_ARN: f"{ARN}:agent-alias/AGENTOK001/ALIAS00001",
    resources.FLOW: "FLOWOK0001",
    resources.S3_URI: "s3://team-bucket/team-a/in.jsonl",
    resources.S3_OBJECT: {"s3BucketName": "team-bucket", "s3ObjectKey": "team-a/schema.json"},
    resources.ARN: f"{ARN}:knowledge-base/KBOK000001",
    # AgentCore: an id where the key lists an ARN and the other way round.
    resources.AGENT_RUNTIME: "agent_ok-0000000001",
    resources.MEMORY: "memory_ok-0000000001",
    resources.CODE_INTERPRETER: f"{AC}:code-interpreter/ci_ok-0000000001",
    resources.BROWSER: "browser_ok-0000000001",
    resources.EVALUATOR: f"{AC}:evaluator/evaluator_ok-0000000001",
    resources.GATEWAY: f"{AC}:gateway/gateway_ok-0000000001",
    resources.REGISTRY: "registry_ok-0000000001",
}


def _agentcore_bad(kind: str, evil: str) -> list[str]:
    """Another resource by id, by ARN, by another partition's ARN, by an ARN with more
    after it (a runtime's endpoint)."""
    return [
        evil,
        f"{AC}:{kind}/{evil}",
        f"arn:aws-us-gov:bedrock-agentcore:us-gov-west-1:{ACCOUNT}:{kind}/{evil}",
        f"{AC}:{kind}/{evil}/runtime-endpoint/DEFAULT",
    ]


BAD: dict[str, list[Any]] = {
    resources.MODEL: [
        "meta.llama3-70b-instruct-v1:0",
        "us.meta.llama3-70b-instruct-v1:0",
        f"arn:aws:bedrock:{REGION}::foundation-model/meta.llama3-70b-instruct-v1:0",
        f"{ARN}:inference-profile/global.meta.llama3-70b-instruct-v1:0",
        f"{ARN}:application-inference-profile/abc123",
    ],
    resources.GUARDRAIL: ["gr-evil", f"{ARN}:guardrail/gr-evil"],
    resources.KNOWLEDGE_BASE: ["KBEVIL0001", f"{ARN}:knowledge-base/KBEVIL0001"],
    resources.AGENT: ["AGENTEVIL1"],
    resources.AGENT_ALIAS_ARN: [f"{ARN}:agent-alias/AGENTEVIL1/ALIAS00001"],
    resources.FLOW: ["FLOWEVIL01", f"{ARN}:flow/FLOWEVIL01"],
    resources.S3_URI: [
        "s3://other-bucket/team-a/in.jsonl",
        "s3://team-bucket/team-b/in.jsonl",
        "s3://team-bucket/",
        "https://team-bucket.s3.amazonaws.com/team-a/in.jsonl",
    ],
    resources.S3_OBJECT: [
        {"s3BucketName": "other-bucket", "s3ObjectKey": "team-a/schema.json"},
        {"s3BucketName": "team-bucket", "s3ObjectKey": "team-b/schema.json"},
    ],
    resources.S3_BUCKET: ["other-bucket", "team-bucket"],
    resources.ARN: [
        f"{ARN}:knowledge-base/KBEVIL0001",
        f"{ARN}:agent/AGENTEVIL1",
        f"arn:aws:bedrock:{REGION}::foundation-model/meta.llama3-70b-instruct-v1:0",
    ],
    resources.AGENT_RUNTIME: _agentcore_bad("runtime", "agent_evil-0000000001"),
    resources.MEMORY: _agentcore_bad("memory", "memory_evil-0000000001"),
    resources.CODE_INTERPRETER: _agentcore_bad("code-interpreter", "ci_evil-0000000001"),
    resources.BROWSER: _agentcore_bad("browser", "browser_evil-0000000001"),
    resources.EVALUATOR: _agentcore_bad("evaluator", "evaluator_evil-0000000001"),
    resources.GATEWAY: _agentcore_bad("gateway", "gateway_evil-0000000001"),
    resources.REGISTRY: _agentcore_bad("registry", "registry_evil-0000000001"),
}
_OPERATIONS = {
    f"{op.service.name}:{op.name}": op for op in load_operations((*SERVICE_NAMES, AGENTCORE))
}
# AgentCore operations on a session the key must own (access.owned): past the policy, an
# allowed value is refused there, so their positive control is test_agentcore's.
_OWNED = {
    f"{AGENTCORE}:{name}"
    for name in (
        "InvokeCodeInterpreter",
        "GetCodeInterpreterSession",
        "StopCodeInterpreterSession",
        "InvokeBrowser",
        "GetBrowserSession",
        "StopBrowserSession",
        "UpdateBrowserStream",
        "SaveBrowserSessionProfile",
        "ListEvents",
        "GetEvent",
        "DeleteEvent",
    )
}
FIELDS = [
    (key, field) for key, fields in sorted(resources.load_table().items()) for field in fields
]


@pytest.fixture(scope="module")
def ac_proxy(start_proxy, tmp_path_factory, fake_server, fake_s3_server):
    # AgentCore to the same fake: it logs what reaches it (and refuses the scope).
    endpoints = {name: fake_server[1] for name in (*SERVICE_NAMES, AGENTCORE)}
    return start_proxy(
        key_cache_ttl=1.0,
        sqlite_path=str(tmp_path_factory.mktemp("access") / "keys.db"),
        endpoints={**endpoints, "s3": fake_s3_server[1]},
    )


@pytest.fixture(scope="module")
def restricted(ac_proxy) -> dict:
    return new_key(ac_proxy, **RESTRICTIONS)


# ---------------------------------------------------------------- the derived table


def test_table_is_what_the_installed_botocore_models_derive():
    """The committed table is regenerated from botocore; a difference means the models
    changed: run `python -m proxy.access.resources --write` and review the diff."""
    assert resources.derive() == {
        key: [[f.location, f.name, f.kind] for f in fields]
        for key, fields in resources.load_table().items()
    }


def test_a_new_resource_member_the_table_does_not_classify_fails_the_derivation():
    from botocore.loaders import create_loader

    real = create_loader()

    class Loader:
        def load_service_model(self, name: str, kind: str) -> Any:
            model = copy.deepcopy(real.load_service_model(name, kind))
            if name == "bedrock-runtime":
                shapes = model["shapes"]
                shapes["SidecarModelArn"] = {"type": "string"}
                shapes["ConverseRequest"]["members"]["sidecarModelArn"] = {
                    "shape": "SidecarModelArn"
                }
            return model

    with pytest.raises(resources.Unclassified, match="sidecarModelArn"):
        resources.derive(Loader())


def test_the_table_covers_what_the_issue_found_leaking():
    table = {
        key: {(f.location, f.name): f.kind for f in fields}
        for key, fields in resources.load_table().items()
    }
    retrieve = table["bedrock-agent-runtime:Retrieve"]
    assert (
        retrieve[
            (
                "body",
                "retrievalConfiguration.vectorSearchConfiguration."
                "rerankingConfiguration.bedrockRerankingConfiguration.modelConfiguration."
                "modelArn",
            )
        ]
        == resources.MODEL
    )
    inline = table["bedrock-agent-runtime:InvokeInlineAgent"]
    assert inline[("body", "collaboratorConfigurations.[].agentAliasArn")] == "agent alias arn"
    assert inline[("body", "knowledgeBases.[].knowledgeBaseId")] == resources.KNOWLEDGE_BASE
    assert "bedrock-agent-runtime:GenerateQuery" in table
    assert "bedrock-agent-runtime:AgenticRetrieveStream" in table
    assert table["bedrock-agent-runtime:OptimizePrompt"][("body", "targetModelId")] == "model"
    agent = table["bedrock-agent-runtime:InvokeAgent"]
    assert agent[("body", "sessionState.files.[].source.s3Location.uri")] == resources.S3_URI
    converse = table["bedrock-runtime:Converse"]
    assert converse[("body", "messages.[].content.[].document.source.s3Location.uri")] == "s3"
    assert (
        table["bedrock-runtime:StartAsyncInvoke"][
            ("body", "outputDataConfig.s3OutputDataConfig.s3Uri")
        ]
        == resources.S3_URI
    )


# ---------------------------------------------------------------- every field, refused


def _document(path: tuple[str, ...], leaf: Any, siblings: Any = None, spread: int = 1) -> Any:
    """A JSON value with ``leaf`` at ``path``; lists hold ``spread`` items, the leaf in the
    last one and ``siblings`` (an allowed value) in the others."""
    if not path:
        return leaf
    step, rest = path[0], path[1:]
    if step == "[]":
        items = [_document(rest, siblings, siblings, 1) for _ in range(spread - 1)]
        return [*items, _document(rest, leaf, siblings, spread)]
    if step == "{}":
        return {"k": _document(rest, leaf, siblings, spread)}
    return {step: _document(rest, leaf, siblings, spread)}


def _request(op_key: str, field: resources.Field, value: Any, spread: int = 1):
    """(method, path and query, headers, body) for ``op_key`` with ``field`` set to value."""
    op = _OPERATIONS[op_key]
    template, _, static_query = op.template.partition("?")
    path = template
    for label in op.labels:
        name = label.rstrip("+")
        if field.location == "uri" and field.name == name:
            filled = value
        else:
            filled = GOOD.get(_label_kind(op_key, name), "x0000000001")
        path = path.replace("{" + label + "}", quote(filled, safe=""))
    query = [static_query] if static_query else []
    headers = {"Content-Type": "application/json"}
    body: Any = {}
    if field.location == "querystring":
        query.append(f"{field.name}={quote(value, safe='')}")
    elif field.location == "header":
        headers[field.name] = value
    elif field.location == "body":
        body = _document(field.path, value, GOOD.get(field.kind), spread)
    target = path + ("?" + "&".join(query) if query else "")
    return op.method, target, headers, json.dumps(body).encode()


def _label_kind(op_key: str, label: str) -> str:
    for field in resources.load_table().get(op_key, ()):
        if field.location == "uri" and field.name == label:
            return field.kind
    return ""


def _send(
    server,
    key: dict,
    method: str,
    target: str,
    headers: dict,
    body: bytes,
    auth: str,
    service: str = "bedrock",
):
    url = server.base + target if service == "bedrock" else server.url + "/" + service + target
    headers = dict(headers)
    if auth == "sigv4":
        if target.endswith("/invoke-with-bidirectional-stream"):
            # Its body is a signed event stream, and its signature says so.
            headers["X-Amz-Content-SHA256"] = "STREAMING-AWS4-HMAC-SHA256-EVENTS"
        request = AWSRequest(method=method, url=url, data=body, headers=headers)
        credentials = Credentials(key["access_key_id"], key["secret_access_key"])
        SigV4Auth(credentials, service, REGION).add_auth(request)
        headers = dict(request.headers)
    else:
        headers["Authorization"] = f"Bearer {key['key']}"
    raw = urllib.request.Request(url, method=method, data=body or None, headers=headers)
    try:
        with urllib.request.urlopen(raw, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _service_of(op_key: str) -> str:
    """The base path (and signing name) of an operation's service at the proxy."""
    return AGENTCORE if op_key.startswith(AGENTCORE + ":") else "bedrock"


def _assert_refused(
    server, fake, key, method, target, headers, body, auth="sigv4", service="bedrock"
):
    before = len(fake.requests)
    status, got, payload = _send(server, key, method, target, headers, body, auth, service)
    assert (status, got.get("x-amzn-ErrorType")) == (403, "AccessDeniedException"), (
        target,
        body[:300],
        payload[:300],
    )
    # (The proxy's own lookups, such as resolving an application profile, may be there.)
    path = unquote(target.split("?", 1)[0])
    reached = [r for r in fake.requests[before:] if unquote(r.raw_path.split("?", 1)[0]) == path]
    assert not reached, f"{method} {target} reached the upstream"


@pytest.mark.parametrize(("op_key", "field"), FIELDS, ids=[f"{k}:{f.name}" for k, f in FIELDS])
def test_every_resource_field_is_checked(ac_proxy, fake, restricted, op_key, field):
    service = _service_of(op_key)
    for value in BAD[field.kind]:
        method, target, headers, body = _request(op_key, field, value)
        _assert_refused(ac_proxy, fake, restricted, method, target, headers, body, "sigv4", service)
    if field.kind == resources.S3_BUCKET or op_key in _OWNED:
        return  # a key confined to a prefix may name no bucket whole; sessions: see above
    # The positive control: the same request with an allowed value is forwarded.
    method, target, headers, body = _request(op_key, field, GOOD[field.kind])
    before = len(fake.requests)
    status, _got, payload = _send(
        ac_proxy, restricted, method, target, headers, body, "sigv4", service
    )
    if op_key.endswith(":InvokeModelWithBidirectionalStream"):
        # Past the policy, refused only for HTTP/1.1 (its HTTP/2 path: test_http2).
        assert (status, b"requires HTTP/2" in payload) == (400, True), payload
        return
    assert len(fake.requests) == before + 1, (status, payload[:300])


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_forbidden_values_anywhere_in_a_request_never_reach_the_upstream(
    ac_proxy, fake, restricted, data
):
    """Hypothesis picks a field, a forbidden value, how many list items surround it (the
    forbidden one last, after allowed ones) and how the client authenticates."""
    op_key, field = data.draw(st.sampled_from(FIELDS))
    value = data.draw(st.sampled_from(BAD[field.kind]))
    spread = data.draw(st.integers(1, 4)) if "[]" in field.path else 1
    service = _service_of(op_key)
    auth = data.draw(st.sampled_from(["sigv4", "bearer"]))
    method, target, headers, body = _request(op_key, field, value, spread)
    _assert_refused(ac_proxy, fake, restricted, method, target, headers, body, auth, service)


def test_the_named_leaks_through_boto3(ac_proxy, fake, restricted):
    """A few of the fields the issue found open, as boto3 users would send them."""
    agents = sigv4_client("bedrock-agent-runtime", ac_proxy, restricted)
    runtime = sigv4_client("bedrock-runtime", ac_proxy, restricted)
    before = len(fake.requests)
    rerank = {
        "type": "BEDROCK_RERANKING_MODEL",
        "bedrockRerankingConfiguration": {
            "modelConfiguration": {"modelArn": BAD[resources.MODEL][2]}
        },
    }
    with pytest.raises(agents.exceptions.AccessDeniedException):
        agents.retrieve(
            knowledgeBaseId="KBOK000001",
            retrievalQuery={"text": "q"},
            retrievalConfiguration={
                "vectorSearchConfiguration": {"rerankingConfiguration": rerank}
            },
        )
    with pytest.raises(agents.exceptions.AccessDeniedException):
        agents.invoke_inline_agent(
            sessionId="s-1",
            foundationModel=GOOD[resources.MODEL],
            instruction="x" * 40,
            knowledgeBases=[
                {"knowledgeBaseId": "KBOK000001", "description": "ok"},
                {"knowledgeBaseId": "KBEVIL0001", "description": "other team's"},
            ],
        )
    with pytest.raises(agents.exceptions.AccessDeniedException):
        agents.invoke_agent(
            agentId="AGENTOK001",
            agentAliasId="ALIAS00001",
            sessionId="s-1",
            inputText="x",
            sessionState={
                "knowledgeBaseConfigurations": [
                    {
                        "knowledgeBaseId": "KBEVIL0001",
                        "retrievalConfiguration": {
                            "vectorSearchConfiguration": {"numberOfResults": 1}
                        },
                    }
                ]
            },
        )
    with pytest.raises(agents.exceptions.AccessDeniedException):
        agents.optimize_prompt(
            input={"textPrompt": {"text": "x"}}, targetModelId=BAD[resources.MODEL][0]
        )
    document = {
        "document": {
            "format": "pdf",
            "name": "d",
            "source": {"s3Location": {"uri": "s3://other-bucket/team-a/secret.pdf"}},
        }
    }
    with pytest.raises(runtime.exceptions.AccessDeniedException):
        runtime.converse(
            modelId=GOOD[resources.MODEL],
            messages=[{"role": "user", "content": [{"text": "summarise"}, document]}],
        )
    with pytest.raises(runtime.exceptions.AccessDeniedException):
        runtime.start_async_invoke(
            modelId=GOOD[resources.MODEL],
            modelInput={},
            outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://other-bucket/out/"}},
        )
    assert len(fake.requests) == before


# ---------------------------------------------------------------- strict bodies


@pytest.mark.parametrize(
    "body",
    [
        b'{"modelId": "anthropic.claude-3-haiku-20240307-v1:0"} {"modelId": "meta.x"}',
        b'{"modelId": "anthropic.claude-3-haiku-20240307-v1:0"} trailing',
        b'{"modelId": "anthropic.claude-3-haiku-20240307-v1:0" /* c */, "x": 1}',
        b'{"modelId": "anthropic.claude-3-haiku-20240307-v1:0", "jobName": "a\x01b"}',
        b'{"modelId": "anthropic.claude-3-haiku-20240307-v1:0", "n": NaN}',
        b'{"modelId": "anthropic.claude-3-haiku-20240307-v1:0", "modelId": "meta.x"}',
        b'\xef\xbb\xbf{"modelId": "meta.llama3-70b-instruct-v1:0"}',
        b'{"modelId": "anthropic.claude-3-haiku-20240307-v1:0", "x": "\xff"}',
        b'{"modelId": "anthropic.claude-3-haiku-20240307-v1:0", "inputDataConfig": []}',
        b'{"modelId": ["meta.llama3-70b-instruct-v1:0"]}',
    ],
    ids=[
        "two-documents",
        "trailing-text",
        "comment",
        "control-character",
        "nan",
        "duplicate-name",
        "byte-order-mark",
        "not-utf8",
        "wrong-type-on-the-way",
        "wrong-type-at-the-leaf",
    ],
)
def test_a_body_that_must_be_checked_is_strict_json_or_refused(ac_proxy, fake, restricted, body):
    before = len(fake.requests)
    for auth in ("sigv4", "bearer"):
        status, headers, payload = _send(
            ac_proxy,
            restricted,
            "POST",
            "/model-invocation-job",
            {"Content-Type": "application/json"},
            body,
            auth,
        )
        assert (status, headers["x-amzn-ErrorType"]) == (400, "ValidationException"), payload
        assert set(json.loads(payload)) == {"message"}
    assert len(fake.requests) == before


# ---------------------------------------------------------------- headers


def _raw(server, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request over a raw socket: duplicate headers and raw bytes as sent."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head_text, _, rest = data.partition(b"\r\n\r\n")
        lines = head_text.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(lines[0].split()[1]), headers, rest


@pytest.mark.parametrize(
    "extra",
    [
        b"X-Amzn-Bedrock-GuardrailIdentifier: gr-ok\r\nX-Amzn-Bedrock-GuardrailIdentifier: gr-evil\r\n",
        b"Content-Encoding: identity\r\nContent-Encoding: gzip\r\n",
        b"Content-Type: application/json\r\n",
        b"X-Amzn-Bedrock-Trace: ENABLED\r\nx-amzn-bedrock-trace: DISABLED\r\n",
        b"X-Amz-Meta-A: \xff\xfe\r\n",
        b"X-Amzn-Bedrock-GuardrailIdentifier: gr-\xc3\xa9\r\n",
    ],
    ids=["guardrail", "content-encoding", "content-type", "case-variants", "non-utf8", "utf8"],
)
def test_one_ascii_value_per_header(ac_proxy, fake, restricted, extra):
    body = b'{"modelId": "x"}'
    head = (
        b"POST /bedrock/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke HTTP/1.1\r\n"
        b"Host: proxy\r\nConnection: close\r\n"
        b"Authorization: Bearer " + restricted["key"].encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        + extra
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n"
    )
    before = len(fake.requests)
    status, headers, payload = _raw(ac_proxy, head, body)
    assert (status, headers["x-amzn-errortype"]) == (400, "ValidationException"), payload
    assert set(json.loads(payload)) == {"message"}
    assert len(fake.requests) == before


def test_sigv4_clients_forward_only_headers_they_signed(ac_proxy, fake, restricted):
    runtime = sigv4_client("bedrock-runtime", ac_proxy, restricted)

    def add_unsigned(request, **_):
        request.headers["X-Amzn-Bedrock-GuardrailIdentifier"] = "gr-ok"

    runtime.meta.events.register("before-send.bedrock-runtime.InvokeModel", add_unsigned)
    before = len(fake.requests)
    with pytest.raises(ClientError) as info:
        runtime.invoke_model(modelId=GOOD[resources.MODEL], body=b"{}")
    assert info.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert "x-amzn-bedrock-guardrailidentifier" in info.value.response["Error"]["Message"]
    assert len(fake.requests) == before
    # Signed, the same header is forwarded.
    signed = sigv4_client("bedrock-runtime", ac_proxy, restricted)
    signed.invoke_model(
        modelId=GOOD[resources.MODEL], body=b"{}", guardrailIdentifier="gr-ok", guardrailVersion="1"
    )
    assert fake.requests[-1].headers["X-Amzn-Bedrock-GuardrailIdentifier"] == "gr-ok"


# ---------------------------------------------------------------- files: S3 operations


@pytest.fixture
def team_s3(ac_proxy, fake_s3_server, restricted):
    fake_s3, _ = fake_s3_server
    fake_s3.buckets.setdefault("team-bucket", {})
    client = boto3.client(
        "s3",
        endpoint_url=ac_proxy.url + "/bedrock/files",
        region_name=REGION,
        aws_access_key_id=restricted["access_key_id"],
        aws_secret_access_key=restricted["secret_access_key"],
        config=client_config(s3={"addressing_style": "path"}),
    )
    client.put_object(Bucket="team-bucket", Key="team-a/x.jsonl", Body=b"{}\n")
    return client, fake_s3


@pytest.mark.parametrize(
    "call",
    [
        lambda s3: s3.put_object_acl(Bucket="team-bucket", Key="team-a/x.jsonl", ACL="public-read"),
        lambda s3: s3.put_object(
            Bucket="team-bucket", Key="team-a/y.jsonl", Body=b"x", ACL="public-read"
        ),
        lambda s3: s3.put_object(
            Bucket="team-bucket", Key="team-a/y.jsonl", Body=b"x", GrantRead="id=someone"
        ),
        lambda s3: s3.put_object_retention(
            Bucket="team-bucket",
            Key="team-a/x.jsonl",
            Retention={"Mode": "GOVERNANCE", "RetainUntilDate": "2030-01-01T00:00:00Z"},
        ),
        lambda s3: s3.put_object_legal_hold(
            Bucket="team-bucket", Key="team-a/x.jsonl", LegalHold={"Status": "ON"}
        ),
        lambda s3: s3.restore_object(
            Bucket="team-bucket", Key="team-a/x.jsonl", RestoreRequest={"Days": 1}
        ),
        lambda s3: s3.put_object_tagging(
            Bucket="team-bucket", Key="team-a/x.jsonl", Tagging={"TagSet": []}
        ),
        lambda s3: s3.get_object_acl(Bucket="team-bucket", Key="team-a/x.jsonl"),
        lambda s3: s3.get_bucket_policy(Bucket="team-bucket"),
        lambda s3: s3.put_bucket_website(
            Bucket="team-bucket", WebsiteConfiguration={"IndexDocument": {"Suffix": "i.html"}}
        ),
    ],
    ids=[
        "object-acl",
        "canned-acl-header",
        "grant-header",
        "retention",
        "legal-hold",
        "restore",
        "tagging",
        "read-acl",
        "bucket-policy",
        "website",
    ],
)
def test_files_endpoint_refuses_s3_sub_resources_that_change_access(team_s3, call):
    s3, fake_s3 = team_s3
    before = len(fake_s3.requests)
    with pytest.raises(ClientError) as info:
        call(s3)
    assert info.value.response["Error"]["Code"] == "AccessDenied"
    assert len(fake_s3.requests) == before


def test_files_endpoint_keeps_the_batch_workflow(team_s3):
    s3, _ = team_s3
    listing = s3.list_objects_v2(Bucket="team-bucket", Prefix="team-a/")
    assert [o["Key"] for o in listing["Contents"]] == ["team-a/x.jsonl"]
    assert s3.get_object(Bucket="team-bucket", Key="team-a/x.jsonl")["Body"].read() == b"{}\n"
    s3.copy_object(
        Bucket="team-bucket",
        Key="team-a/copy.jsonl",
        CopySource={"Bucket": "team-bucket", "Key": "team-a/x.jsonl"},
    )
    s3.head_object(Bucket="team-bucket", Key="team-a/copy.jsonl")
    s3.delete_object(Bucket="team-bucket", Key="team-a/copy.jsonl")


# ---------------------------------------------------------------- listings


@pytest.fixture(scope="module")
def jobs_proxy(start_proxy, store_settings):
    return start_proxy(key_cache_ttl=1.0, **store_settings)


def _job(control, name: str) -> str:
    return control.create_model_invocation_job(
        jobName=name,
        roleArn=f"arn:aws:iam::{ACCOUNT}:role/batch",
        modelId=GOOD[resources.MODEL],
        inputDataConfig={"s3InputDataConfig": {"s3Uri": "s3://team-bucket/team-a/in.jsonl"}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://team-bucket/team-a/out/"}},
    )["jobArn"]


def test_listings_show_a_key_only_its_own_jobs(jobs_proxy, fake):
    fake.jobs.clear()
    fake.async_invokes.clear()
    alice, bob = new_key(jobs_proxy), new_key(jobs_proxy)
    alice_control = sigv4_client("bedrock", jobs_proxy, alice)
    bob_control = sigv4_client("bedrock", jobs_proxy, bob)
    mine = {_job(alice_control, f"alice-{i}") for i in range(3)}
    theirs = {_job(bob_control, "bob-0")}

    def all_pages(client, **kwargs) -> list[dict]:
        seen, token = [], None
        for _ in range(20):
            page = client.list_model_invocation_jobs(
                maxResults=2, **({"nextToken": token} if token else {}), **kwargs
            )
            seen += page["invocationJobSummaries"]
            token = page.get("nextToken")
            if not token:
                return seen
        raise AssertionError("paging did not end")

    assert {j["jobArn"] for j in all_pages(alice_control)} == mine
    assert {j["jobArn"] for j in all_pages(bob_control)} == theirs
    master = boto_client("bedrock", jobs_proxy)  # signed with dummies, the master key in a header
    assert {j["jobArn"] for j in all_pages(master)} == mine | theirs

    alice_runtime = sigv4_client("bedrock-runtime", jobs_proxy, alice)
    bob_runtime = sigv4_client("bedrock-runtime", jobs_proxy, bob)
    output = {"s3OutputDataConfig": {"s3Uri": "s3://team-bucket/team-a/async/"}}
    started = alice_runtime.start_async_invoke(
        modelId=GOOD[resources.MODEL], modelInput={}, outputDataConfig=output
    )["invocationArn"]
    bob_runtime.start_async_invoke(
        modelId=GOOD[resources.MODEL], modelInput={}, outputDataConfig=output
    )
    listed = alice_runtime.list_async_invokes()["asyncInvokeSummaries"]
    assert [i["invocationArn"] for i in listed] == [started]
    assert alice_runtime.get_async_invoke(invocationArn=started)["status"] == "InProgress"
    with pytest.raises(bob_runtime.exceptions.AccessDeniedException):
        bob_runtime.get_async_invoke(invocationArn=started)


# ---------------------------------------------------------------- admin input


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/key/list?page=99999999999999999999", None),
        ("GET", "/key/list?page=-1", None),
        ("GET", "/spend/logs?page=1e9", None),
        ("GET", "/spend/logs?start=1e400", None),
        ("GET", "/spend/logs?start=nan", None),
        ("POST", "/key/generate", {"duration": "99999999999999d"}),
        ("POST", "/key/generate", {"expires": 1e300}),
        ("POST", "/key/generate", {"expires": "99999-01-01"}),
        ("POST", "/key/generate", {"rpm_limit": 1e300}),
        ("POST", "/key/generate", {"max_budget": 1e300}),
        ("POST", "/key/generate", {"tpm_limit": 10**30}),
        ("POST", "/key/delete", {"keys": "abc"}),
        ("POST", "/key/delete", {"key_aliases": [1]}),
        ("POST", "/limit/new", {"limit_id": "x", "rpm_limit": 1e300}),
    ],
)
def test_bad_admin_input_is_an_aws_shaped_400(ac_proxy, method, path, body):
    status, answer = admin(ac_proxy, method, path, body)
    assert status == 400, answer
    assert answer["code"] == "ValidationException"


def test_oversize_admin_body_and_connect_are_aws_shaped(ac_proxy):
    big = json.dumps({"metadata": {"x": "y" * (2 * 1024 * 1024)}}).encode()
    request = urllib.request.Request(
        ac_proxy.url + "/key/generate",
        data=big,
        headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert (info.value.code, info.value.headers["x-amzn-ErrorType"]) == (
        413,
        "ValidationException",
    )
    assert info.value.headers["Content-Type"] == "application/json"
    status, headers, body = _raw(
        ac_proxy, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
    )
    assert status in (400, 404, 405)
    assert headers["content-type"] == "application/json"
    assert headers["x-amzn-errortype"]
    assert set(json.loads(body)) == {"message"}


def test_key_info_gives_one_refusal_whether_or_not_another_key_exists(ac_proxy, restricted):
    other = new_key(ac_proxy)
    exists = admin(ac_proxy, "GET", f"/key/info?key={other['key_id']}", key=restricted["key"])
    missing = admin(ac_proxy, "GET", "/key/info?key=vk_0000000000000000", key=restricted["key"])
    assert exists == missing
    assert exists[0] == 403
    own = admin(ac_proxy, "GET", "/key/info", key=restricted["key"])
    assert own[0] == 200 and own[1]["key"] == restricted["key_id"]


# ---------------------------------------------------------------- at rest


def test_sqlite_store_is_owner_only_and_keeps_no_fingerprint(ac_proxy, restricted, tmp_path):
    path = ac_proxy.app[STORE].db.inner.path
    for name in (path, path + "-wal", path + "-shm"):
        if os.path.exists(name):
            assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name
    import sqlite3

    with sqlite3.connect(path) as conn:
        sealed = conn.execute("SELECT secret_enc FROM bp_keys LIMIT 1").fetchone()[0]
    version, salt, _data = sealed.split(":")
    assert version == "v2" and len(salt) == 24  # a random salt, not a key fingerprint


def test_v1_ciphertexts_are_resealed_under_scrypt(tmp_path):
    import base64

    from proxy.access.secretbox import SecretBox, _hkdf_v1

    secret = "a-weak-but-long-enough-master"
    nonce = b"\0" * 12
    key_id = "abcdef012345"
    v1 = "v1:{}:{}".format(
        key_id,
        base64.b64encode(
            nonce + _hkdf_v1(secret).encrypt(nonce, b"plain", key_id.encode())
        ).decode(),
    )
    box = SecretBox(secret)
    assert box.open(v1) == "plain" and box.needs_reseal(v1)
    v2 = box.seal("plain")
    assert not box.needs_reseal(v2)
    assert SecretBox("another-secret-entirely", [secret]).needs_reseal(v2)
    assert SecretBox("another-secret-entirely", [secret]).open(v2) == "plain"


# ---------------------------------------------------------------- junk leaves nothing


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_anonymous_junk_grows_neither_memory_nor_metrics(fake_server, tmp_path):
    """Thousands of refused requests, each naming something new, against a real server
    process: its RSS and its /metrics stay where they were."""
    import asyncio
    import secrets
    import time

    import aiohttp

    from tests.helpers.processes import BIN, free_port, running, server_env

    port = free_port()
    env = server_env(
        fake_server[1],
        BEDROCK_PROXY_HOST="127.0.0.1",
        BEDROCK_PROXY_PORT=str(port),
        BEDROCK_PROXY_ACCESS_LOG="false",
        BEDROCK_PROXY_SQLITE_PATH=str(tmp_path / "keys.db"),
    )
    base = f"http://127.0.0.1:{port}/bedrock"
    date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())

    def sigv4(akid: str, region: str) -> str:
        return (
            f"AWS4-HMAC-SHA256 Credential={akid}/{date[:8]}/{region}/bedrock/aws4_request, "
            f"SignedHeaders=host;x-amz-date, Signature={'0' * 64}"
        )

    def junk(i: int) -> tuple[str, dict[str, str]]:
        unique = secrets.token_hex(6)
        kind = i % 4
        if kind == 0:  # a 60 KB access key id
            akid = ("A" * 60_000) + unique.upper()
            return f"{base}/model/m/converse", {"Authorization": sigv4(akid, "us-east-1")}
        if kind == 1:  # a well-formed unknown key id in a region nobody has heard of
            akid = "AKIA" + unique.upper().ljust(16, "Q")
            region = "us-" + "".join(chr(97 + int(c, 16) % 26) for c in unique[:10]) + "-1"
            return f"{base}/model/m/converse", {
                "Authorization": sigv4(akid, region),
                "X-Amz-Date": date,
            }
        if kind == 2:  # a bad bearer token naming a model nobody has heard of
            return f"{base}/model/model-{unique}/converse", {"Authorization": "Bearer sk-" + unique}
        return f"{base}/model/model-{unique}/invoke", {"x-api-key": "sk-bp-" + unique * 20}

    async def flood(count: int) -> None:
        async with aiohttp.ClientSession() as session:
            semaphore = asyncio.Semaphore(8)

            async def one(i: int) -> None:
                url, headers = junk(i)
                async with semaphore, session.post(url, headers=headers, data=b"{}") as r:
                    await r.read()
                    assert r.status == 403, (r.status, await r.text())
                    assert r.headers["x-amzn-ErrorType"]

            await asyncio.gather(*(one(i) for i in range(count)))

    def metrics_size() -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {MASTER_KEY}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return len(response.read())

    async def big_bodies_not_read() -> None:
        """Eight 32 MiB bodies under a fake bearer token: refused on their headers alone."""
        for _ in range(8):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /bedrock/model/m/invoke HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer sk-fake\r\nContent-Length: 33554432\r\n\r\n"
            )
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 5)
            assert status.startswith(b"HTTP/1.1 403"), status
            writer.close()

    with running([BIN, "serve"], env, port) as proc:
        asyncio.run(flood(400))  # warm up every path
        rss, size = _rss_kib(proc.pid), metrics_size()
        asyncio.run(flood(4000))
        asyncio.run(big_bodies_not_read())
        grown_kib = _rss_kib(proc.pid) - rss
        assert grown_kib < 8 * 1024, f"RSS grew by {grown_kib} KiB"
        assert metrics_size() - size < 512, "refused requests added metric series"


def test_the_aws_cli_is_refused_what_the_key_may_not_name(ac_proxy, fake, restricted):
    """The AWS CLI, signing with the key pair: a guardrail in the Converse body and a
    reranking model deep in a Retrieve body, each refused before the upstream."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_BEARER")}
    env.update(
        AWS_ACCESS_KEY_ID=restricted["access_key_id"],
        AWS_SECRET_ACCESS_KEY=restricted["secret_access_key"],
    )
    aws = os.path.join(os.path.dirname(sys.executable), "aws")
    common = ["--endpoint-url", ac_proxy.base, "--region", REGION]
    rerank = {
        "vectorSearchConfiguration": {
            "rerankingConfiguration": {
                "type": "BEDROCK_RERANKING_MODEL",
                "bedrockRerankingConfiguration": {
                    "modelConfiguration": {"modelArn": BAD[resources.MODEL][2]}
                },
            }
        }
    }
    calls = [
        [
            "bedrock-runtime",
            "converse",
            "--model-id",
            GOOD[resources.MODEL],
            "--messages",
            json.dumps([{"role": "user", "content": [{"text": "hi"}]}]),
            "--guardrail-config",
            json.dumps({"guardrailIdentifier": "gr-evil", "guardrailVersion": "1"}),
        ],
        [
            "bedrock-agent-runtime",
            "retrieve",
            "--knowledge-base-id",
            "KBOK000001",
            "--retrieval-query",
            json.dumps({"text": "q"}),
            "--retrieval-configuration",
            json.dumps(rerank),
        ],
    ]
    before = len(fake.requests)
    for call in calls:
        out = subprocess.run([aws, *call, *common], env=env, capture_output=True, timeout=60)
        assert out.returncode != 0
        assert b"AccessDeniedException" in out.stderr, out.stderr.decode()
    assert len(fake.requests) == before


def test_request_headers_are_sorted_by_what_goes_upstream() -> None:
    """What is signed, what is sent unsigned, what is the proxy's own, and what never goes
    (credentials, hop-by-hop headers, those the Connection header names)."""
    from multidict import CIMultiDict, CIMultiDictProxy

    from proxy.wire import errors
    from proxy.wire.headers import sort_request_headers

    def sort(pairs: list[tuple[str, str]], **prefixes: tuple[str, ...]):
        return sort_request_headers(CIMultiDictProxy(CIMultiDict(pairs)), **prefixes)

    sent = sort(
        [
            ("Host", "proxy"),
            ("Authorization", "Bearer sk-secret"),
            ("X-Api-Key", "sk-secret"),
            ("Content-Length", "2"),
            ("Content-Type", "application/json"),
            ("User-Agent", "ua"),
            ("X-Amz-Date", "20260101T000000Z"),
            ("X-Amzn-Bedrock-Trace", "ENABLED"),
            ("Connection", "keep-alive, x-custom, cache-control, xproxy-tags"),
            ("X-Custom", "hop"),
            ("Cache-Control", "no-cache"),
            ("xproxy-tags", "a,b"),
            ("x-bedrock-proxy-end-user-id", "u1"),
            ("anthropic-beta", "b1"),
            ("x-stainless-lang", "python"),
        ],
        signed_prefixes=("anthropic-",),
        unsigned_prefixes=("x-stainless-",),
    )
    assert sent.signed == {
        "content-type": "application/json",
        "x-amzn-bedrock-trace": "ENABLED",
        "anthropic-beta": "b1",
    }
    assert sent.unsigned == {"user-agent": "ua", "x-stainless-lang": "python"}
    # An annotation the Connection header names is addressed to this hop: the proxy's.
    assert sent.annotations == [("xproxy-tags", "a,b"), ("x-bedrock-proxy-end-user-id", "u1")]
    # Without a front's prefixes, its headers go nowhere.
    assert sort([("anthropic-beta", "b1"), ("x-stainless-lang", "py")]).signed == {}
    with pytest.raises(errors.AwsError):
        sort([("Content-Type", "a"), ("content-type", "b")])
    with pytest.raises(errors.AwsError):
        sort([("User-Agent", "caf\u00e9")])
