"""The HTTPS listener: Bedrock API keys over TLS, SigV4 clients too, certificate reload."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import urllib.request

import boto3
import pytest
from botocore.exceptions import SSLError

from proxy.server.listen.tls import server_context, write_self_signed
from tests.conftest import MASTER_KEY, REGION, boto_client, client_config, start_server
from tests.fake_bedrock import FakeBedrock
from tests.helpers.processes import BIN, free_port, running, server_env

MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]


def test_bearer_token_client_over_https(https_proxy, fake, cert_pair, monkeypatch):
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", MASTER_KEY)
    client = boto3.client(
        "bedrock-runtime",
        endpoint_url=https_proxy.base,
        region_name=REGION,
        verify=cert_pair[0],
        config=client_config(),
    )
    reply = client.converse(modelId="m1", messages=MESSAGES)
    assert reply["output"]["message"]["content"][0]["text"] == "model=m1"
    assert fake.requests[-1].headers["Authorization"].startswith("AWS4-HMAC-SHA256")
    events = list(client.converse_stream(modelId="m1", messages=MESSAGES)["stream"])
    assert "metadata" in events[-1]


def test_sigv4_client_over_https(https_proxy, fake, cert_pair):
    client = boto_client("bedrock-agent-runtime", https_proxy, verify=cert_pair[0])
    found = client.retrieve(knowledgeBaseId="KB12345678", retrievalQuery={"text": "q"})
    assert found["retrievalResults"]


def test_upstream_over_https_verified_against_aws_ca_bundle(
    bg, start_proxy, cert_pair, monkeypatch
):
    """AWS itself is HTTPS: the upstream client verifies it, and streams over TLS."""
    fake = FakeBedrock()
    url, runner = bg.run(start_server(fake.app(), server_context(*cert_pair)))
    try:
        proxy = start_proxy(endpoints={"bedrock-runtime": url})
        client = boto_client("bedrock-runtime", proxy)
        monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
        with pytest.raises(client.exceptions.ServiceUnavailableException):
            client.converse(modelId="m", messages=MESSAGES)  # not trusted: refused
        assert not fake.requests
        monkeypatch.setenv("AWS_CA_BUNDLE", cert_pair[0])
        reply = client.converse(modelId="m", messages=MESSAGES)
        assert reply["output"]["message"]["content"][0]["text"] == "model=m"
        events = list(client.converse_stream(modelId="m", messages=MESSAGES)["stream"])
        assert "metadata" in events[-1]
    finally:
        bg.run(runner.cleanup())


def test_client_that_does_not_trust_the_certificate_fails_handshake(https_proxy, fake):
    client = boto_client("bedrock-runtime", https_proxy)  # default trust store
    before = len(fake.requests)
    with pytest.raises(SSLError):
        client.converse(modelId="m1", messages=MESSAGES)
    assert len(fake.requests) == before


def _served_cert(port: int) -> str:
    """The certificate a new handshake gets (not verified: it is what we inspect)."""
    return ssl.get_server_certificate(("127.0.0.1", port), timeout=5)


def test_sighup_reloads_certificate_without_dropping_a_stream(fake_server, tmp_path):
    fake, fake_url = fake_server
    cert, key = write_self_signed(str(tmp_path / "live"))
    port, http_port = free_port(), free_port()
    env = server_env(
        fake_url,
        BEDROCK_PROXY_HOST="127.0.0.1",
        BEDROCK_PROXY_PORT=str(port),
        BEDROCK_PROXY_TLS_CERT=cert,
        BEDROCK_PROXY_TLS_KEY=key,
        BEDROCK_PROXY_HTTP_PORT=str(http_port),
    )
    # Readiness over the plain-HTTP listener; /bedrock is not served there.
    with running([BIN, "serve"], env, http_port) as proc:
        old_pem = _served_cert(port)
        fake.frame_delay = 0.25
        result: dict = {}

        def stream() -> None:
            client = boto_client(
                "bedrock-runtime",
                type("S", (), {"base": f"https://127.0.0.1:{port}/bedrock"})(),
                verify=cert,
            )
            try:
                events = list(
                    client.converse_stream(modelId="test.slow", messages=MESSAGES)["stream"]
                )
                result["events"] = events
            except Exception as exc:  # reported below
                result["error"] = exc

        trusted_old = cert + ".old"
        with open(cert) as src, open(trusted_old, "w") as dst:
            dst.write(src.read())
        cert = trusted_old
        worker = threading.Thread(target=stream)
        worker.start()
        while fake.active_streams == 0 and worker.is_alive():
            threading.Event().wait(0.02)
        write_self_signed(str(tmp_path / "live"))  # rotate the files in place
        proc.send_signal(signal.SIGHUP)
        new_pem = None
        for _ in range(50):
            new_pem = _served_cert(port)
            if new_pem != old_pem:
                break
            threading.Event().wait(0.05)
        worker.join(20)
        assert "error" not in result, result.get("error")
        assert "metadata" in result["events"][-1]
        with open(os.path.join(tmp_path, "live", "cert.pem")) as fh:
            assert ssl.PEM_cert_to_DER_cert(new_pem) == ssl.PEM_cert_to_DER_cert(fh.read())
        with urllib.request.urlopen(
            f"http://127.0.0.1:{http_port}/health/liveness", timeout=5
        ) as r:
            assert json.loads(r.read())["status"] == "alive"
        # Both listeners take HTTP/2 as well: h2c on the plain one, h2 by ALPN on TLS.
        for args in (
            ["--http2-prior-knowledge", f"http://127.0.0.1:{http_port}/health/liveness"],
            [
                "--http2",
                "--cacert",
                str(tmp_path / "live" / "cert.pem"),
                f"https://127.0.0.1:{port}/health/liveness",
            ],
        ):
            out = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "-o",
                    os.devnull,
                    "-w",
                    "%{http_version}",
                    *args,
                ],
                capture_output=True,
                text=True,
                timeout=10,
            )
            assert out.stdout == "2", out.stderr
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(
                f"http://127.0.0.1:{http_port}/bedrock/model/m/converse", timeout=5
            )
        assert info.value.code == 404


def test_bad_certificate_file_is_one_line(tmp_path):
    bogus = tmp_path / "cert.pem"
    bogus.write_text("not a certificate")
    env = server_env(
        "http://127.0.0.1:9",
        BEDROCK_PROXY_TLS_CERT=str(bogus),
        BEDROCK_PROXY_TLS_KEY=str(tmp_path / "missing.pem"),
    )
    out = subprocess.run([BIN, "serve"], env=env, capture_output=True, timeout=30)
    assert out.returncode == 2
    lines = out.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "tls_key" in lines[0]


def test_tls_selfsigned_command_prints_what_boto3_needs(tmp_path):
    out = (
        subprocess.run(
            [sys.executable, "-m", "proxy", "tls-selfsigned", "--out", str(tmp_path)],
            capture_output=True,
            timeout=30,
            check=True,
        )
        .stdout.decode()
        .splitlines()
    )
    cert = str(tmp_path / "cert.pem")
    assert out == [f'verify="{cert}"', f"export AWS_CA_BUNDLE={cert}"]
    assert oct(os.stat(tmp_path / "key.pem").st_mode & 0o777) == "0o600"


def test_virtual_key_over_https_by_bearer_and_sigv4(
    start_proxy, cert_pair, fake, monkeypatch, tmp_path
):
    from tests.helpers.admin import new_key

    store = {"sqlite_path": str(tmp_path / "keys.db")}
    https = start_proxy(tls=server_context(*cert_pair), **store)
    key = new_key(start_proxy(**store))  # minted over plain HTTP on the same store
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", key["key"])
    bearer = boto3.client(
        "bedrock-runtime",
        endpoint_url=https.base,
        region_name=REGION,
        verify=cert_pair[0],
        config=client_config(),
    )
    assert bearer.converse(modelId="m1", messages=MESSAGES)["stopReason"] == "end_turn"
    assert list(bearer.converse_stream(modelId="m1", messages=MESSAGES)["stream"])[-1]["metadata"]
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK")
    signed = boto3.client(
        "bedrock-runtime",
        endpoint_url=https.base,
        region_name=REGION,
        verify=cert_pair[0],
        config=client_config(),
        aws_access_key_id=key["access_key_id"],
        aws_secret_access_key=key["secret_access_key"],
    )
    assert signed.converse(modelId="m1", messages=MESSAGES)["usage"]["totalTokens"] == 18
