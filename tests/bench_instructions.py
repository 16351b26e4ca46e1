"""``make bench``'s deterministic phase: instructions per request, counted by callgrind.

Requests per second on this VM move by a third from one hour to the next (the same thin
hop has measured 176 to 310 us of CPU per request in one day), so a throughput ratio near a
target can pass or fail on the hypervisor's mood. Instructions executed do not: callgrind
counts the same total for the same binary and inputs whatever else the machine is doing.
So each hop serves the same fixed number of small Converse calls (h2load, HTTP/1.1, one
connection: see ``CONNECTIONS``) under callgrind, after a warm-up it does not count, and the figure is
instructions per request of the thread that serves them (the event loop's; the proxy's
ledger writer thread is reported apart: it runs on another core).

Instructions are not seconds (OpenSSL's hashing retires several per cycle, the interpreter
far fewer), so this complements the wrk table; it does not replace it. Every server
listens on 127.0.0.1; every run is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bench_chat
import benchmark as bench

WARM_UP = 600
# One connection: at 32 the number of reads each loop turn gathers varies from run to run,
# and the counts with it (+-2 %); at one they repeat to +-0.3 %, and come out within that
# of the 32-connection figures (measured 2026-11-29: governed 740-751k at both).
CONNECTIONS = int(os.environ.get("BENCH_INSTR_CONNECTIONS", "1"))


def available() -> bool:
    return all(shutil.which(tool) for tool in ("valgrind", "callgrind_control", "h2load", "nginx"))


def instructions_phase(workdir: Path, requests: int) -> dict[str, Any]:
    """Thousands of instructions per request: thin hop, plain virtual key, governed key;
    and a governed OpenAI chat completion against the thin hop on the same path."""
    stub_port, hop_port, thin_port, proxy_port = (bench.free_port() for _ in range(4))
    (workdir / "instr-body.json").write_text(bench.CONVERSE_BODY)
    (workdir / "instr-chat.json").write_text(bench.CHAT_BODY)
    stub_cmd = ["nginx", "-c", str(bench.nginx_config(workdir, stub_port, hop_port))]
    upstream = f"http://127.0.0.1:{stub_port}"
    env = bench.proxy_env(workdir, upstream, proxy_port)
    plain = bench.create_virtual_key(env)
    governed = bench.create_virtual_key(env, *bench.GOVERNED)
    chat = bench.create_virtual_key(env, *bench_chat.GOVERNED)
    chat_body = workdir / "instr-chat.json"
    thin_cmd = [sys.executable, bench.__file__, "thin", "--port", str(thin_port)]
    thin_cmd += ["--upstream", upstream]
    out: dict[str, Any] = {"requests": requests}
    with bench.process([*stub_cmd, "-p", str(workdir)], stub_port):
        thin_url = f"http://127.0.0.1:{thin_port}/model/{bench.MODEL}/converse"
        with callgrind(thin_cmd, thin_port, workdir / "cg.thin") as thin:
            out["thin"] = thin.count(thin_url, None, requests, workdir)
            out["thin_chat"] = thin.count(
                f"http://127.0.0.1:{thin_port}{bench_chat.CHAT_PATH}",
                None,
                requests,
                workdir,
                chat_body,
            )
        proxy_url = f"http://127.0.0.1:{proxy_port}/bedrock/model/{bench.MODEL}/converse"
        proxy_cmd = [str(bench.BIN), "serve"]
        with callgrind(proxy_cmd, proxy_port, workdir / "cg.proxy", env) as proxy:
            out["proxy"] = proxy.count(proxy_url, plain, requests, workdir)
            out["governed"] = proxy.count(proxy_url, governed, requests, workdir)
            out["chat"] = proxy.count(
                f"http://127.0.0.1:{proxy_port}/bedrock{bench_chat.CHAT_PATH}",
                chat,
                requests,
                workdir,
                chat_body,
            )
    return out


class Callgrind:
    """A server under callgrind with instrumentation off until asked, so that start-up and
    the warm-up run at valgrind's uninstrumented speed."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self._out, self._dumps = pid, out, 0
        self._instrumenting = False

    def count(
        self, url: str, token: str | None, requests: int, workdir: Path, body: Path | None = None
    ) -> dict[str, Any]:
        """Warm up, then count ``requests`` calls: thousands of instructions per request on
        the serving (first) thread, and on all the others together."""
        cmd = [
            "h2load",
            "--h1",
            "-c",
            str(CONNECTIONS),
            "-t",
            "1",
            "-d",
            str(body or workdir / "instr-body.json"),
        ]
        cmd += ["-H", "Content-Type: application/json"]
        if token:
            cmd += ["-H", f"Authorization: Bearer {token}"]
        subprocess.run([*cmd, "-n", str(WARM_UP), url], capture_output=True, timeout=600)
        if self._instrumenting:
            self._dump()  # the warm-up's counts, dropped
        else:  # (turned on once: turning it off and on again loses counts)
            self._control("-i", "on")
            self._instrumenting = True
        run = subprocess.run(
            [*cmd, "-n", str(requests), url], capture_output=True, text=True, timeout=1200
        ).stdout
        threads = self._dump()
        ok = re.search(r"status codes: (\d+) 2xx", run)
        if not threads or not ok or int(ok.group(1)) != requests:
            raise RuntimeError(f"the counted run did not complete: {run[-400:]}")
        return {
            "main_k": threads[0] / requests / 1e3,
            "other_threads_k": sum(threads[1:]) / requests / 1e3,
        }

    def _control(self, *args: str) -> None:
        subprocess.run(
            ["callgrind_control", *args, str(self.pid)], capture_output=True, timeout=120
        )

    def _dump(self) -> list[int]:
        """Instructions per thread since the last dump (callgrind zeroes them on a dump)."""
        self._control("-d")
        self._dumps += 1
        threads: list[int] = []
        deadline = time.monotonic() + 60
        while not threads and time.monotonic() < deadline:
            time.sleep(0.5)
            for path in sorted(self._out.parent.glob(f"{self._out.name}.{self._dumps}-*")):
                found = re.search(r"^(?:summary|totals): (\d+)", path.read_text(), re.M)
                if found:
                    threads.append(int(found.group(1)))
        return threads


@contextlib.contextmanager
def callgrind(
    cmd: list[str], port: int, out: Path, env: dict[str, str] | None = None
) -> Iterator[Callgrind]:
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes"]
    valgrind += ["--dump-line=no", f"--callgrind-out-file={out}"]
    with bench.process([*valgrind, *cmd], port, env, ready_timeout=180) as proc:
        yield Callgrind(proc.pid, out)


def print_instructions(r: dict[str, Any]) -> None:
    thin = r["thin"]["main_k"]
    print(
        f"\nInstructions per request (callgrind; {r['requests']} requests, {CONNECTIONS} connection(s);"
        " the serving thread; deterministic)"
    )
    print(f"{'target':<10}{'k instr/req':>13}{'thin/x':>8}{'other threads':>15}")
    for name in ("thin", "proxy", "governed", "thin_chat", "chat"):
        row = r.get(name)
        if row is None:
            continue
        base = r["thin_chat"]["main_k"] if name == "chat" else thin
        print(
            f"{name:<10}{row['main_k']:>13.0f}{base / row['main_k']:>8.2f}"
            f"{row['other_threads_k']:>15.0f}"
        )
    print("(chat: a governed OpenAI chat completion; its thin/x is over thin_chat)")
