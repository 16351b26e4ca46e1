"""The proxy as its admins and key holders reach it in tests: the admin API, new keys,
boto3 clients signed with a key's pair or its token, and the ledger's rows."""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request

import boto3
from botocore.config import Config

from tests.conftest import MASTER_KEY, REGION, client_config


def admin(server, method: str, path: str, body: dict | None = None, key: str = MASTER_KEY):
    request = urllib.request.Request(
        server.url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        assert exc.headers["x-amzn-ErrorType"]
        return exc.code, {"code": exc.headers["x-amzn-ErrorType"], **json.loads(exc.read())}


def new_key(server, **fields) -> dict:
    fields.setdefault("key_alias", f"test-{secrets.token_hex(4)}")
    status, body = admin(server, "POST", "/key/generate", fields)
    assert status == 200, body
    return body


def sigv4_client(service: str, server, key: dict, region: str = REGION):
    return boto3.client(
        service,
        endpoint_url=server.base,
        region_name=region,
        aws_access_key_id=key["access_key_id"],
        aws_secret_access_key=key["secret_access_key"],
        config=client_config(),
    )


def bearer_client(server, token: str, monkeypatch):
    """botocore reads AWS_BEARER_TOKEN_BEDROCK when it sends; it stays set for the test."""
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", token)
    return boto3.client(
        "bedrock-runtime", endpoint_url=server.base, region_name=REGION, config=client_config()
    )


def s3_client(server, key: dict, **config):
    return boto3.client(
        "s3",
        endpoint_url=server.base + "/files",
        region_name=REGION,
        aws_access_key_id=key["access_key_id"],
        aws_secret_access_key=key["secret_access_key"],
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, **config),
    )


def ledger_row(server, request_id: str, timeout: float = 5) -> dict:
    """The ledger row of one request, once the batch writer has stored it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, logs = admin(server, "GET", "/spend/logs?size=1000")
        assert status == 200
        for row in logs["logs"]:
            if row["request_id"] == request_id:
                return row
        time.sleep(0.1)
    raise AssertionError(f"no ledger row for {request_id}")
