"""Client authentication and every refusal the proxy makes: AWS-shaped, nothing leaked."""

from __future__ import annotations

import json
import time

import pytest
from botocore.exceptions import ClientError

from tests.conftest import MASTER_KEY, boto_client, unanswered_port
from tests.helpers.http import curl

MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]
CONVERSE = "/model/cohere.command-r-v1:0/converse"


def assert_aws_error(status, headers, body, expected_status, code):
    assert status == expected_status
    assert headers["x-amzn-errortype"] == code
    assert headers["content-type"] == "application/json"
    assert set(json.loads(body)) == {"message"}


@pytest.mark.parametrize(
    "header",
    [
        f"Authorization: Bearer {MASTER_KEY}",
        f"x-api-key: {MASTER_KEY}",
        f"litellm_user_api_key: Bearer {MASTER_KEY}",
    ],
)
def test_curl_with_each_key_header(proxy, fake, header):
    status, _, body = curl(
        proxy.base + CONVERSE, "-H", header, data=json.dumps({"messages": MESSAGES})
    )
    assert status == 200, body
    assert (
        json.loads(body)["output"]["message"]["content"][0]["text"] == "model=cohere.command-r-v1:0"
    )
    # curl sends the ':' literally; the upstream gets the canonical encoding.
    assert fake.requests[-1].raw_path == "/model/cohere.command-r-v1%3A0/converse"


def test_decoded_arn_with_slashes_from_curl(proxy, fake):
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-haiku-20240307-v1:0"
    status, _, body = curl(
        proxy.base + f"/model/{arn}/converse",
        "-H",
        f"Authorization: Bearer {MASTER_KEY}",
        data=json.dumps({"messages": MESSAGES}),
    )
    assert status == 200, body
    assert json.loads(body)["output"]["message"]["content"][0]["text"] == f"model={arn}"


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ((), "AccessDeniedException"),
        (("-H", "Authorization: Bearer sk-wrong-key-000000"), "AccessDeniedException"),
        (("-H", "x-api-key: nope"), "AccessDeniedException"),
    ],
)
def test_missing_or_wrong_key_is_refused(proxy, fake, args, code):
    before = len(fake.requests)
    status, headers, body = curl(proxy.base + CONVERSE, *args, data="{}")
    assert_aws_error(status, headers, body, 403, code)
    assert len(fake.requests) == before  # nothing reached AWS


def test_boto3_with_wrong_key_raises_modelled_exception(proxy, fake):
    client = boto_client("bedrock-runtime", proxy, key="sk-not-the-key")
    with pytest.raises(client.exceptions.AccessDeniedException):
        client.converse(modelId="m", messages=MESSAGES)


def test_sigv4_without_key_header_is_unrecognized(proxy, fake):
    client = boto_client("bedrock-runtime", proxy, key=None)
    with pytest.raises(ClientError) as info:
        client.converse(modelId="m", messages=MESSAGES)
    assert info.value.response["Error"]["Code"] == "UnrecognizedClientException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_unknown_routes_are_aws_shaped_404(proxy):
    auth = ("-H", f"Authorization: Bearer {MASTER_KEY}")
    for path in ("/bedrock/model/x/not-an-operation", "/bedrock/nope", "/bedrock", "/elsewhere"):
        status, headers, body = curl(proxy.url + path, *auth, "-X", "POST")
        assert_aws_error(status, headers, body, 404, "UnknownOperationException")


def test_files_paths_and_bedrock_paths_reach_their_own_handlers(proxy, fake):
    """/bedrock/* skips aiohttp's resolver; the files endpoint and dot segments must not."""
    auth = ("-H", "Authorization: Bearer not-a-key")
    for path in ("/bedrock/files", "/bedrock/files/bucket/key", "/bedrock/files?list-type=2"):
        status, headers, body = curl(proxy.url + path, *auth)
        assert status == 403 and body.startswith(b"<?xml"), (path, body)  # S3's error shape
    for path in ("/bedrock/filesystem/x", "/bedrock/../key/list", "/bedrock/model/m/converse"):
        status, headers, body = curl(proxy.url + path, *auth, "--path-as-is", "-X", "POST")
        assert headers["content-type"] == "application/json", path
        assert json.loads(body)["message"] and status in (403, 404), (path, status)


def test_dot_segment_labels_are_rejected(proxy, fake):
    status, headers, body = curl(
        proxy.base + "/model/%2E%2E/converse",
        "-H",
        f"Authorization: Bearer {MASTER_KEY}",
        data="{}",
    )
    assert_aws_error(status, headers, body, 400, "ValidationException")


def test_malformed_json_is_forwarded_and_aws_error_returned(proxy, fake):
    status, headers, body = curl(
        proxy.base + CONVERSE, "-H", f"Authorization: Bearer {MASTER_KEY}", data="{not json"
    )
    assert status == 400
    assert headers["x-amzn-errortype"].startswith("ValidationException")
    assert fake.requests[-1].body == b"{not json"
    assert "Malformed input request" in json.loads(body)["message"]


