"""What goes upstream: which headers, which region, which credentials."""

from __future__ import annotations

import json
import stat
import sys

import boto3
import pytest

from proxy.server.credentials import CredentialProvider
from tests.conftest import MASTER_KEY, boto_client, client_config, with_key_header
from tests.fake_bedrock import UPSTREAM_BEARER
from tests.helpers.http import curl

MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]


def test_client_credentials_and_foreign_headers_never_forwarded(proxy, fake):
    status, _, _ = curl(
        proxy.base + "/model/m/converse",
        "-H",
        f"x-bf-vk: {MASTER_KEY}",
        "-H",
        "X-Forwarded-For: 10.0.0.1",
        "-H",
        "Cookie: session=abc",
        "-H",
        "X-Amz-Security-Token: client-token",
        "-H",
        "x-bedrock-proxy-debug: 1",
        "-H",
        "xProxy-User-ID: alice",
        "-H",
        "Accept-Encoding: gzip",  # the response must come back readable, to be metered
        data=json.dumps({"messages": MESSAGES}),
    )
    assert status == 200
    seen = {k.lower(): v for k, v in fake.requests[-1].headers.items()}
    for name in (
        "x-bf-vk",
        "x-forwarded-for",
        "cookie",
        "x-bedrock-proxy-debug",
        "xproxy-user-id",
        "accept-encoding",
    ):
        assert name not in seen
    assert seen["x-amz-security-token"] != "client-token"
    assert MASTER_KEY not in json.dumps(seen)


def test_region_follows_the_clients_signing_scope(proxy, fake):
    client = boto3.client(
        "bedrock-runtime",
        endpoint_url=proxy.base,
        region_name="eu-west-3",
        aws_access_key_id="dummy",
        aws_secret_access_key="dummy",
        config=client_config(),
    )
    with_key_header(client, MASTER_KEY)
    client.converse(modelId="m", messages=MESSAGES)
    assert fake.requests[-1].region == "eu-west-3"
    boto_client("bedrock-runtime", proxy).converse(modelId="m", messages=MESSAGES)
    assert fake.requests[-1].region == "us-east-1"


def test_upstream_bedrock_api_key_instead_of_sigv4(start_proxy, fake):
    bearer = start_proxy(upstream_bearer_token=UPSTREAM_BEARER)
    boto_client("bedrock-runtime", bearer).converse(modelId="m", messages=MESSAGES)
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {UPSTREAM_BEARER}"


@pytest.fixture
def process_credentials(tmp_path, monkeypatch):
    """A credential_process profile whose credentials expire in 12 minutes: inside the
    background-refresh window, outside the blocking one. Each call is counted."""
    counter = tmp_path / "calls"
    script = tmp_path / "creds.py"
    script.write_text(
        "import datetime, json, pathlib\n"
        f"p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "exp = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=12)\n"
        "print(json.dumps({'Version': 1, 'AccessKeyId': f'AKID{n}', 'SecretAccessKey': 's',"
        " 'Expiration': exp.strftime('%Y-%m-%dT%H:%M:%SZ')}))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    config = tmp_path / "config"
    config.write_text(f"[profile refreshing]\ncredential_process = {sys.executable} {script}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    return counter


async def test_credentials_refresh_in_background_without_blocking(process_credentials):
    provider = CredentialProvider("refreshing")
    first = await provider.get()
    calls = process_credentials.read_text()
    provider._next_check = 0  # as if a second had passed
    again = await provider.get()
    # Served at once from the current credentials; the process has not run again yet.
    assert again == first and process_credentials.read_text() == calls
    assert provider._refresh_task is not None
    await provider._refresh_task
    refreshed = await provider.get()
    assert refreshed.access_key != first.access_key
    assert int(process_credentials.read_text()) > int(calls)
    await provider.close()
