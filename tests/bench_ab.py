"""Compare the governed path of a git commit (A) with the working tree (B), side by side.

``make bench`` compares hops run one after another, and on this VM runs a few seconds
apart differ by up to a quarter: a change worth 3 % cannot be seen that way. Here both
proxies serve the governed key at the same moment, each driven by its own wrk, so
whatever the hypervisor does falls on both. Each proxy gets its own SQLite file, because
two ledger writers on one file contend for its write lock (one commit against itself read
0.94 with a shared file, 0.97-1.04 with two), and its own nginx: with one upstream for
both, each proxy's requests kept it awake for the other's, and a change that spared the
upstream its wake-ups (``Pool.write_soon``) read 1.11, 0.98 and 0.98 against a control
of 0.97. Run ``--control`` first, and more than once: the spread of B/A for identical
code is the noise a result must clear.

    .venv/bin/python tests/bench_ab.py HEAD~1 --rounds 10
    .venv/bin/python tests/bench_ab.py HEAD --control

Every server listens on 127.0.0.1; every run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import benchmark as bench

ROOT = Path(__file__).resolve().parent.parent


def wrk_pair(urls: dict[str, str], script: Path, seconds: int) -> dict[str, float]:
    """Requests per second of each target, driven at the same time (16 connections each)."""
    runs = {
        name: subprocess.Popen(
            ["wrk", "-t1", "-c16", f"-d{seconds}s", "-s", str(script), url],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, url in urls.items()
    }
    out = {}
    for name, run in runs.items():
        text = run.communicate(timeout=seconds + 30)[0]
        found = re.search(r"Requests/sec:\s+([\d.]+)", text)
        out[name] = float(found.group(1)) if found else 0.0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="the commit A is checked out from")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument(
        "--control", action="store_true", help="B is the same commit as A, not the working tree"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bedrock-proxy-ab-") as tmp:
        workdir = Path(tmp)
        trees = {"A": workdir / "a"}
        if args.control:
            trees["B"] = workdir / "b"
        for tree in trees.values():
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), args.ref],
                check=True,
                timeout=60,
            )
        try:
            return compare(workdir, trees, args.rounds, args.seconds)
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    timeout=60,
                )


def compare(workdir: Path, trees: dict[str, Path], rounds: int, seconds: int) -> int:
    ports = {"A": bench.free_port(), "B": bench.free_port()}
    stubs = {name: (bench.free_port(), bench.free_port()) for name in ports}
    env = bench.proxy_env(workdir, f"http://127.0.0.1:{stubs['B'][0]}", ports["B"])
    token = bench.create_virtual_key(env, *bench.GOVERNED)
    envs = {}
    stub_cmds = {}
    for name in ("A", "B"):
        database = workdir / f"{name}.db"
        shutil.copy(workdir / "bench.db", database)  # the key, in a file of its own
        envs[name] = dict(
            env,
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{stubs[name][0]}",
            BEDROCK_PROXY_PORT=str(ports[name]),
            BEDROCK_PROXY_SQLITE_PATH=str(database),
        )
        if name in trees:  # the checked-out commit's package, ahead of the editable install
            envs[name]["PYTHONPATH"] = str(trees[name])
        stub_dir = workdir / f"stub-{name}"
        stub_dir.mkdir()
        conf = bench.nginx_config(stub_dir, *stubs[name])
        stub_cmds[name] = ["nginx", "-c", str(conf), "-p", str(stub_dir)]
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    script = bench.wrk_script(workdir, headers)
    urls = {
        name: f"http://127.0.0.1:{port}/bedrock/model/{bench.MODEL}/converse"
        for name, port in ports.items()
    }
    # -P: no working directory ahead of PYTHONPATH, or A would import the working tree too.
    serve = [sys.executable, "-P", "-m", "proxy", "serve"]
    with (
        bench.process(stub_cmds["A"], stubs["A"][0]),
        bench.process(stub_cmds["B"], stubs["B"][0]),
        bench.process(serve, ports["A"], envs["A"]),
        bench.process(serve, ports["B"], envs["B"]),
    ):
        wrk_pair(urls, script, 2)  # warm-up
        ratios = []
        for i in range(rounds):
            rps = wrk_pair(urls, script, seconds)
            ratios.append(rps["B"] / rps["A"] if rps["A"] else 0.0)
            print(f"round {i + 1}: A {rps['A']:.0f}  B {rps['B']:.0f}  B/A {ratios[-1]:.3f}")
    ordered = sorted(ratios)
    print(
        f"B/A over {rounds} rounds of {seconds} s: median {statistics.median(ordered):.3f}, "
        f"mean {statistics.mean(ordered):.3f}, from {ordered[0]:.3f} to {ordered[-1]:.3f}"
    )
    return 0


if __name__ == "__main__":
    if not shutil.which("wrk") or not shutil.which("nginx"):
        print("wrk and nginx are needed (apt-get install -y wrk nginx-light)", file=sys.stderr)
        sys.exit(2)
    os.chdir(ROOT)
    sys.exit(main())
