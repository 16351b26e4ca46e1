"""``make demo`` as a new user meets it: every line it prints for the "try-it" key runs as
printed, in a shell, and each client (boto3, the AWS CLI, curl, the JavaScript SDK, Claude
Code) gets the simulator's answer; boto3 and the CLI send their Bedrock API key over the
HTTPS port the demo serves with its own certificate."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_cli import free_port

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "tests" / "js"
BIN = Path(sys.executable).parent
NODE_BIN = JS / "node_modules" / ".bin"


def _printed_block(proc: subprocess.Popen, lines: queue.Queue, deadline: float) -> list[str]:
    """The demo's lines for the try-it key, from its first line to the blank one after."""
    block: list[str] = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if line is None:
            break
        if line.startswith("# The try-it key") or block:
            if not line.strip():
                return block
            block.append(line.rstrip("\n"))
    raise AssertionError(f"the demo printed no try-it block; it printed {block}")


@pytest.mark.skipif(
    not (NODE_BIN / "claude").exists(), reason="make js-install installs Node clients"
)
def test_every_line_the_demo_prints_runs_as_printed(tmp_path):
    port, tls_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BEDROCK_PROXY_"))}
    command = [str(BIN / "bedrock-proxy"), "demo", "--port", str(port), "--tls-port"]
    command += [str(tls_port), "--sqlite-path", str(tmp_path / "demo.db"), "--requests", "4"]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        block = _printed_block(proc, lines, time.monotonic() + 60)
        script = tmp_path / "printed.sh"
        script.write_text("set -e\n" + "\n".join(block) + "\n")
        shell_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ANTHROPIC_"))
        }
        shell_env.update(
            PATH=f"{BIN}:{NODE_BIN}:{os.environ['PATH']}",
            HOME=str(tmp_path),  # no ~/.aws, no Claude Code settings of the machine's
            DISABLE_AUTOUPDATER="1",
            DISABLE_TELEMETRY="1",
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        )
        # In the Node clients' folder, where `npm install @aws-sdk/client-bedrock-runtime`
        # has been done (by make js-install).
        ran = subprocess.run(
            ["bash", "-x", str(script)],
            cwd=JS,
            env=shell_env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert ran.returncode == 0, ran.stdout + ran.stderr
        answers = ran.stdout.splitlines()
        # boto3, the CLI, curl (the whole answer) and Node: the simulator names the model.
        assert answers[0] == answers[2] == answers[4] == "model=amazon.nova-lite-v1:0", ran
        assert answers[1] == "agent AGENT12345 says: Helloagent AGENT12345 says: done", ran
        assert '"text":"model=amazon.nova-lite-v1:0"' in answers[3], ran
        assert answers[5].strip(), ran  # Claude Code's answer
        assert "https://127.0.0.1" in "\n".join(block) and "AWS_CA_BUNDLE" in "\n".join(block)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err[-3000:]
