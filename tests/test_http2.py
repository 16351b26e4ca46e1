"""HTTP/2 on the proxy's own listeners: h2c by prior knowledge, h2 by ALPN, HTTP/1.1
untouched; the JavaScript SDK's default client and LangChain.js unmodified; the limits
against abuse, resets, GOAWAY and drain."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import EventStreamError
from h2.settings import SettingCodes
from hyperframe.frame import ExtensionFrame, PriorityFrame, RstStreamFrame, WindowUpdateFrame

from proxy.server.listen.tls import server_context
from proxy.wire.eventsig import STREAMING_EVENTS, SignatureChain
from proxy.wire.eventstream import encode_frame, iter_frames
from tests.conftest import (
    MASTER_KEY,
    REGION,
    UPSTREAM_ACCESS_KEY,
    UPSTREAM_SECRET_KEY,
    boto_client,
    start_server,
)
from tests.fake_bedrock import FakeBedrock
from tests.h2client import Answer, H2Client
from tests.helpers.admin import admin, new_key
from tests.helpers.processes import BIN, free_port, running
from tests.helpers.processes import proxy_env as _proxy_env

JS = os.path.join(os.path.dirname(__file__), "js")
BODY = json.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}).encode()
BEARER = [("authorization", f"Bearer {MASTER_KEY}"), ("content-type", "application/json")]
ENHANCE_YOUR_CALM = 11
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]
CANCEL = 8


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=20
    )


def js_clients(spec: dict, env: dict[str, str], cafile: str | None = None) -> dict[str, dict]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull, **env)
    base["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    if cafile:
        base["NODE_EXTRA_CA_CERTS"] = cafile
    spec = {"region": REGION, "model": "m1", "knowledgeBase": "KB12345678", **spec}
    out = subprocess.run(
        ["node", os.path.join(JS, "clients.mjs"), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=90,
        env=base,
    )
    assert out.returncode == 0, out.stderr
    return {r["call"]: r for r in map(json.loads, out.stdout.splitlines())}


# ---------------------------------------------------------------------------- one port


def test_curl_speaks_h2c_and_http1_on_one_port(proxy, fake):
    url = proxy.base + "/model/m1/converse"
    for flag, version in (("--http2-prior-knowledge", "2"), ("--http1.1", "1.1")):
        out = curl(
            flag,
            "-H",
            f"Authorization: Bearer {MASTER_KEY}",
            "-H",
            "content-type: application/json",
            "--data",
            BODY.decode(),
            url,
            "-w",
            "\n%{http_version} %{http_code}",
        )
        body, _, status = out.stdout.rpartition("\n")
        assert status == f"{version} 200", out.stderr
        assert json.loads(body)["output"]["message"]["content"][0]["text"] == "model=m1"
        # Upstream it is HTTP/1.1 either way, re-signed, the body byte for byte.
        assert fake.requests[-1].body == BODY
        assert fake.requests[-1].headers["Authorization"].startswith("AWS4-HMAC-SHA256")


def test_curl_negotiates_h2_by_alpn_on_tls(https_proxy, cert_pair):
    url = https_proxy.base + "/model/m1/converse-stream"
    for flag, version in (("--http2", "2"), ("--http1.1", "1.1")):
        out = curl(
            flag,
            "--cacert",
            cert_pair[0],
            "-H",
            f"Authorization: Bearer {MASTER_KEY}",
            "--data",
            BODY.decode(),
            url,
            "-o",
            os.devnull,
            "-w",
            "%{http_version} %{http_code} %{size_download}",
        )
        got_version, status, size = out.stdout.split()
        assert (got_version, status) == (version, "200"), out.stderr
        assert int(size) > 500  # the whole event stream


def test_errors_stay_aws_shaped_over_h2(proxy):
    client = H2Client(proxy.base)
    try:
        refused = client.fetch(
            "POST",
            "/bedrock/model/m1/converse",
            headers=[
                ("authorization", "Bearer sk-bp-not-a-key"),
                ("content-type", "application/json"),
            ],
            body=BODY,
        )
        assert refused.status == 403 and refused.headers["x-amzn-errortype"]
        assert "message" in json.loads(refused.body)
    finally:
        client.close()


MALFORMED = {
    "host differs from :authority": [("host", "elsewhere.example")],
    "upper-case name": [("X-Upper", "1")],
    "CR in a value": [("x-a", "1\r\nx-b: 2")],
    "NUL in a value": [("x-a", "1\x002")],
    "leading space": [("x-a", " 1")],
    "connection header": [("connection", "close")],
    "transfer-encoding": [("transfer-encoding", "chunked")],
    "TE not trailers": [("te", "gzip")],
    "colon inside a name": [("x:a", "1")],
    "unknown pseudo-header": [(":protocol", "websocket")],
    "pseudo-header after a field": [("x-a", "1"), (":scheme", "http")],
}


@pytest.mark.parametrize("fields", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_are_reset_and_never_forwarded(proxy, fake, fields):
    """RFC 9113 8.1.1: a stream error PROTOCOL_ERROR; the connection serves on."""
    fake.reset()
    client = H2Client(proxy.base)
    try:
        client.conn.config.validate_outbound_headers = False
        client.conn.config.normalize_outbound_headers = False
        bad = client.request(
            "POST", "/bedrock/model/m1/converse", headers=BEARER + fields, body=BODY
        )
        client.pump(lambda: client.done(bad))
        assert client.answers[bad].reset == 1  # PROTOCOL_ERROR
        assert client.fetch("GET", "/health/liveness").status == 200
    finally:
        client.close()
    assert not fake.requests


# ---------------------------------------------------------------------------- JS SDK


@pytest.mark.parametrize("listener", ["h2c", "tls"])
def test_js_sdk_default_clients_with_a_bearer_key(request, listener, cert_pair, fake):
    server = request.getfixturevalue("proxy" if listener == "h2c" else "https_proxy")
    results = js_clients(
        {"endpoint": server.base, "calls": ["converse", "converse-stream"]},
        {"AWS_BEARER_TOKEN_BEDROCK": MASTER_KEY},
        cert_pair[0],
    )
    assert results["converse"] == {
        "call": "converse",
        "ok": True,
        "handler": "NodeHttp2Handler",
        "text": "model=m1",
        "usage": {"inputTokens": 11, "outputTokens": 7, "totalTokens": 18},
    }
    stream = results["converse-stream"]
    assert stream["ok"] and stream["text"] == "Hello from m1", stream
    assert (stream["first"], stream["last"]) == ("messageStart", "metadata")


@pytest.mark.parametrize("listener", ["h2c", "tls"])
def test_js_sdk_and_langchain_with_a_virtual_key_pair(
    request, listener, cert_pair, fake, monkeypatch
):
    """SigV4 over HTTP/2 signs :authority, not host; the proxy verifies it, re-signs, and
    meters the key's spend."""
    server = request.getfixturevalue("proxy" if listener == "h2c" else "https_proxy")
    monkeypatch.setenv("SSL_CERT_FILE", cert_pair[0])  # for the admin calls over https
    key = new_key(server, models=["m1"], knowledge_base_ids=["KB12345678"], rpm_limit=100)
    results = js_clients(
        {
            "endpoint": server.base,
            "calls": ["converse", "converse-stream", "retrieve", "langchain"],
        },
        {
            "AWS_ACCESS_KEY_ID": key["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": key["secret_access_key"],
        },
        cert_pair[0],
    )
    assert all(r["ok"] for r in results.values()), results
    assert results["retrieve"]["results"] >= 1
    assert results["langchain"]["handler"] == "NodeHttp2Handler"
    assert results["langchain"]["text"] == "model=m1"
    assert key["access_key_id"] not in fake.requests[-1].headers["Authorization"]
    server.settle()
    _, logs = admin(server, "GET", f"/spend/logs?api_key={key['key_id']}")
    operations = sorted(row["operation"] for row in logs["logs"])
    assert operations == ["Converse", "Converse", "ConverseStream", "Retrieve"], logs
    assert sum(row["total_tokens"] or 0 for row in logs["logs"]) == 18 + 18 + 21
    # A model outside the key's allow-list is refused over HTTP/2 as over HTTP/1.1.
    denied = js_clients(
        {"endpoint": server.base, "model": "m2", "calls": ["converse"]},
        {
            "AWS_ACCESS_KEY_ID": key["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": key["secret_access_key"],
        },
        cert_pair[0],
    )["converse"]
    assert (denied["ok"], denied["error"], denied["status"]) == (
        False,
        "AccessDeniedException",
        403,
    )


# ---------------------------------------------------------------------------- streams


def test_goaway_from_the_client_lets_open_streams_finish(proxy, fake):
    """Node sends GOAWAY as soon as a response's headers arrive; the stream must go on."""
    fake.reset()
    client = H2Client(proxy.base)
    try:
        stream_id = client.request(
            "POST", "/bedrock/model/test.slow/converse-stream", headers=BEARER, body=BODY
        )
        client.pump(lambda: client.answers[stream_id].status is not None)
        client.send_goaway()
        client.pump(lambda: client.done(stream_id), timeout=10)
        answer = client.answers[stream_id]
        assert answer.ended and answer.reset is None
        assert answer.body.count(b"contentBlockDelta") == 10 and b"metadata" in answer.body
    finally:
        client.close()


def test_a_reset_stream_cancels_its_upstream_call_and_only_that_one(proxy, fake):
    fake.reset()
    fake.frame_delay = 0.2
    client = H2Client(proxy.base)
    try:
        doomed = client.request(
            "POST", "/bedrock/model/test.slow/converse-stream", headers=BEARER, body=BODY
        )
        kept = client.request(
            "POST", "/bedrock/model/test.slow/converse-stream", headers=BEARER, body=BODY
        )
        client.pump(lambda: all(a.body for a in client.answers.values()))
        client.conn.reset_stream(doomed)
        client.flush()
        client.pump(lambda: client.done(kept), timeout=10)
        assert client.answers[kept].ended and b"metadata" in client.answers[kept].body
        deadline = time.monotonic() + 5
        while fake.stream_disconnects < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fake.stream_disconnects == 1
    finally:
        client.close()
    line = proxy.wait_log_line(lambda r: r.get("error") == "ClientDisconnected")
    assert line["operation"] == "ConverseStream"


def test_request_body_flow_control_both_ways(proxy, fake):
    """A body larger than every window arrives whole: windows are granted as it is read."""
    big = json.dumps({"messages": [{"role": "user", "content": [{"text": "x" * 3_000_000}]}]})
    client = H2Client(proxy.base, timeout=20)
    try:
        stream_id = client.request("POST", "/bedrock/model/m1/converse", headers=BEARER, end=False)
        client.send_all(stream_id, big.encode())
        client.pump(lambda: client.done(stream_id))
        answer = client.answers[stream_id]
        assert answer.status == 200, answer.body[:200]
        assert fake.requests[-1].body == big.encode()
    finally:
        client.close()


# ---------------------------------------------------------------------------- abuse


def _goaway_code(client: H2Client, timeout: float = 5) -> int:
    client.pump(lambda: client.goaway is not None, timeout=timeout)
    assert client.goaway is not None, f"no GOAWAY before the connection ended: {client.closed_by}"
    return int(client.goaway.error_code)


def test_rapid_reset_is_cut(proxy, fake, caplog):
    fake.reset()
    client = H2Client(proxy.base)
    try:
        with contextlib.suppress(OSError):  # closed while still sending: that is the point
            for _ in range(250):
                stream_id = client.request(
                    "POST", "/bedrock/model/m1/converse", headers=BEARER, end=False
                )
                client.conn.reset_stream(stream_id)
            client.flush()
        code = _goaway_code(client)
        assert code == ENHANCE_YOUR_CALM or (code is None and client.closed)
    finally:
        client.close()
    assert any("resets" in r.getMessage() for r in caplog.records)
    assert not fake.requests  # none of them reached the upstream
    assert H2Client(proxy.base).fetch("GET", "/health/liveness").status == 200  # others unaffected


@pytest.mark.parametrize("flood", ["ping", "settings", "empty-data"])
def test_control_frame_floods_are_cut(proxy, flood):
    client = H2Client(proxy.base)
    try:
        stream_id = client.request("POST", "/bedrock/model/m1/converse", headers=BEARER, end=False)
        for i in range(600):
            if flood == "ping":
                client.conn.ping(i.to_bytes(8, "big"))
            elif flood == "settings":
                client.conn.update_settings({})
            else:
                client.conn.send_data(stream_id, b"")
        with contextlib.suppress(OSError):  # closed while still sending: that is the point
            client.flush()
        code = _goaway_code(client)
        assert code == ENHANCE_YOUR_CALM or (code is None and client.closed)
    finally:
        client.close()


def _flood(client: H2Client, data: bytes) -> None:
    with contextlib.suppress(OSError):  # closed while still sending: that is the point
        client.sock.sendall(data)


@pytest.mark.parametrize(
    "frame",
    ["window-update-0", "window-update-closed", "rst-closed", "priority", "unknown"],
)
def test_floods_of_any_frame_type_are_cut_before_any_key(proxy, frame, caplog):
    """Frames that carry no request forward are counted frame by frame, whatever their
    type and whether or not h2 makes an event of them (stream 0's window updates and
    frames on streams that have ended make none): ~100,000 of them (1.2-1.5 MiB) end in a
    GOAWAY after the budget, not seconds of the event loop."""
    client = H2Client(proxy.base)
    try:
        assert client.fetch("GET", "/health/liveness").status == 200  # stream 1, ended
        one = {
            "window-update-0": WindowUpdateFrame(0, window_increment=1),
            "window-update-closed": WindowUpdateFrame(1, window_increment=1),
            "rst-closed": RstStreamFrame(1, error_code=0),
            "priority": PriorityFrame(1, depends_on=0, stream_weight=15),
            "unknown": ExtensionFrame(0xEE, 0),
        }[frame].serialize()
        _flood(client, one * 100_000)
        assert _goaway_code(client, timeout=10) == ENHANCE_YOUR_CALM
    finally:
        client.close()
    assert any("too many control frames" in r.getMessage() for r in caplog.records)
    assert H2Client(proxy.base).fetch("GET", "/health/liveness").status == 200


def test_resets_the_client_makes_the_server_send_are_counted(proxy, fake):
    """MadeYouReset (CVE-2025-8671): a window update that overflows a stream's window
    makes the server reset it; 250 of those are as many resets as the client's own."""
    fake.reset()
    client = H2Client(proxy.base)
    try:
        client.pump(lambda: client.conn.remote_settings.max_concurrent_streams == 100)
        client.conn.remote_settings.max_concurrent_streams = 1000  # each is reset at once
        client.conn.remote_settings.acknowledge()
        fields = [(":method", "GET"), (":scheme", "http"), (":authority", client.authority)]
        data = bytearray()
        for _ in range(250):
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream_id, [*fields, (":path", "/health/liveness")])
            client.answers[stream_id] = Answer()
            data += client.conn.data_to_send()
            data += WindowUpdateFrame(stream_id, window_increment=2**31 - 1).serialize()
        _flood(client, bytes(data))
        assert _goaway_code(client, timeout=10) == ENHANCE_YOUR_CALM
    finally:
        client.close()


def test_a_stream_whose_window_stays_shut_is_reset_at_the_body_timeout(start_proxy, fake):
    slow = start_proxy(body_timeout=1.0)
    client = H2Client(slow.base, timeout=10)
    try:
        client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        client.flush()
        streams = [client.request("GET", "/health/liveness") for _ in range(20)]
        client.pump(lambda: all(client.done(s) for s in streams), timeout=10)
        assert {client.answers[s].reset for s in streams} == {CANCEL}
        assert all(client.answers[s].status == 200 for s in streams)  # headers, no body
    finally:
        client.close()


def test_too_many_streams_and_oversized_headers_are_refused(start_proxy, fake):
    # A proxy of its own, whose first-request deadline a busy machine cannot reach: with
    # the shared proxy's 2 s, the 100 streams the first half tears down could starve the
    # second connection past it, and the deadline closed it (with no GOAWAY) before the
    # oversized header block was read.
    proxy = start_proxy(listener_header_timeout=30.0)
    fake.reset()
    client = H2Client(proxy.base)
    try:
        client.pump(lambda: client.conn.remote_settings.max_concurrent_streams == 100)
        # Past the advertised limit the connection is refused (a protocol error).
        client.conn.remote_settings.max_concurrent_streams = 1000
        client.conn.remote_settings.acknowledge()
        for _ in range(101):
            client.request(
                "POST", "/bedrock/model/test.slow/converse-stream", headers=BEARER, end=False
            )
        _goaway_code(client)
    finally:
        client.close()
    client = H2Client(proxy.base)
    try:
        client.request("GET", "/health/liveness", headers=[("x-big", "v" * 70_000)])
        _goaway_code(client)
    finally:
        client.close()


def test_connections_that_send_no_request_are_closed(proxy):
    """The header deadline (2 s here) covers a silent socket and a bare HTTP/2 preface."""
    silent = socket.create_connection(("127.0.0.1", urlsplit(proxy.base).port))
    preface_only = H2Client(proxy.base)
    try:
        started = time.monotonic()
        silent.settimeout(6)
        assert silent.recv(1) == b""
        preface_only.pump(lambda: False, timeout=6)
        assert preface_only.closed and time.monotonic() - started < 6
    finally:
        silent.close()
        preface_only.close()


def test_sigterm_drains_http2_streams(fake_server, tmp_path):
    fake, fake_url = fake_server
    fake.reset()
    fake.frame_delay = 0.15  # a stream of ~1.5 s
    port = free_port()
    with running([BIN, "serve"], _proxy_env(fake_url, port, tmp_path), port) as proc:
        client = H2Client(f"http://127.0.0.1:{port}", timeout=15)
        stream_id = client.request(
            "POST", "/bedrock/model/test.slow/converse-stream", headers=BEARER, body=BODY
        )
        client.pump(lambda: bool(client.answers[stream_id].body))
        proc.send_signal(signal.SIGTERM)
        client.pump(lambda: client.done(stream_id))
        assert client.answers[stream_id].ended and b"metadata" in client.answers[stream_id].body
        assert client.goaway is not None and int(client.goaway.error_code) == 0
        assert proc.wait(15) == 0
        client.close()


def test_http1_clients_are_unchanged_by_the_sniffer(proxy):
    """Pipelined HTTP/1.1 in the first packet, and a request split before its 3rd byte."""
    port = urlsplit(proxy.base).port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /health/liveness HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        seen = b""
        while seen.count(b"HTTP/1.1 200") < 2:
            seen += sock.recv(65536)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PR")
        time.sleep(0.1)
        sock.sendall(b"OPFIND / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 ")


# ---------------------------------------------------------------------------- bidirectional


@pytest.mark.parametrize("listener", ["h2c", "tls"])
def test_js_sdk_bidirectional_stream_full_duplex(request, listener, cert_pair, fake, monkeypatch):
    """Each event goes only after the previous answer arrived: only a true full-duplex
    path passes. The client's chain is verified, the server's chain re-signed (the fake
    checks every frame), the inner frames arrive unchanged, and the usage is metered."""
    fake.reset()
    server = request.getfixturevalue("proxy" if listener == "h2c" else "https_proxy")
    monkeypatch.setenv("SSL_CERT_FILE", cert_pair[0])
    key = new_key(server, models=["amazon.nova-sonic-v1:0"], rpm_limit=100)
    result = js_clients(
        {"endpoint": server.base, "model": "amazon.nova-sonic-v1:0", "calls": ["bidi"], "turns": 3},
        {
            "AWS_ACCESS_KEY_ID": key["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": key["secret_access_key"],
        },
        cert_pair[0],
    )["bidi"]
    assert result["ok"], result
    texts = [
        a["event"]["textOutput"]["content"] for a in result["answers"] if "textOutput" in a["event"]
    ]
    assert texts == [f"amazon.nova-sonic-v1:0: event {i}" for i in range(3)]
    assert [e["event"]["turn"] for e in fake.bidi_events] == [0, 1, 2]
    assert fake.bidi_completed == 1 and fake.bidi_bad_signatures == 0
    line = server.wait_log_line(
        lambda r: r.get("operation") == "InvokeModelWithBidirectionalStream" and "tokens" in r
    )
    assert line["tokens"] == 45 and line["status"] == 200


def _bidi_session(
    base: str, access_key: str, secret_key: str, model: str = "amazon.nova-sonic-v1:0"
):
    """A hand-made bidirectional session (what the SDK does, step by step): the request
    signed for a streaming body, and the chain its frames are signed on."""
    path = f"/model/{model.replace(':', '%3A')}/invoke-with-bidirectional-stream"
    url = base + path
    aws_request = AWSRequest(
        method="POST", url=url, headers={"x-amz-content-sha256": STREAMING_EVENTS}
    )
    SigV4Auth(Credentials(access_key, secret_key), "bedrock", REGION).add_auth(aws_request)
    headers = [(k.lower(), v) for k, v in aws_request.headers.items()]
    seed = aws_request.headers["Authorization"].rpartition("Signature=")[2]
    day = aws_request.headers["X-Amz-Date"][:8]
    chain = SignatureChain.for_credentials(secret_key, day, REGION, "bedrock", seed)
    return urlsplit(url).path, headers, chain


def _event(turn: int) -> bytes:
    data = base64.b64encode(json.dumps({"event": {"turn": turn, "text": f"e{turn}"}}).encode())
    return encode_frame(
        {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"},
        json.dumps({"bytes": data.decode()}).encode(),
    )


def test_a_tampered_client_frame_never_reaches_the_upstream(proxy, fake):
    fake.reset()
    client, stream_id, chain = _open_bidi(proxy)
    try:
        client.pump(lambda: client.answers[stream_id].body.count(b"\x00\x05chunk") >= 2)
        frame = bytearray(chain.sign(_event(1)))
        frame[-10] ^= 0x01  # one bit of the payload
        import zlib

        frame[-4:] = zlib.crc32(frame[:-4]).to_bytes(4, "big")  # a valid frame, a bad signature
        client.conn.send_data(stream_id, bytes(frame))
        client.flush()
        client.pump(lambda: client.done(stream_id))
        answer = client.answers[stream_id]
        frames = list(iter_frames(bytes(answer.body)))
        assert frames[-1].headers[":message-type"] == "exception"
        assert frames[-1].headers[":exception-type"] == "InvalidSignatureException"
    finally:
        client.close()
    assert [e["event"]["turn"] for e in fake.bidi_events] == [0]
    _wait(lambda: fake.bidi_disconnects == 1)  # the upstream stream was reset, not ended
    assert fake.bidi_completed == 0 and fake.bidi_bad_signatures == 0


def test_frames_not_re_signed_fail_upstream(fake_server):
    """The fake checks every chunk signature as AWS does: frames on any chain but the
    request's own are refused (so forwarding the client's frames as they are would fail)."""
    fake, url = fake_server
    fake.reset()
    path, headers, _ = _bidi_session(url, UPSTREAM_ACCESS_KEY, UPSTREAM_SECRET_KEY)
    headers.append(("x-amz-security-token", fake.expected_token))
    _, _, other_chain = _bidi_session(url, "BPKSOMEVIRTUALKEY000", "not-the-upstream-secret")
    # (the token is added unsigned; re-sign with it in the signed set)
    aws_request = AWSRequest(
        method="POST",
        url=url + path,
        headers={"x-amz-content-sha256": STREAMING_EVENTS},
    )
    SigV4Auth(
        Credentials(UPSTREAM_ACCESS_KEY, UPSTREAM_SECRET_KEY, fake.expected_token),
        "bedrock",
        REGION,
    ).add_auth(aws_request)
    headers = [(k.lower(), v) for k, v in aws_request.headers.items()]
    client = H2Client(url)
    try:
        stream_id = client.request("POST", path, headers=headers, end=False)
        client.conn.send_data(stream_id, other_chain.sign(_event(0)))
        client.flush()
        client.pump(lambda: client.done(stream_id))
        frames = list(iter_frames(bytes(client.answers[stream_id].body)))
        assert frames[-1].headers[":message-type"] == "exception"
    finally:
        client.close()
    assert fake.bidi_bad_signatures == 1 and not fake.bidi_events


def test_a_client_reset_resets_the_upstream_stream(proxy, fake):
    fake.reset()
    client, stream_id, _ = _open_bidi(proxy)
    try:
        client.pump(lambda: client.answers[stream_id].body.count(b"\x00\x05chunk") >= 2)
        assert fake.active_streams >= 1
        client.conn.reset_stream(stream_id)
        client.flush()
        _wait(lambda: fake.bidi_disconnects == 1)
    finally:
        client.close()
    line = proxy.wait_log_line(
        lambda r: (
            r.get("operation") == "InvokeModelWithBidirectionalStream"
            and r.get("error") == "ClientDisconnected"
        )
    )
    assert line["tokens"] == 15  # what the usage events reported before the reset


def test_bidirectional_refusals(proxy, fake):
    fake.reset()
    key = new_key(proxy, models=["amazon.nova-lite-v1:0"])
    path, headers, _ = _bidi_session(proxy.base, key["access_key_id"], key["secret_access_key"])
    client = H2Client(proxy.base)
    try:
        refused = client.fetch("POST", path, headers=headers, body=b"")
        assert refused.status == 403 and "AccessDenied" in refused.headers["x-amzn-errortype"]
    finally:
        client.close()
    out = curl(
        "--http1.1",
        "-H",
        f"Authorization: Bearer {MASTER_KEY}",
        "--data",
        "x",
        proxy.base.rsplit("/bedrock", 1)[0] + path,
        "-w",
        "\n%{http_code}",
    )
    assert out.stdout.endswith("\n400") and "HTTP/2" in out.stdout
    assert not fake.requests


def _wait(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_js_sdk_bidirectional_stream_with_a_bearer_key(proxy, fake):
    """With a Bedrock API key the SDK still signs its event frames, with whatever AWS
    credentials it finds (it fails before sending without any). The proxy authenticates
    the stream by the key, takes the frames' payloads and signs them on its own chain."""
    fake.reset()
    env = {"AWS_BEARER_TOKEN_BEDROCK": MASTER_KEY}
    spec = {
        "endpoint": proxy.base,
        "model": "amazon.nova-sonic-v1:0",
        "calls": ["bidi"],
        "turns": 2,
    }
    without = js_clients(spec, env)["bidi"]
    assert not without["ok"] and "credentials" in without["message"]
    assert not fake.bidi_events  # nothing was sent
    dummy = {"AWS_ACCESS_KEY_ID": "any", "AWS_SECRET_ACCESS_KEY": "any"}
    result = js_clients(spec, {**env, **dummy})["bidi"]
    assert result["ok"], result
    assert len(fake.bidi_events) == 2 and fake.bidi_completed == 1
    assert fake.requests[-1].headers["Authorization"].startswith("AWS4-HMAC-SHA256")


def test_the_upstream_stream_is_tls_verified_and_must_negotiate_h2(
    bg, start_proxy, cert_pair, monkeypatch
):
    from aiohttp import web

    fake = FakeBedrock()
    url, runner = bg.run(start_server(fake.app(), server_context(*cert_pair)))
    # The same fake behind TLS that offers only http/1.1 by ALPN.
    http1_only = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    http1_only.load_cert_chain(*cert_pair)
    http1_only.set_alpn_protocols(["http/1.1"])
    plain_runner = web.AppRunner(fake.app())
    bg.run(plain_runner.setup())
    site = web.TCPSite(plain_runner, "127.0.0.1", 0, ssl_context=http1_only)
    bg.run(site.start())
    http1_url = f"https://127.0.0.1:{plain_runner.addresses[0][1]}"
    try:
        spec = {"model": "amazon.nova-sonic-v1:0", "calls": ["bidi"], "turns": 1}
        env = {
            "AWS_BEARER_TOKEN_BEDROCK": MASTER_KEY,
            "AWS_ACCESS_KEY_ID": "a",
            "AWS_SECRET_ACCESS_KEY": "b",
        }
        monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
        proxy = start_proxy(endpoints={"bedrock-runtime": url})
        untrusted = js_clients({**spec, "endpoint": proxy.base}, env)["bidi"]
        assert (untrusted["ok"], untrusted["status"]) == (False, 503), untrusted
        assert not fake.requests
        monkeypatch.setenv("AWS_CA_BUNDLE", cert_pair[0])
        trusted = js_clients({**spec, "endpoint": proxy.base}, env)["bidi"]
        assert trusted["ok"] and fake.bidi_completed == 1, trusted
        proxy = start_proxy(endpoints={"bedrock-runtime": http1_url})
        refused = js_clients({**spec, "endpoint": proxy.base}, env)["bidi"]
        assert (refused["ok"], refused["status"]) == (False, 503), refused
        assert "HTTP/2" in refused["message"]
    finally:
        bg.run(runner.cleanup())
        bg.run(plain_runner.cleanup())


def test_the_literal_encoder_is_read_by_hpack_as_written():
    from hpack import Decoder

    from proxy.wire.http2 import LiteralEncoder, ProtocolError

    fields = [
        (b":status", b"200"),
        (b":status", b"429"),
        (b"content-type", b"application/vnd.amazon.eventstream"),
        (b"x-amzn-requestid", b"r" * 40),
        (b"x-long", b"v" * 70_000),
        (b"x-empty", b""),
    ]
    encoder, decoder = LiteralEncoder(), Decoder()
    decoder.max_header_list_size = 1 << 20
    for _ in range(2):  # the table-size update only leads the first block
        assert decoder.decode(encoder.encode(fields), raw=True) == fields
    assert decoder.header_table_size == 0
    with pytest.raises(ProtocolError):
        encoder.encode([(b"x-a", b"1\r\nx-b: 2")])


SDK_PYTHON = os.path.join(os.path.dirname(__file__), "py312", ".venv", "bin", "python")


@pytest.mark.skipif(
    not os.path.exists(SDK_PYTHON),
    reason="no Python >= 3.12 venv with aws-sdk-bedrock-runtime (make test builds one "
    "where Python 3.12 or newer is installed)",
)
def test_python_sdk_crt_bidirectional_stream_over_tls(https_proxy, cert_pair, fake, monkeypatch):
    """aws-sdk-bedrock-runtime on its CRT transport: h2 by ALPN, events signed by awscrt's
    own SigV4 implementation, each sent after the previous answer."""
    fake.reset()
    monkeypatch.setenv("SSL_CERT_FILE", cert_pair[0])
    key = new_key(https_proxy, models=["amazon.nova-sonic-v1:0"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=key["access_key_id"], AWS_SECRET_ACCESS_KEY=key["secret_access_key"]
    )
    out = subprocess.run(
        [
            SDK_PYTHON,
            os.path.join(os.path.dirname(__file__), "py312", "bidi_client.py"),
            https_proxy.base,
            "amazon.nova-sonic-v1:0",
            cert_pair[0],
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    result = json.loads(out.stdout or "{}")
    assert result.get("ok"), (result, out.stderr[-2000:])
    texts = [
        a["event"]["textOutput"]["content"] for a in result["answers"] if "textOutput" in a["event"]
    ]
    assert texts == [f"amazon.nova-sonic-v1:0: py {i}" for i in range(3)]
    assert fake.bidi_completed == 1 and fake.bidi_bad_signatures == 0


def _open_bidi(server, model: str = "amazon.nova-sonic-v1:0", key: dict | None = None):
    key = key or new_key(server, models=[model])
    path, headers, chain = _bidi_session(
        server.base, key["access_key_id"], key["secret_access_key"], model
    )
    client = H2Client(server.base, timeout=10)
    stream_id = client.request("POST", path, headers=headers, end=False)
    client.conn.send_data(stream_id, chain.sign(_event(0)))
    client.flush()
    return client, stream_id, chain


def _last_frame(client: H2Client, stream_id: int):
    client.pump(lambda: client.done(stream_id))
    return list(iter_frames(bytes(client.answers[stream_id].body)))[-1]


def test_a_silent_client_is_ended_by_the_idle_timeout(start_proxy, fake):
    fake.reset()
    server = start_proxy(idle_timeout=1.0)
    client, stream_id, _ = _open_bidi(server)
    try:
        started = time.monotonic()
        last = _last_frame(client, stream_id)
        assert last.headers[":message-type"] == "exception"
        assert b"No event arrived" in last.payload and time.monotonic() - started < 5
    finally:
        client.close()
    _wait(lambda: fake.bidi_disconnects == 1)  # the upstream stream was reset


def test_an_upstream_gone_mid_session_ends_the_client_stream_cleanly(proxy, fake):
    fake.reset()
    client, stream_id, _ = _open_bidi(proxy, "test.cut")
    try:
        last = _last_frame(client, stream_id)
        assert last.headers[":message-type"] == "exception"
        assert last.headers[":exception-type"] == "internalServerException"
        assert client.answers[stream_id].ended  # an exception frame, then a clean end
    finally:
        client.close()
    line = proxy.wait_log_line(
        lambda r: r.get("model") == "test.cut" and r.get("error") == "UpstreamStreamError"
    )
    assert line["tokens"] == 15  # the usage reported before the cut is charged


def test_shutdown_ends_a_session_with_an_exception_frame(fake_server, tmp_path):
    fake, fake_url = fake_server
    fake.reset()
    port = free_port()
    env = _proxy_env(fake_url, port, tmp_path, BEDROCK_PROXY_SHUTDOWN_TIMEOUT="1")
    with running([BIN, "serve"], env, port) as proc:
        origin = f"http://127.0.0.1:{port}"
        server = type("S", (), {"base": origin + "/bedrock", "url": origin})()
        client, stream_id, _ = _open_bidi(server)
        try:
            client.pump(lambda: client.answers[stream_id].body.count(b"\x00\x05chunk") >= 2)
            proc.send_signal(signal.SIGTERM)
            last = _last_frame(client, stream_id)
            assert last.headers[":message-type"] == "exception"
            assert b"shutting down" in last.payload
            assert proc.wait(15) == 0
        finally:
            client.close()


def test_a_cut_response_resets_its_stream_and_only_that_one(proxy, fake):
    """A body without frames to carry an error is cut (HTTP/1.1 closes the connection);
    on HTTP/2 only its stream is reset, and the connection's other streams go on."""
    fake.reset()
    fake.frame_delay = 0.1
    client = H2Client(proxy.base, timeout=10)
    try:
        kept = client.request(
            "POST", "/bedrock/model/test.slow/converse-stream", headers=BEARER, body=BODY
        )
        cut = client.request(
            "POST", "/bedrock/model/test.cut-body/invoke", headers=BEARER, body=b"{}"
        )
        client.pump(lambda: client.done(cut) and client.done(kept))
        assert client.answers[cut].status == 200 and client.answers[cut].reset is not None
        assert 0 < len(client.answers[cut].body) < 3 * 1024 * 1024
        assert client.answers[kept].ended and b"metadata" in client.answers[kept].body
    finally:
        client.close()


def test_idle_connections_close_after_the_keepalive_timeout_busy_ones_do_not(bg):
    """One lazy timer per connection: a stream longer than the timeout keeps the
    connection; the timeout counts from the end of the last stream."""
    from aiohttp import web

    from proxy.server.listen.runner import ProxyRunner

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "0")))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", slow)
    runner = ProxyRunner(app, header_timeout=5, keepalive_timeout=0.5)

    async def start() -> str:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    base = bg.run(start())
    try:
        client = H2Client(base)
        started = time.monotonic()
        assert client.fetch("GET", "/?s=1.2").status == 200  # outlives the timeout
        assert client.fetch("GET", "/").status == 200  # the connection is still there
        ended = time.monotonic()
        client.pump(lambda: client.goaway is not None, timeout=3)
        idle_for = time.monotonic() - ended
        assert int(client.goaway.error_code) == 0 and 0.3 < idle_for < 1.5
        assert ended - started > 1.2
        client.close()
    finally:
        bg.run(runner.cleanup())


def test_a_budget_binds_in_the_middle_of_a_session(proxy, fake):
    """A session lasts minutes: once its usage events say it costs more than what is left
    of the key's budget, it is cut with an exception frame, and the upstream reset."""
    fake.reset()
    # Nova Sonic's totals in the fake cost $1.8e-6 a turn: the budget holds one turn.
    key = new_key(proxy, models=["amazon.nova-sonic-v1:0"], max_budget=0.000003)
    result = js_clients(
        {"endpoint": proxy.base, "model": "amazon.nova-sonic-v1:0", "calls": ["bidi"], "turns": 5},
        {
            "AWS_ACCESS_KEY_ID": key["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": key["secret_access_key"],
        },
    )["bidi"]
    assert not result["ok"] and "Budget exceeded" in result["message"], result
    assert len(fake.bidi_events) <= 3 and fake.bidi_completed == 0
    _wait(lambda: fake.bidi_disconnects == 1)
    line = proxy.wait_log_line(
        lambda r: (
            r.get("operation") == "InvokeModelWithBidirectionalStream"
            and r.get("error") == "ServiceQuotaExceededException"
        )
    )
    assert line["tokens"] == 30  # what the session used is still charged


def test_parallel_sessions_on_one_budget_spend_it_once(start_proxy, fake):
    """Each session's cost is reserved against the budget as its usage events come, so
    three sessions at once cannot each spend what is left: the budget is overspent by at
    most one usage event per open session (before, three sessions spent 2.3x a budget
    that stopped one session at 1.0x)."""
    fake.reset()
    proxy = start_proxy(reserve_output_tokens=1, ledger_flush_interval=0.1)
    turn = 0.0000018  # Nova Sonic's totals in the fake: $1.8e-6 a turn
    budget = 10 * turn  # each session alone would go ten turns: three, thirty
    key = new_key(proxy, models=["amazon.nova-sonic-v1:0"], max_budget=budget)
    outcome = js_clients(
        {
            "endpoint": proxy.base,
            "model": "amazon.nova-sonic-v1:0",
            "calls": ["bidiParallel"],
            "sessions": 3,
            "turns": 12,
        },
        {
            "AWS_ACCESS_KEY_ID": key["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": key["secret_access_key"],
        },
    )["bidiParallel"]
    sessions = outcome["sessions"]
    assert len(sessions) == 3 and not any(s["ok"] for s in sessions), sessions
    proxy.settle()
    _, info = admin(proxy, "GET", f"/key/info?key={key['key_id']}")
    spent = info["info"]["spend"]
    assert spent <= budget + 3 * turn + 1e-12, spent


def test_a_revoked_key_ends_its_open_session_and_streams(start_proxy, fake):
    fake.reset()
    proxy = start_proxy(key_cache_ttl=0.5)
    key = new_key(proxy)
    client, stream_id, chain = _open_bidi(proxy, key=key)
    try:
        client.pump(lambda: client.answers[stream_id].body.count(b"chunk") >= 1)
        blocked = admin(proxy, "POST", "/key/update", {"key": key["key_id"], "blocked": True})
        assert blocked[0] == 200
        client.conn.send_data(stream_id, chain.sign(_event(1)))  # the session goes on...
        client.flush()
        last = _last_frame(client, stream_id)  # ...and is ended at its next frame
        assert last.headers[":message-type"] == "exception"
        assert last.headers[":exception-type"] == "AccessDeniedException"
        assert b"blocked while the request was running" in last.payload
    finally:
        client.close()
    _wait(lambda: fake.bidi_disconnects == 1)  # the upstream stream was reset too

    # An ordinary event stream of a key deleted mid-stream ends at its next frame.
    fake.slow_models.add(HAIKU)
    fake.frame_delay = 0.3
    other = new_key(proxy)
    runtime = boto_client("bedrock-runtime", proxy, key=other["key"])
    stream = runtime.converse_stream(modelId=HAIKU, messages=MESSAGES)["stream"]
    events = iter(stream)
    next(events)
    assert admin(proxy, "POST", "/key/delete", {"keys": [other["key_id"]]})[0] == 200
    with pytest.raises(EventStreamError) as caught:
        for _ in events:
            pass
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException"
    assert "deleted while the request was running" in caught.value.response["Error"]["Message"]


def test_a_session_ends_at_the_longest_session(start_proxy, fake):
    fake.reset()
    proxy = start_proxy(max_session_seconds=60)
    client, stream_id, chain = _open_bidi(proxy)
    try:
        client.pump(lambda: client.answers[stream_id].body.count(b"chunk") >= 1)
        proxy.clock.advance(61)  # past the session's life, on the clock the proxy reads
        client.conn.send_data(stream_id, chain.sign(_event(1)))
        client.flush()
        last = _last_frame(client, stream_id)
        assert last.headers[":exception-type"] == "ModelTimeoutException"
    finally:
        client.close()


def test_a_body_sent_a_byte_a_frame_is_cut_before_its_key_is_known(proxy):
    """The sign-in form is read before any key is known: 4,096 one-byte DATA frames cost
    h2 ~60 ms; counted (a tenth of a control frame each), they end in a GOAWAY first."""
    client = H2Client(proxy.url)
    try:
        form = [("content-type", "application/x-www-form-urlencoded"), ("origin", proxy.url)]
        stream_id = client.request("POST", "/ui/signin", headers=form, end=False)
        data = bytearray()
        for _ in range(4096):
            client.conn.send_data(stream_id, b"k")
            data += client.conn.data_to_send()
        _flood(client, bytes(data))
        assert _goaway_code(client, timeout=10) == ENHANCE_YOUR_CALM
    finally:
        client.close()