def test_oversize_body_gets_413(start_proxy, fake):
    small = start_proxy(max_body_bytes=1024)
    before = len(fake.requests)
    status, headers, body = curl(
        small.base + CONVERSE, "-H", f"Authorization: Bearer {MASTER_KEY}", data="x" * 5000
    )
    assert_aws_error(status, headers, body, 413, "ValidationException")
    # Without Content-Length (chunked upload) the limit holds as well.
    status, headers, body = curl(
        small.base + CONVERSE,
        "-H",
        f"Authorization: Bearer {MASTER_KEY}",
        "-H",
        "Transfer-Encoding: chunked",
        data="y" * 5000,
    )
    assert_aws_error(status, headers, body, 413, "ValidationException")
    assert len(fake.requests) == before


def test_upstream_errors_pass_through_unchanged(proxy, fake):
    client = boto_client("bedrock-runtime", proxy)
    with pytest.raises(client.exceptions.ThrottlingException) as info:
        client.converse(modelId="test.throttle", messages=MESSAGES)
    assert (
        info.value.response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
        == "fake-error-id"
    )
    with pytest.raises(client.exceptions.InternalServerException):
        client.converse(modelId="test.error500", messages=MESSAGES)


def test_upstream_down_is_service_unavailable(start_proxy):
    down = start_proxy(endpoints={"bedrock-runtime": "http://127.0.0.1:9"})
    client = boto_client("bedrock-runtime", down)
    with pytest.raises(client.exceptions.ServiceUnavailableException):
        client.converse(modelId="m", messages=MESSAGES)


def test_upstream_connect_timeout_is_service_unavailable_in_time(start_proxy):
    with unanswered_port() as port:
        stuck = start_proxy(
            endpoints={"bedrock-runtime": f"http://127.0.0.1:{port}"}, connect_timeout=0.5
        )
        client = boto_client("bedrock-runtime", stuck)
        started = time.monotonic()
        with pytest.raises(client.exceptions.ServiceUnavailableException) as info:
            client.converse(modelId="m", messages=MESSAGES)
        assert 0.4 < time.monotonic() - started < 5
        assert "Timed out connecting" in info.value.response["Error"]["Message"]


def test_upstream_reset_before_headers(proxy, fake):
    client = boto_client("bedrock-runtime", proxy)
    with pytest.raises(client.exceptions.ServiceUnavailableException):
        client.converse(modelId="test.reset", messages=MESSAGES)


def test_upstream_slow_first_byte_times_out(start_proxy, fake):
    impatient = start_proxy(first_byte_timeout=0.5)
    client = boto_client("bedrock-runtime", impatient)
    with pytest.raises(client.exceptions.ModelTimeoutException):
        client.converse(modelId="test.stall", messages=MESSAGES)


def test_no_secrets_in_access_log(proxy, fake):
    client = boto_client("bedrock-runtime", proxy)
    client.converse(modelId="anthropic.claude-v2", messages=MESSAGES)
    curl(proxy.base + CONVERSE, "-H", "Authorization: Bearer sk-wrong-key-000000", data="{}")
    text = proxy.log.getvalue().decode()
    for secret in (MASTER_KEY, "sk-wrong-key", "upstream/secret", "dummy-secret-key", "Hello"):
        assert secret not in text
    record = proxy.wait_log_line(lambda r: r.get("model") == "anthropic.claude-v2")
    assert record["operation"] == "Converse" and record["status"] == 200
    assert record["bytes_in"] > 0 and record["bytes_out"] > 0 and record["latency_ms"] > 0


def test_unauthenticated_mode_accepts_anyone(start_proxy, fake):
    open_proxy = start_proxy(master_key=None, allow_unauthenticated=True)
    status, _, body = curl(open_proxy.base + CONVERSE, data=json.dumps({"messages": MESSAGES}))
    assert status == 200, body


def test_an_upstream_access_denied_does_not_name_the_servers_principal(proxy, fake):
    from tests.fake_bedrock import DENIED_PRINCIPAL

    client = boto_client("bedrock-runtime", proxy)
    for call in (client.converse, client.converse_stream):
        with pytest.raises(client.exceptions.AccessDeniedException) as caught:
            call(modelId="test.denied", messages=[{"role": "user", "content": [{"text": "x"}]}])
        message = caught.value.response["Error"]["Message"]
        assert DENIED_PRINCIPAL not in message and "123456789012" not in message
        assert "BedrockProxyRole" not in message
        assert message.startswith("User: (the proxy's AWS principal) is not authorized")
        assert (
            "bedrock:InvokeModel on resource: arn:aws:bedrock:us-east-1::foundation-model/"
            in message
        )


def test_principals_are_redacted_in_every_partition_and_shape():
    from proxy.wire.redact import PLACEHOLDER, redact_principals

    s3 = (
        b"<Error><Code>AccessDenied</Code><Message>User: arn:aws-us-gov:iam::111122223333:"
        b"user/ops is not authorized to perform: s3:GetObject on resource: "
        b'"arn:aws:s3:::bucket/k"</Message></Error>'
    )
    out = redact_principals(s3)
    assert b"111122223333" not in out and b"user/ops" not in out
    assert PLACEHOLDER in out and b"arn:aws:s3:::bucket/k" in out
    body = b'{"message":"User: arn:aws:sts::123456789012:assumed-role/R/s is not authorized"}'
    assert redact_principals(body) == (
        b'{"message":"User: (the proxy\'s AWS principal) is not authorized"}'
    )
    assert redact_principals(b'{"message":"plain"}') == b'{"message":"plain"}'
