"""Virtual keys end to end, on SQLite and on PostgreSQL: the admin API, every way a client
authenticates with real clients, and every refusal with the exact code boto3 parses."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import botocore.auth
import pytest
from botocore.exceptions import ClientError

from tests.conftest import MASTER_KEY, REGION
from tests.helpers.admin import admin, bearer_client, new_key, sigv4_client
from tests.helpers.http import curl

MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


@pytest.fixture(scope="module")
def vk_proxy(start_proxy, store_settings):
    return start_proxy(key_cache_ttl=1.0, **store_settings)


# ---------------------------------------------------------------- admin API


def test_admin_lifecycle(vk_proxy):
    key = new_key(
        vk_proxy,
        user_id="alice",
        team_id="red",
        models=["anthropic.*"],
        rpm_limit=10,
        metadata={"project": "x"},
        duration="30d",
    )
    assert key["key"].startswith("sk-bp-") and key["access_key_id"].startswith("BPK")
    assert key["expires"] is not None and key["rpm_limit"] == 10
    status, info = admin(vk_proxy, "GET", f"/key/info?key={key['key']}")
    assert status == 200 and info["info"]["user_id"] == "alice"
    assert "secret_access_key" not in info["info"] and key["key"] not in json.dumps(info)
    status, updated = admin(
        vk_proxy, "POST", "/key/update", {"key": key["key_id"], "tpm_limit": 500}
    )
    assert status == 200 and updated["tpm_limit"] == 500 and updated["rpm_limit"] == 10
    status, listed = admin(vk_proxy, "GET", "/key/list?team_id=red")
    assert key["key_id"] in listed["keys"]
    status, bad = admin(vk_proxy, "POST", "/key/generate", {"models": "not-a-list"})
    assert status == 400 and bad["code"] == "ValidationException"
    status, dup = admin(vk_proxy, "POST", "/key/generate", {"key_alias": key["key_alias"]})
    assert status == 400 and "already in use" in dup["message"]
    status, deleted = admin(vk_proxy, "POST", "/key/delete", {"keys": [key["key"]]})
    assert deleted == {"deleted_keys": [key["key_id"]]}
    status, _gone = admin(vk_proxy, "GET", f"/key/info?key={key['key_id']}")
    assert status == 404


def test_virtual_key_cannot_use_admin_routes(vk_proxy):
    key = new_key(vk_proxy)
    other = new_key(vk_proxy)
    for method, path, body in (
        ("POST", "/key/generate", {}),
        ("GET", "/key/list", None),
        ("POST", "/key/delete", {"keys": [other["key_id"]]}),
        ("POST", "/key/update", {"key": key["key_id"], "models": []}),
    ):
        status, error = admin(vk_proxy, method, path, body, key=key["key"])
        assert (status, error["code"]) == (403, "AccessDeniedException"), path
    status, own = admin(vk_proxy, "GET", "/key/info", key=key["key"])
    assert status == 200 and own["key"] == key["key_id"]
    status, error = admin(vk_proxy, "GET", f"/key/info?key={other['key_id']}", key=key["key"])
    assert status == 403


# ---------------------------------------------------------------- every auth method


def test_curl_bearer_and_custom_headers(vk_proxy, fake):
    key = new_key(vk_proxy)
    for header in (
        f"Authorization: Bearer {key['key']}",
        f"x-bf-vk: {key['key']}",
        f"x-litellm-api-key: {key['key']}",
    ):
        status, _, body = curl(
            vk_proxy.base + "/model/m/converse",
            "-H",
            header,
            data=json.dumps({"messages": MESSAGES}),
        )
        assert status == 200, body


def test_boto3_bearer_token_env(vk_proxy, fake, monkeypatch):
    key = new_key(vk_proxy)
    client = bearer_client(vk_proxy, key["key"], monkeypatch)
    assert client.converse(modelId=HAIKU, messages=MESSAGES)["stopReason"] == "end_turn"
    assert key["key"] not in str(dict(fake.requests[-1].headers))


def test_boto3_runtime_sigv4_with_virtual_access_key(vk_proxy, fake):
    key = new_key(vk_proxy)
    client = sigv4_client("bedrock-runtime", vk_proxy, key, region="us-west-2")
    assert client.converse(modelId=HAIKU, messages=MESSAGES)["usage"]["totalTokens"] == 18
    events = list(client.converse_stream(modelId=HAIKU, messages=MESSAGES)["stream"])
    assert "metadata" in events[-1]
    body = b'{"prompt": "exact bytes", "n": 1}'
    assert json.loads(client.invoke_model(modelId=HAIKU, body=body)["body"].read())["completion"]
    seen = fake.requests[-1]
    assert seen.body == body and seen.region == "us-west-2"
    assert key["access_key_id"] not in seen.headers["Authorization"]


def test_agent_runtime_sigv4_with_virtual_access_key(vk_proxy, fake):
    key = new_key(vk_proxy)
    client = sigv4_client("bedrock-agent-runtime", vk_proxy, key)
    found = client.retrieve(knowledgeBaseId="KB12345678", retrievalQuery={"text": "q"})
    assert found["retrievalResults"]
    reply = client.invoke_agent(
        agentId="AGENT12345", agentAliasId="ALIAS12345", sessionId="session-1", inputText="hi"
    )
    assert len([e for e in reply["completion"] if "chunk" in e]) == 2


def test_aws_cli_with_virtual_access_key_profile_env(vk_proxy, fake):
    key = new_key(vk_proxy)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_BEARER")}
    env.update(
        AWS_ACCESS_KEY_ID=key["access_key_id"], AWS_SECRET_ACCESS_KEY=key["secret_access_key"]
    )
    aws = os.path.join(os.path.dirname(sys.executable), "aws")
    out = subprocess.run(
        [
            aws,
            "bedrock-runtime",
            "converse",
            "--model-id",
            HAIKU,
            "--messages",
            json.dumps(MESSAGES),
            "--endpoint-url",
            vk_proxy.base,
            "--region",
            REGION,
        ],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert json.loads(out.stdout)["output"]["message"]["content"][0]["text"] == f"model={HAIKU}"


# ---------------------------------------------------------------- signatures refused


def _error(call) -> tuple[str, int]:
    with pytest.raises(ClientError) as info:
        call()
    response = info.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def test_tampered_body_after_signing(vk_proxy, fake):
    key = new_key(vk_proxy)
    client = sigv4_client("bedrock-runtime", vk_proxy, key)

    def tamper(request, **_):
        request.body = request.body.replace(b"Hello", b"Jello")  # same length

    client.meta.events.register("before-send.bedrock-runtime.Converse", tamper)
    before = len(fake.requests)
    assert _error(lambda: client.converse(modelId=HAIKU, messages=MESSAGES)) == (
        "InvalidSignatureException",
        403,
    )
    assert len(fake.requests) == before


def test_stale_date(vk_proxy, fake, monkeypatch):
    key = new_key(vk_proxy)
    client = sigv4_client("bedrock-runtime", vk_proxy, key)
    stale = datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=20)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: stale)
    code, status = _error(lambda: client.converse(modelId=HAIKU, messages=MESSAGES))
    assert (code, status) == ("InvalidSignatureException", 403)


def test_wrong_secret_and_unknown_key(vk_proxy, fake):
    key = new_key(vk_proxy)
    wrong = dict(key, secret_access_key="not-the-secret-0000000000000000000000000")
    client = sigv4_client("bedrock-runtime", vk_proxy, wrong)
    assert _error(lambda: client.converse(modelId=HAIKU, messages=MESSAGES)) == (
        "InvalidSignatureException",
        403,
    )
    unknown = dict(key, access_key_id="BPKUNKNOWNUNKNOWN000")
    client = sigv4_client("bedrock-runtime", vk_proxy, unknown)
    assert _error(lambda: client.converse(modelId=HAIKU, messages=MESSAGES)) == (
        "UnrecognizedClientException",
        403,
    )


# ---------------------------------------------------------------- keys refused


def test_revoked_key_fails_within_the_bound_on_every_replica(
    start_proxy, vk_proxy, store_settings, fake
):
    other_replica = start_proxy(key_cache_ttl=1.0, **store_settings)
    key = new_key(vk_proxy)
    client = sigv4_client("bedrock-runtime", other_replica, key)
    client.converse(modelId=HAIKU, messages=MESSAGES)  # cached on the other replica now
    admin(vk_proxy, "POST", "/key/delete", {"keys": [key["key_id"]]})
    revoked_at = time.monotonic()
    while True:
        try:
            client.converse(modelId=HAIKU, messages=MESSAGES)
        except ClientError as exc:
            assert exc.response["Error"]["Code"] == "UnrecognizedClientException"
            break
        assert time.monotonic() - revoked_at < 5, "revocation not honoured within the bound"
        time.sleep(0.05)
    # The bound is key_cache_ttl (1 s here); the slack absorbs one slow request.
    assert time.monotonic() - revoked_at <= 1.0 + 1.0


def test_blocked_and_expired_keys(vk_proxy, fake, monkeypatch):
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    expired = new_key(vk_proxy, expires=past)
    client = bearer_client(vk_proxy, expired["key"], monkeypatch)
    with pytest.raises(client.exceptions.AccessDeniedException, match="expired"):
        client.converse(modelId=HAIKU, messages=MESSAGES)
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK")
    blocked = new_key(vk_proxy, blocked=True)
    client = sigv4_client("bedrock-runtime", vk_proxy, blocked)
    with pytest.raises(client.exceptions.AccessDeniedException, match="blocked"):
        client.converse(modelId=HAIKU, messages=MESSAGES)


@pytest.mark.parametrize(
    ("model", "allowed"),
    [
        (HAIKU, True),
        ("us.anthropic.claude-3-haiku-20240307-v1:0", True),
        (
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.anthropic.claude-3-haiku-20240307-v1:0",
            True,
        ),
        (
            "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-haiku-20240307-v1:0",
            True,
        ),
        ("meta.llama3-70b-instruct-v1:0", False),
        ("us.meta.llama3-70b-instruct-v1:0", False),
        ("arn:aws:bedrock:us-east-1::foundation-model/meta.llama3-70b-instruct-v1:0", False),
        ("arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123", False),
    ],
)
def test_model_allow_list(vk_proxy, fake, model, allowed):
    key = new_key(vk_proxy, models=["anthropic.claude-3-haiku*"])
    client = sigv4_client("bedrock-runtime", vk_proxy, key)
    if allowed:
        client.converse(modelId=model, messages=MESSAGES)
    else:
        with pytest.raises(client.exceptions.AccessDeniedException) as info:
            client.converse(modelId=model, messages=MESSAGES)
        assert model in info.value.response["Error"]["Message"]


def test_model_in_body_is_checked(vk_proxy, fake):
    key = new_key(vk_proxy, models=["anthropic.*"])
    runtime = sigv4_client("bedrock-runtime", vk_proxy, key)
    with pytest.raises(runtime.exceptions.AccessDeniedException):
        runtime.start_async_invoke(
            modelId="amazon.nova-reel-v1:0",
            modelInput={},
            outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://out/"}},
        )
    control = sigv4_client("bedrock", vk_proxy, key)
    with pytest.raises(control.exceptions.AccessDeniedException):
        control.create_model_invocation_job(
            jobName="j",
            roleArn="arn:aws:iam::123456789012:role/r",
            modelId="meta.llama3-8b-instruct-v1:0",
            inputDataConfig={"s3InputDataConfig": {"s3Uri": "s3://in/x.jsonl"}},
            outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://out/"}},
        )
    # A body naming modelId twice cannot smuggle a second model past the check.
    status, headers, _body = curl(
        vk_proxy.base + "/model-invocation-job",
        "-H",
        f"Authorization: Bearer {key['key']}",
        data='{"modelId": "anthropic.claude-v2", "modelId": "meta.llama3-8b-instruct-v1:0"}',
    )
    assert status == 400 and headers["x-amzn-errortype"] == "ValidationException"
    # Nor can a compressed body, which the proxy forwards as sent and so cannot read.
    before = len(fake.requests)
    squeezed = gzip.compress(b'{"modelId": "meta.llama3-8b-instruct-v1:0"}')
    request = urllib.request.Request(
        vk_proxy.base + "/model-invocation-job",
        data=squeezed,
        headers={
            "Authorization": f"Bearer {key['key']}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        },
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    assert info.value.headers["x-amzn-ErrorType"] == "ValidationException"
    assert len(fake.requests) == before  # never forwarded


def test_operation_groups_and_resource_lists(vk_proxy, fake):
    inference_only = new_key(vk_proxy, operation_groups=["inference"])
    agents = sigv4_client("bedrock-agent-runtime", vk_proxy, inference_only)
    with pytest.raises(agents.exceptions.AccessDeniedException, match="Retrieve"):
        agents.retrieve(knowledgeBaseId="KB12345678", retrievalQuery={"text": "q"})
    control = sigv4_client("bedrock", vk_proxy, inference_only)
    with pytest.raises(control.exceptions.AccessDeniedException):
        control.list_foundation_models()
    sigv4_client("bedrock-runtime", vk_proxy, inference_only).converse(
        modelId=HAIKU, messages=MESSAGES
    )

    scoped = new_key(
        vk_proxy,
        knowledge_base_ids=["KB12345678"],
        agent_ids=["AGENT12345"],
        guardrail_ids=["gr-ok"],
    )
    agents = sigv4_client("bedrock-agent-runtime", vk_proxy, scoped)
    agents.retrieve(knowledgeBaseId="KB12345678", retrievalQuery={"text": "q"})
    with pytest.raises(agents.exceptions.AccessDeniedException):
        agents.retrieve(knowledgeBaseId="KBOTHER000", retrievalQuery={"text": "q"})
    with pytest.raises(agents.exceptions.AccessDeniedException):
        agents.invoke_agent(
            agentId="AGENTOTHER", agentAliasId="ALIAS12345", sessionId="s-1", inputText="x"
        )
    runtime = sigv4_client("bedrock-runtime", vk_proxy, scoped)
    with pytest.raises(runtime.exceptions.AccessDeniedException):
        runtime.apply_guardrail(
            guardrailIdentifier="gr-other",
            guardrailVersion="1",
            source="INPUT",
            content=[{"text": {"text": "x"}}],
        )
    with pytest.raises(runtime.exceptions.AccessDeniedException):
        runtime.converse(
            modelId=HAIKU,
            messages=MESSAGES,
            guardrailConfig={"guardrailIdentifier": "gr-other", "guardrailVersion": "1"},
        )


# ---------------------------------------------------------------- secrets at rest


def test_regenerate_replaces_every_credential(vk_proxy, fake, monkeypatch):
    key = new_key(vk_proxy)
    status, fresh = admin(vk_proxy, "POST", "/key/regenerate", {"key": key["key_id"]})
    assert status == 200 and fresh["key"] != key["key"]
    old = sigv4_client("bedrock-runtime", vk_proxy, key)
    assert (
        _error(lambda: old.converse(modelId=HAIKU, messages=MESSAGES))[0]
        == "UnrecognizedClientException"
    )
    sigv4_client("bedrock-runtime", vk_proxy, fresh).converse(modelId=HAIKU, messages=MESSAGES)
    bearer_client(vk_proxy, fresh["key"], monkeypatch).converse(modelId=HAIKU, messages=MESSAGES)


def test_secret_key_rotation_keeps_client_secrets(start_proxy, tmp_path, fake):
    shared = {"sqlite_path": str(tmp_path / "rotation.db")}
    first = start_proxy(secret_key="first-server-secret-0001", **shared)
    key = new_key(first)
    rotated = start_proxy(
        secret_key="second-server-secret-002",
        previous_secret_keys=["first-server-secret-0001"],
        **shared,
    )
    sigv4_client("bedrock-runtime", rotated, key).converse(modelId=HAIKU, messages=MESSAGES)
    # Resealed at the rotated replica's startup: the old secret is no longer needed.
    only_new = start_proxy(secret_key="second-server-secret-002", **shared)
    sigv4_client("bedrock-runtime", only_new, key).converse(modelId=HAIKU, messages=MESSAGES)
    raw = (tmp_path / "rotation.db").read_bytes()
    for wal in tmp_path.glob("rotation.db-wal"):
        raw += wal.read_bytes()
    assert key["key"].encode() not in raw and key["secret_access_key"].encode() not in raw


# ---------------------------------------------------------------- store and CLI


async def test_migrations_apply_once(store_settings):
    from proxy.store import open_store

    first = open_store(store_settings.get("database_url"), store_settings.get("sqlite_path", ""))
    await first.open()
    assert await first.db.migrate() == []  # already at the latest version
    await first.close()


def test_keys_command_line(tmp_path):
    """The CLI finds the store as ``serve`` does and names it; reads need no master key;
    a table by default, JSON with --json; a command that fails creates no store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDROCK_PROXY_")}
    env.update(
        BEDROCK_PROXY_MASTER_KEY=MASTER_KEY, BEDROCK_PROXY_SQLITE_PATH=str(tmp_path / "k.db")
    )
    cli = [os.path.join(os.path.dirname(sys.executable), "bedrock-proxy"), "keys"]

    def call(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*cli, *args], env={**env, **extra}, capture_output=True, text=True, timeout=30
        )

    def run(*args: str) -> dict:
        out = call(*args, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    # Nothing to read yet, and nothing to seal with: refused, and no store left behind.
    missing = call("list")
    assert missing.returncode == 1 and "there is no store at" in missing.stderr, missing.stderr
    unsealed = call("create", "--alias", "x", BEDROCK_PROXY_MASTER_KEY="")
    assert unsealed.returncode == 2 and "BEDROCK_PROXY_MASTER_KEY" in unsealed.stderr
    assert not (tmp_path / "k.db").exists()

    created = run("create", "--alias", "cli-key", "--models", "anthropic.*,amazon.*", "--rpm", "5")
    assert created["models"] == ["anthropic.*", "amazon.*"] and created["key"].startswith("sk-bp-")
    assert run("info", "cli-key")["info"]["rpm_limit"] == 5
    assert run("update", "cli-key", "--block")["blocked"] is True
    assert [k["key_alias"] for k in run("list")["keys"]] == ["cli-key"]
    # A table, one line per key, read without the master key; the store is named.
    table = call("list", BEDROCK_PROXY_MASTER_KEY="")
    assert table.returncode == 0, table.stderr
    assert f"store: SQLite {tmp_path / 'k.db'}" in table.stderr
    header, rule, row, footer = table.stdout.splitlines()
    assert header.split()[:2] == ["key_id", "key_alias"] and set(rule) <= {"-", " "}
    assert row.split()[:2] == [created["key_id"], "cli-key"] and "anthropic.*" in row
    assert footer.startswith("(1 keys")
    info = call("info", "cli-key", BEDROCK_PROXY_MASTER_KEY="")
    assert info.returncode == 0 and "rpm_limit" in info.stdout and "{" not in info.stdout
    assert run("revoke", created["key"]) == {"deleted_keys": [created["key_id"]]}
    out = call("info", "cli-key")
    assert out.returncode == 1 and "ResourceNotFoundException" in out.stderr


def test_an_alias_cannot_name_another_key(proxy):
    victim = new_key(proxy)
    for alias in (
        victim["key_id"],
        "vk_0123456789abcdef",
        "sk-bp-anything",
        "BPKABCDEFGHIJKLMNOPQ",
    ):
        status, body = admin(proxy, "POST", "/key/generate", {"key_alias": alias})
        assert status == 400 and "key_alias must not look like" in body["message"], alias
    # key_aliases names aliases only: a key id there is no alias, and deletes nothing.
    status, body = admin(proxy, "POST", "/key/delete", {"key_aliases": [victim["key_id"]]})
    assert status == 404
    assert admin(proxy, "GET", f"/key/info?key={victim['key_id']}")[0] == 200
    aliased = new_key(proxy, key_alias="team-bot")
    status, body = admin(proxy, "POST", "/key/delete", {"key_aliases": ["team-bot"]})
    assert status == 200 and body["deleted_keys"] == [aliased["key_id"]]


def test_a_key_expires_when_the_proxys_clock_says(start_proxy, fake):
    """Expiry is read from the proxy's clock (injected): the test moves it past the key's
    lifetime instead of waiting an hour."""
    from tests.conftest import boto_client

    server = start_proxy()
    key = new_key(server, duration="1h")
    client = boto_client("bedrock-runtime", server, key=key["key"])
    message = [{"role": "user", "content": [{"text": "hi"}]}]
    client.converse(modelId="anthropic.claude-3-haiku-20240307-v1:0", messages=message)
    server.clock.advance(3600 + 1)
    with pytest.raises(ClientError) as refused:
        client.converse(modelId="anthropic.claude-3-haiku-20240307-v1:0", messages=message)
    error = refused.value.response["Error"]
    assert error["Code"] == "AccessDeniedException" and "expired" in error["Message"]
