"""Event streams: frame-by-frame delivery, failures mid-stream, clients that leave."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from botocore.exceptions import EventStreamError

from proxy.wire.eventstream import iter_frames
from tests.conftest import MASTER_KEY, boto_client

MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]


def test_frames_are_flushed_as_they_arrive(proxy, fake):
    fake.frame_delay = 0.2
    fake.frames_sent_at.clear()
    client = boto_client("bedrock-runtime", proxy)
    reply = client.converse_stream(modelId="test.slow", messages=MESSAGES)
    arrivals = []
    for event in reply["stream"]:
        arrivals.append(time.monotonic())
        if "metadata" in event:
            break
    sent = fake.frames_sent_at[-len(arrivals) :]
    delays = [a - s for a, s in zip(arrivals, sent, strict=True)]
    # Frames are 200 ms apart: a frame held back until the next one arrives would be late by
    # 200 ms or more. The bound leaves room for this VM's CPU-steal bursts, no more.
    assert max(delays) < 0.15, delays


def test_a_kept_alive_connection_outlives_its_stream_and_then_its_idle_timeout(start_proxy, fake):
    """While a stream is relayed the connection's keep-alive timer is let go (an open
    stream need not hold one); the stream outlives the timeout on the same connection,
    the next request is served on it, and the timer runs again once it is idle."""
    import http.client
    import json
    from urllib.parse import urlsplit

    server = start_proxy(keepalive_timeout=0.6)
    fake.frame_delay = 0.2
    address = urlsplit(server.base)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    headers = {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}
    body = json.dumps({"messages": MESSAGES})
    started = time.monotonic()
    connection.request("POST", "/bedrock/model/test.slow/converse-stream", body, headers)
    stream = connection.getresponse()
    frames = list(iter_frames(stream.read()))
    assert stream.status == 200 and frames[-1].headers[":event-type"] == "metadata"
    assert time.monotonic() - started > 1.2  # twice the keep-alive timeout
    local = connection.sock.getsockname()
    connection.request("POST", "/bedrock/model/test.model/converse", body, headers)
    reply = connection.getresponse()
    assert reply.status == 200 and b"output" in reply.read()
    assert connection.sock.getsockname() == local  # the same connection
    idle_from = time.monotonic()
    assert connection.sock.recv(1) == b""  # closed by the proxy, idle
    assert 0.4 < time.monotonic() - idle_from < 3
    connection.close()


def test_upstream_cut_mid_stream_ends_with_exception_frame(proxy, fake):
    client = boto_client("bedrock-runtime", proxy)
    reply = client.converse_stream(modelId="test.cut", messages=MESSAGES)
    received = []
    with pytest.raises(EventStreamError) as info:
        for event in reply["stream"]:
            received.append(event)
    assert info.value.response["Error"]["Code"] == "internalServerException"
    # Whole frames before the cut arrive; the half frame does not.
    assert len(received) == 2
    record = proxy.wait_log_line(lambda r: r.get("model") == "test.cut")
    assert record["incomplete"] is True and record["error"] == "UpstreamStreamError"


def test_idle_upstream_stream_times_out_with_exception_frame(start_proxy, fake):
    impatient = start_proxy(idle_timeout=0.5)
    client = boto_client("bedrock-runtime", impatient)
    started = time.monotonic()
    reply = client.converse_stream(modelId="test.stall-stream", messages=MESSAGES)
    with pytest.raises(EventStreamError) as info:
        list(reply["stream"])
    assert info.value.response["Error"]["Code"] == "internalServerException"
    assert "idle" in info.value.response["Error"]["Message"]
    assert time.monotonic() - started < 3


async def _task_count() -> int:
    return len(asyncio.all_tasks()) - 1


async def test_client_disconnect_cancels_upstream(bg, proxy, fake):
    fake.frame_delay = 0.2
    deadline = time.monotonic() + 2
    while fake.active_streams and time.monotonic() < deadline:  # earlier tests' streams
        await asyncio.sleep(0.02)
    disconnects = fake.stream_disconnects
    tasks_before = bg.run(_task_count())
    url = proxy.base + "/model/test.slow/converse-stream"
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            url, data=b'{"messages": []}', headers={"Authorization": f"Bearer {MASTER_KEY}"}
        )
        assert response.status == 200
        first = await response.content.readany()
        assert list(iter_frames(first))  # a whole frame arrived
        response.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 2
    while fake.active_streams and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert fake.active_streams == 0
    assert fake.stream_disconnects == disconnects + 1
    # Neither the proxy's handler nor anything it started outlives the stream.
    while bg.run(_task_count()) > tasks_before and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert bg.run(_task_count()) <= tasks_before
