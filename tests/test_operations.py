"""Operating the proxy: graceful shutdown, metrics, several workers on one port."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from botocore.exceptions import EventStreamError

from tests.conftest import MASTER_KEY, boto_client
from tests.helpers.processes import BIN, free_port, running
from tests.helpers.processes import proxy_env as _proxy_env

MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]


class Remote:
    """A running proxy process, addressed like the in-process test servers."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.base = self.url + "/bedrock"


def _stream_in_thread(port: int) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        client = boto_client("bedrock-runtime", Remote(port))
        try:
            reply = client.converse_stream(modelId="test.slow", messages=MESSAGES)
            result["events"] = list(reply["stream"])
        except EventStreamError as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _wait_for_stream(fake, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 10
    while fake.active_streams == 0 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # a frame or two are through


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_sigterm_drains_streams_and_flushes_the_ledger(fake_server, tmp_path):
    fake, fake_url = fake_server
    fake.frame_delay = 0.15  # a stream of ~1.5 s
    port = free_port()
    with running([BIN, "serve"], _proxy_env(fake_url, port, tmp_path), port) as proc:
        thread, result = _stream_in_thread(port)
        _wait_for_stream(fake, thread)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert _refuses_connections(port)  # no new connections while draining
        thread.join(15)
        assert proc.wait(15) == 0
    assert "error" not in result and "metadata" in result["events"][-1]
    import sqlite3

    with sqlite3.connect(tmp_path / "ops.db") as conn:
        rows = conn.execute("SELECT operation, incomplete FROM bp_spend").fetchall()
    assert rows == [("ConverseStream", 0)]


@pytest.mark.parametrize("how", ["second-signal", "deadline"])
def test_unfinished_streams_end_with_an_exception_frame(fake_server, tmp_path, how):
    fake, fake_url = fake_server
    fake.frame_delay = 1.0  # a stream of ~10 s
    port = free_port()
    env = _proxy_env(
        fake_url, port, tmp_path, BEDROCK_PROXY_SHUTDOWN_TIMEOUT="1" if how == "deadline" else "30"
    )
    with running([BIN, "serve"], env, port) as proc:
        thread, result = _stream_in_thread(port)
        _wait_for_stream(fake, thread)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        if how == "second-signal":
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
        thread.join(15)
        assert proc.wait(15) == 0
        assert time.monotonic() - started < 6
    error = result["error"]
    assert error.response["Error"]["Code"] == "internalServerException"
    assert "shutting down" in error.response["Error"]["Message"]


def test_metrics(start_proxy, fake):
    server = start_proxy()
    client = boto_client("bedrock-runtime", server)
    client.converse(modelId="anthropic.claude-3-haiku-20240307-v1:0", messages=MESSAGES)
    list(client.converse_stream(modelId="m1", messages=MESSAGES)["stream"])
    with pytest.raises(client.exceptions.ThrottlingException):
        client.converse(modelId="test.throttle", messages=MESSAGES)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.url + "/metrics", timeout=5)
    assert info.value.code == 403
    request = urllib.request.Request(
        server.url + "/metrics", headers={"Authorization": f"Bearer {MASTER_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = _scrape(server)
    assert (
        'bedrock_proxy_requests_total{operation="Converse",'
        'model="anthropic.claude-3-haiku-20240307-v1:0",status="200",key="master"} 1'
    ) in text
    assert (
        'bedrock_proxy_tokens_total{model="anthropic.claude-3-haiku-20240307-v1:0",key="master",kind="input"} 11'
        in text
    )
    assert 'bedrock_proxy_upstream_errors_total{code="ThrottlingException"} 1' in text
    assert 'bedrock_proxy_stream_ttfb_seconds_count{operation="ConverseStream"} 1' in text
    assert 'bedrock_proxy_overhead_seconds_count{operation="Converse"}' in text
    assert "bedrock_proxy_active_streams 0" in text
    assert "bedrock_proxy_ledger_queue_depth" in text
    assert "bedrock_proxy_ledger_rows_dropped_total 0" in text
    assert "bedrock_proxy_store_up 1" in text
    # The upstream connections used above are kept alive for the next requests.
    assert re.search(r"^bedrock_proxy_upstream_connections [1-9]", text, re.M), text
    assert (
        'bedrock_proxy_cost_usd_total{model="anthropic.claude-3-haiku-20240307-v1:0",key="master"}'
        in text
    )


def test_limit_refusals_are_counted(start_proxy, fake):
    server = start_proxy()
    from tests.helpers.admin import new_key, sigv4_client

    key = new_key(server, rpm_limit=1)
    client = sigv4_client("bedrock-runtime", server, key)
    if 60 - time.time() % 60 < 3:
        time.sleep(60 - time.time() % 60 + 0.1)
    client.converse(modelId="m", messages=MESSAGES)
    with pytest.raises(client.exceptions.ThrottlingException):
        client.converse(modelId="m", messages=MESSAGES)
    text = _scrape(server)
    assert 'bedrock_proxy_limit_refusals_total{reason="rpm"} 1' in text


def _scrape(server) -> str:
    request = urllib.request.Request(
        server.url + "/metrics", headers={"Authorization": f"Bearer {MASTER_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()


def test_workers_share_one_port(fake_server, tmp_path):
    _, fake_url = fake_server
    port, ops_port = free_port(), free_port()
    env = _proxy_env(fake_url, port, tmp_path, BEDROCK_PROXY_HTTP_PORT=str(ops_port))
    with running([BIN, "serve", "--workers", "2"], env, port) as proc:
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) == 2
        time.sleep(1.0)
        # Both bound the port: a worker that could not would have exited and been replaced.
        again = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert sorted(again) == sorted(children)
        for _ in range(20):  # a connection each: the kernel spreads them over both workers
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/bedrock/model/m/count-tokens",
                data=b'{"input": {}}',
                headers={"Authorization": f"Bearer {MASTER_KEY}"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert json.loads(response.read()) == {"inputTokens": 17}

        # Metrics need no key on the plain-HTTP operations port, and whichever worker
        # answers counts both workers' requests (snapshots are shared once a second).
        def counted() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/metrics", timeout=5) as r:
                lines = r.read().decode().splitlines()
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in lines
                if line.startswith("bedrock_proxy_requests_total{")
                and 'operation="CountTokens"' in line
            )

        deadline = time.monotonic() + 5  # a snapshot is at most 1 s old
        scrapes = [counted() for _ in range(6)]
        while scrapes != [20] * 6 and time.monotonic() < deadline:
            time.sleep(0.2)
            scrapes = [counted() for _ in range(6)]
        assert scrapes == [20] * 6
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    for pid in children:
        assert subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0


def test_tracing_spans_continue_the_clients_trace(start_proxy, fake):
    from tests.helpers.tracing import span_exporter

    exporter = span_exporter()
    server = start_proxy(tracing=True)
    client = boto_client("bedrock-runtime", server)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"

    def traceparent(request, **_):
        request.headers["traceparent"] = f"00-{trace_id}-00f067aa0ba902b7-01"

    client.meta.events.register_first("before-sign.*.*", traceparent)
    client.converse(modelId="anthropic.claude-3-haiku-20240307-v1:0", messages=MESSAGES)
    # The span ends after the response is sent, with the rest of the bookkeeping.
    deadline = time.monotonic() + 5
    while True:
        spans = [s for s in exporter.get_finished_spans() if s.name == "bedrock Converse"]
        if spans or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    (span,) = spans
    assert f"{span.context.trace_id:032x}" == trace_id
    assert span.attributes["gen_ai.request.model"] == "anthropic.claude-3-haiku-20240307-v1:0"
    assert span.attributes["gen_ai.usage.input_tokens"] == 11
    assert span.attributes["http.response.status_code"] == 200
    assert span.end_time > span.start_time
