"""bedrock-runtime through the proxy with real boto3 clients, checked at the fake upstream."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import urllib.error
import urllib.request

import pytest

from tests.conftest import MASTER_KEY, boto_client
from tests.fake_bedrock import UPSTREAM_ACCESS_KEY, UPSTREAM_SESSION_TOKEN

MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
PROFILE_ARN = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123"
MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]


def test_converse_reaches_upstream_resigned(proxy, fake):
    client = boto_client("bedrock-runtime", proxy)
    reply = client.converse(modelId=MODEL, messages=MESSAGES)
    assert reply["output"]["message"]["content"][0]["text"] == f"model={MODEL}"
    assert reply["usage"] == {"inputTokens": 11, "outputTokens": 7, "totalTokens": 18}
    seen = fake.requests[-1]
    assert seen.operation == "Converse"
    assert seen.raw_path == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    assert f"Credential={UPSTREAM_ACCESS_KEY}/" in seen.headers["Authorization"]
    assert seen.headers["X-Amz-Security-Token"] == UPSTREAM_SESSION_TOKEN
    # The client's own credentials and the key header never go upstream.
    assert "dummy-access-key" not in str(dict(seen.headers))
    assert "litellm_user_api_key" not in seen.headers
    assert json.loads(seen.body) == {"messages": MESSAGES}


@pytest.mark.parametrize("model", [PROFILE_ARN, "us.anthropic.claude-3-haiku-20240307-v1:0"])
def test_arn_and_profile_model_ids(proxy, fake, model):
    client = boto_client("bedrock-runtime", proxy)
    reply = client.converse(modelId=model, messages=MESSAGES)
    assert reply["output"]["message"]["content"][0]["text"] == f"model={model}"


def test_converse_stream_events_arrive_intact(proxy, fake):
    client = boto_client("bedrock-runtime", proxy)
    reply = client.converse_stream(modelId=PROFILE_ARN, messages=MESSAGES)
    events = list(reply["stream"])
    text = "".join(
        e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e
    )
    assert text == f"Hello from {PROFILE_ARN}"
    assert events[0] == {"messageStart": {"role": "assistant"}}
    assert events[-1]["metadata"]["usage"]["totalTokens"] == 21


def test_invoke_model_body_is_byte_identical(proxy, fake):
    client = boto_client("bedrock-runtime", proxy)
    # Odd spacing and key order: any re-serialisation would change the hash.
    body = b'{"prompt":  "Hi \\u00e9",   "max_tokens": 5, "a":1}'
    reply = client.invoke_model(
        modelId=PROFILE_ARN, body=body, contentType="application/json", accept="application/json"
    )
    payload = json.loads(reply["body"].read())
    assert payload["echo_sha256"] == hashlib.sha256(body).hexdigest()
    assert fake.requests[-1].body == body
    headers = reply["ResponseMetadata"]["HTTPHeaders"]
    assert headers["x-amzn-bedrock-input-token-count"] == "25"
    assert headers["x-amzn-requestid"] == "fake-invoke-request-id"


def test_compressed_request_body_is_forwarded_compressed(proxy, fake):
    """aiohttp's server inflates Content-Encoding bodies by default; the proxy must not."""
    body = gzip.compress(b'{"prompt": "squeezed"}', mtime=0)
    request = urllib.request.Request(
        f"{proxy.base}/model/{MODEL}/invoke",
        data=body,
        headers={
            "Authorization": f"Bearer {MASTER_KEY}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        },
    )
    with contextlib.suppress(urllib.error.HTTPError):  # the fake cannot parse gzip: 400
        urllib.request.urlopen(request, timeout=10).read()
    received = fake.requests[-1]
    assert received.body == body  # signed and sent as the client's bytes
    assert received.headers["Content-Encoding"] == "gzip"


def test_invoke_model_with_response_stream(proxy, fake):
    client = boto_client("bedrock-runtime", proxy)
    reply = client.invoke_model_with_response_stream(modelId=MODEL, body=b'{"prompt": "x"}')
    chunks = [json.loads(e["chunk"]["bytes"]) for e in reply["body"]]
    # Claude's own stream format, as Bedrock passes it through.
    assert [c["type"] for c in chunks if c["type"] != "content_block_delta"] == [
        "message_start",
        "content_block_start",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    texts = [c["delta"]["text"] for c in chunks if c["type"] == "content_block_delta"]
    assert texts == ["one ", "two ", "three"]
    assert chunks[-1]["amazon-bedrock-invocationMetrics"]["outputTokenCount"] == 3


def test_large_streamed_response_body(proxy, fake):
    client = boto_client("bedrock-runtime", proxy)
    reply = client.invoke_model(modelId="test.big", body=b"{}")
    data = reply["body"].read()
    assert data == bytes(range(256)) * (3 * 1024 * 1024 // 256)


def test_count_tokens_and_apply_guardrail(proxy, fake):
    client = boto_client("bedrock-runtime", proxy)
    counted = client.count_tokens(modelId=MODEL, input={"converse": {"messages": MESSAGES}})
    assert counted["inputTokens"] == 17
    applied = client.apply_guardrail(
        guardrailIdentifier="gr-123",
        guardrailVersion="DRAFT",
        source="INPUT",
        content=[{"text": {"text": "Hello world"}}],
    )
    assert applied["action"] == "NONE"
    assert fake.requests[-1].raw_path == "/guardrail/gr-123/version/DRAFT/apply"


def test_bedrock_request_headers_forwarded_and_signed(proxy, fake):
    client = boto_client("bedrock-runtime", proxy)
    client.invoke_model(
        modelId=MODEL,
        body=b"{}",
        trace="ENABLED",
        guardrailIdentifier="gr-1",
        guardrailVersion="1",
        performanceConfigLatency="optimized",
    )
    seen = fake.requests[-1].headers
    assert seen["X-Amzn-Bedrock-Trace"] == "ENABLED"
    assert seen["X-Amzn-Bedrock-GuardrailIdentifier"] == "gr-1"
    assert seen["X-Amzn-Bedrock-PerformanceConfig-Latency"] == "optimized"
    signed = seen["Authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    assert {"x-amzn-bedrock-trace", "host", "x-amz-date", "x-amz-security-token"} <= set(signed)
