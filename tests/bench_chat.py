"""The OpenAI-compatible front under load: a governed chat completion at 32 connections,
against the thinnest aiohttp hop in front of the same nginx stub.

The key is governed as the HTTP phase's is (a model allow-list, RPM, TPM and a budget), so
the proxy parses the body strictly for its model, reads the usage from the answer and
prices it. The ratio is the median of back-to-back pairs (``bench.paired_ratio``): the
thin hop and the proxy share the machine's mood of the moment.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import benchmark as bench

CHAT_PATH = "/openai/v1/chat/completions"
GOVERNED = (
    "--models", "openai.*", "--rpm", "100000000", "--tpm", "100000000000",
    "--budget", "1000000",
)  # fmt: skip


def chat_phase(workdir: Path, seconds: int) -> dict:
    if not shutil.which("nginx"):
        print("nginx missing: no chat-completion row", file=sys.stderr)
        return {}
    stub_port, hop_port, proxy_port, thin_port = (bench.free_port() for _ in range(4))
    stub_cmd = [
        "nginx",
        "-c",
        str(bench.nginx_config(workdir, stub_port, hop_port)),
        "-p",
        str(workdir),
    ]
    env = bench.proxy_env(workdir, f"http://127.0.0.1:{stub_port}", proxy_port)
    headers = {
        "Authorization": f"Bearer {bench.create_virtual_key(env, *GOVERNED)}",
        "Content-Type": "application/json",
    }
    thin_cmd = [
        sys.executable,
        bench.__file__,
        "thin",
        "--port",
        str(thin_port),
        "--upstream",
        f"http://127.0.0.1:{stub_port}",
    ]
    with (
        bench.process(stub_cmd, stub_port),
        bench.process([str(bench.BIN), "serve"], proxy_port, env) as proxy,
        bench.process(thin_cmd, thin_port) as thin,
    ):
        governed = (f"http://127.0.0.1:{proxy_port}/bedrock{CHAT_PATH}", proxy.pid, headers)
        plain = (f"http://127.0.0.1:{thin_port}{CHAT_PATH}", thin.pid, headers)
        for url, pid, h in (governed, plain):
            bench.wrk(url, 32, 2, h, workdir, pid, bench.CHAT_BODY)  # warm up
        out: dict = {}
        for name, (url, pid, h) in (("thin_32", plain), ("governed_32", governed)):
            out[name] = bench.wrk(url, 32, seconds, h, workdir, pid, bench.CHAT_BODY)
        assert out["governed_32"]["errors"] == 0, out
        out["paired_32"] = bench.paired_ratio(plain, governed, workdir, bench.CHAT_BODY)
    return out


def print_chat(c: dict) -> None:
    if not c:
        return
    print("\nOpenAI chat completion (/bedrock/openai/v1, governed key, usage priced), @32:")
    for name in ("thin_32", "governed_32"):
        row = c[name]
        print(
            f"  {name:<12}{row['rps']:>9.0f} req/s  p50 {row['p50_ms']:.3f} ms  "
            f"p99 {row['p99_ms']:.3f} ms  CPU {row.get('cpu_us_per_req', 0):.0f} us/req"
        )
    p = c["paired_32"]
    print(
        f"  governed/thin, median of {p['pairs']} pairs: {p['median']:.2f} "
        f"(from {p['min']:.2f} to {p['max']:.2f})"
    )
