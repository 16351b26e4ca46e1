"""``make bench``'s HTTP/2 flood row: an anonymous flood of every frame type on 10
connections against the liveness probe and a governed Converse call.

Each flooding connection sends the preface and then frames that carry no request forward
(WINDOW_UPDATE on stream 0, PING, SETTINGS, PRIORITY, an unknown type, WINDOW_UPDATE and
RST_STREAM on an ended stream), as fast as the socket takes them, and connects again
when the proxy closes it. The probes are sequential requests on a kept-alive HTTP/1.1
connection; p99 before and during the flood is the figure. Every server listens on
127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import http.client
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import benchmark as bench
from hyperframe.frame import (
    ExtensionFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)


def _opening() -> bytes:
    """The preface and one real request (stream 1, which has ended when the frames on it
    arrive): every frame after it is one that carries no request forward."""
    import h2.config
    import h2.connection

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "x"),
            (":path", "/health/liveness"),
        ],
        end_stream=True,
    )
    return conn.data_to_send()


PREFACE = _opening()
# ~1.2 MiB of frames, every type the proxy must count, in turns.
_ONE_ROUND = b"".join(
    f.serialize()
    for f in (
        WindowUpdateFrame(0, window_increment=1),
        PingFrame(0, opaque_data=b"12345678"),
        SettingsFrame(0),
        PriorityFrame(1, depends_on=0, stream_weight=15),
        ExtensionFrame(0xEE, 0),
        WindowUpdateFrame(1, window_increment=1),
        RstStreamFrame(1, error_code=0),
    )
)
FLOOD = _ONE_ROUND * (1_250_000 // len(_ONE_ROUND))
PROBES = 300


def flood(port: int, connections: int, seconds: float) -> None:
    """The flooder process: ``connections`` threads, each flooding and reconnecting."""
    stop = time.monotonic() + seconds

    def one() -> None:
        while time.monotonic() < stop:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                    sock.sendall(PREFACE + FLOOD)
                    while sock.recv(65536):
                        pass
            except OSError:
                time.sleep(0.001)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 5)


def _p99(conn: http.client.HTTPConnection, method: str, path: str, body: str | None,
         headers: dict[str, str]) -> float:  # fmt: skip
    times = []
    for _ in range(PROBES):
        started = time.perf_counter()
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 200, answer.status
        times.append((time.perf_counter() - started) * 1000)
    return statistics.quantiles(times, n=100)[98]


def flood_phase(workdir: Path, seconds: float = 20.0) -> dict:
    stub_port, hop_port, proxy_port = bench.free_port(), bench.free_port(), bench.free_port()
    stub = [
        "nginx",
        "-c",
        str(bench.nginx_config(workdir, stub_port, hop_port)),
        "-p",
        str(workdir),
    ]
    env = bench.proxy_env(workdir, f"http://127.0.0.1:{stub_port}", proxy_port)
    token = bench.create_virtual_key(env, *bench.GOVERNED)
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    converse = f"/bedrock/model/{bench.MODEL}/converse"
    out: dict = {}
    with bench.process(stub, stub_port), bench.process([str(bench.BIN), "serve"], proxy_port, env):
        conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
        _p99(conn, "GET", "/health/liveness", None, {})  # warm up
        out["liveness_p99_ms"] = _p99(conn, "GET", "/health/liveness", None, {})
        out["converse_p99_ms"] = _p99(conn, "POST", converse, bench.CONVERSE_BODY, auth)
        flooder = subprocess.Popen(
            [sys.executable, __file__, "flood", str(proxy_port), "10", str(seconds)]
        )
        try:
            time.sleep(1.0)  # the flood is on every connection
            out["flood_liveness_p99_ms"] = _p99(conn, "GET", "/health/liveness", None, {})
            out["flood_converse_p99_ms"] = _p99(conn, "POST", converse, bench.CONVERSE_BODY, auth)
        finally:
            flooder.kill()
            flooder.wait(10)
    out["flood_converse_p99_over_unloaded"] = out["flood_converse_p99_ms"] / out["converse_p99_ms"]
    return out


def print_flood(f: dict) -> None:
    print("\nAn anonymous HTTP/2 flood of every frame type on 10 connections (p99 of 300 calls)")
    print("target        unloaded ms   flooded ms")
    print(f"liveness      {f['liveness_p99_ms']:11.2f}   {f['flood_liveness_p99_ms']:10.2f}")
    print(f"converse      {f['converse_p99_ms']:11.2f}   {f['flood_converse_p99_ms']:10.2f}"
          f"   ({f['flood_converse_p99_over_unloaded']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["flood"]:
        flood(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bedrock-proxy-flood-") as tmp:
            print_flood(flood_phase(Path(tmp)))
