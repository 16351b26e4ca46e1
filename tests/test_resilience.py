"""Resilience: upstream storms, slow and vanishing clients, a bounded soak, and fuzzing.
Everything listens on 127.0.0.1 and every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import socket
import time
import urllib.request

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MASTER_KEY
from tests.helpers.processes import BIN, free_port, running, server_env

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
BODY = {"messages": [{"role": "user", "content": [{"text": "Hello"}]}]}


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _metric(port: int, name: str) -> float:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=AUTH)
    with urllib.request.urlopen(request, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


@pytest.fixture(scope="module")
def proxy_process(fake_server, tmp_path_factory):
    _, fake_url = fake_server
    port = free_port()
    env = server_env(
        fake_url,
        BEDROCK_PROXY_HOST="127.0.0.1",
        BEDROCK_PROXY_PORT=str(port),
        BEDROCK_PROXY_SQLITE_PATH=str(tmp_path_factory.mktemp("resilience") / "r.db"),
        BEDROCK_PROXY_HEADER_TIMEOUT="2",
        BEDROCK_PROXY_BODY_TIMEOUT="1",
        BEDROCK_PROXY_ACCESS_LOG="false",
    )
    with running([BIN, "serve"], env, port) as proc:
        yield port, proc


# ---------------------------------------------------------------- upstream storms


async def _many(port: int, model: str, count: int) -> list[tuple[int, str]]:
    async with aiohttp.ClientSession() as session:

        async def one() -> tuple[int, str]:
            async with session.post(
                f"http://127.0.0.1:{port}/bedrock/model/{model}/converse", json=BODY, headers=AUTH
            ) as r:
                await r.read()
                return r.status, r.headers.get("x-amzn-ErrorType", "")

        return await asyncio.gather(*(one() for _ in range(count)))


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("test.error500", 500, "InternalServerException"),
        ("test.throttle", 429, "ThrottlingException"),
        ("test.reset", 503, "ServiceUnavailableException"),
    ],
)
def test_upstream_storms_pass_through_and_the_proxy_recovers(
    proxy_process, fake, model, status, code
):
    port, _ = proxy_process
    results = asyncio.run(_many(port, model, 200))
    assert {(s, c.split(":")[0]) for s, c in results} == {(status, code)}
    assert asyncio.run(_many(port, "m", 5)) == [(200, "")] * 5


# ---------------------------------------------------------------- slow and vanishing clients


def test_slowloris_headers_are_cut(proxy_process):
    port, _ = proxy_process
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    started = time.monotonic()
    sock.sendall(b"POST /bedrock/model/m/converse HTTP/1.1\r\nHost: x\r\n")
    closed = False
    while time.monotonic() - started < 6:
        try:
            sock.sendall(b"X-Slow: a\r\n")
            if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                closed = True
                break
        except BlockingIOError:
            pass
        except OSError:
            closed = True
            break
        time.sleep(0.2)
    sock.close()
    assert closed and time.monotonic() - started < 5


def test_slow_body_gets_request_timeout(proxy_process):
    port, _ = proxy_process
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("POST", "/bedrock/model/m/converse")
    conn.putheader("Authorization", f"Bearer {MASTER_KEY}")
    conn.putheader("Content-Length", "100")
    conn.endheaders(b'{"messages":')  # 12 of the promised 100 bytes, then silence
    started = time.monotonic()
    response = conn.getresponse()
    assert response.status == 408
    assert response.getheader("x-amzn-ErrorType") == "RequestTimeoutException"
    assert time.monotonic() - started < 4
    conn.close()


@pytest.mark.slow
def test_ten_thousand_aborted_streams_leak_nothing(proxy_process, fake):
    port, proc = proxy_process
    fake.frame_delay = 0.05

    # A raw client: one request per connection, one read, then a hang-up. (aiohttp's
    # client cost most of this test's time, in the process that also runs the fake.)
    body = json.dumps(BODY).encode()
    request = (
        f"POST /bedrock/model/test.slow/converse-stream HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {MASTER_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def abort_many(total: int, concurrency: int) -> int:
        done = 0

        async def worker(count: int) -> None:
            nonlocal done
            for _ in range(count):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head[:200]
                assert await reader.read(1)  # the first frame is under way, then leave
                writer.transport.abort()
                done += 1

        await asyncio.wait_for(
            asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency))), 240
        )
        return done

    asyncio.run(abort_many(500, 50))  # warm up: pools, caches, allocator
    time.sleep(1)
    fds, rss = _fds(proc.pid), _rss_mib(proc.pid)
    assert asyncio.run(abort_many(10_000, 100)) == 10_000
    deadline = time.monotonic() + 15
    while (
        fake.active_streams or _metric(port, "bedrock_proxy_requests_in_flight")
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fake.active_streams == 0
    assert _metric(port, "bedrock_proxy_requests_in_flight") == 0
    assert _metric(port, "bedrock_proxy_active_streams") == 0
    assert _fds(proc.pid) <= fds + 5, (fds, _fds(proc.pid))
    assert _rss_mib(proc.pid) - rss < 25, (rss, _rss_mib(proc.pid))


@pytest.mark.slow
def test_soak_mixed_load_is_stable(proxy_process, fake):
    """Two phases of the same mixed load: the second must not grow fds or memory. Bounded
    by count (what a leak grows with), not by time; each phase also has a deadline."""
    port, proc = proxy_process
    fake.frame_delay = 0.01
    base = f"http://127.0.0.1:{port}/bedrock/model"

    async def phase(per_worker: int) -> int:
        count = 0
        async with aiohttp.ClientSession() as session:

            async def worker(kind: int) -> None:
                nonlocal count
                for _ in range(per_worker):
                    if kind == 0:
                        async with session.post(f"{base}/m/converse", json=BODY, headers=AUTH) as r:
                            await r.read()
                    elif kind == 1:
                        async with session.post(
                            f"{base}/test.slow/converse-stream", json=BODY, headers=AUTH
                        ) as r:
                            await r.read()
                    elif kind == 2:
                        async with session.post(
                            f"{base}/test.throttle/converse", json=BODY, headers=AUTH
                        ) as r:
                            await r.read()
                    else:
                        r = await session.post(
                            f"{base}/test.slow/converse-stream", json=BODY, headers=AUTH
                        )
                        await r.content.readany()
                        r.close()
                    count += 1

            await asyncio.wait_for(asyncio.gather(*(worker(i % 4) for i in range(16))), 120)
        return count

    first = asyncio.run(phase(40))
    fds, rss = _fds(proc.pid), _rss_mib(proc.pid)
    second = asyncio.run(phase(40))
    time.sleep(1)
    assert first == second == 640
    assert _fds(proc.pid) <= fds + 5
    assert _rss_mib(proc.pid) - rss < 15, (rss, _rss_mib(proc.pid))


# ---------------------------------------------------------------- fuzzing


methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW"])
path_chars = st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="#?")
paths = st.one_of(
    st.lists(st.text(path_chars, max_size=12), max_size=6).map(
        lambda parts: "/bedrock/" + "/".join(parts)
    ),
    st.sampled_from(
        [
            "/bedrock//evil.example.com/model/x/converse",
            "/bedrock/@evil.example.com/x",
            "/bedrock/model/%2F%2Fevil.example.com/converse",
            "/bedrock/model/x/../../../converse",
            "/bedrock/model/http:%2F%2Fevil.example.com%2Fx/converse",
            "/bedrock/model/%00/converse",
            "/bedrock/model/" + "a" * 3000 + "/converse",
        ]
    ),
)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=methods,
    path=paths,
    query=st.text(path_chars, max_size=20),
    headers=st.dictionaries(
        st.sampled_from(
            [
                "Content-Type",
                "Accept",
                "X-Amzn-Bedrock-Trace",
                "X-Amz-Date",
                "Host",
                "X-Forwarded-Host",
                "x-api-key",
                "Expect",
                "Authorization",
                "X-Amz-Target",
            ]
        ),
        header_values,
        max_size=4,
    ),
    body=st.binary(max_size=300),
    authorized=st.booleans(),
)
def test_fuzzed_requests_never_crash_leak_or_escape(
    proxy, fake_server, method, path, query, headers, body, authorized
):
    fake, fake_url = fake_server
    before = len(fake.requests)
    if authorized:
        headers = {**headers, "Authorization": f"Bearer {MASTER_KEY}"}
    conn = http.client.HTTPConnection(proxy.url.removeprefix("http://"), timeout=10)
    try:
        conn.request(method, path + ("?" + query if query else ""), body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    assert (
        response.status != 500
        or response.getheader("x-amzn-ErrorType")
        == "InternalServerException:http://internal.amazon.com/coral/com.amazon.bedrock/"
    )
    assert b"Traceback" not in data
    if method != "HEAD" and response.status >= 400 and response.getheader("x-amzn-ErrorType"):
        assert set(json.loads(data)) == {"message"}
    # Nothing left the machine for anywhere but the configured upstream.
    assert response.status != 503
    for received in fake.requests[before:]:
        assert received.headers["Host"] == fake_url.removeprefix("http://")


def test_garbage_on_the_wire_is_refused_aws_shaped_without_a_traceback(proxy):
    host, port = proxy.url.removeprefix("http://").split(":")
    for garbage in (
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /bedrock HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
        b"POST /bedrock/x HTTP/1.1\r\nx-big: " + b"b" * 70000 + b"\r\n\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(garbage)
            reply = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400", reply[:200]
        assert b"x-amzn-ErrorType: ValidationException" in head, head
        assert b"Traceback" not in reply
        assert json.loads(body)["message"].startswith("The request is not valid HTTP")
    # And the proxy still serves.
    request = urllib.request.Request(proxy.url + "/health/liveness")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def test_truncated_body_is_a_client_error(proxy_process):
    port, _ = proxy_process
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /bedrock/model/m/converse HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {MASTER_KEY}\r\n".encode()
            + b'Content-Length: 100\r\n\r\n{"messages":'
        )
        sock.shutdown(socket.SHUT_WR)  # the client gives up half-way
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                reply += chunk
    # Either an AWS-shaped 400 or a closed connection; never a 500.
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply[:200]
    if reply:
        assert b"x-amzn-ErrorType: ValidationException" in reply
