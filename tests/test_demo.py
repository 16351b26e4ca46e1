"""``make demo`` as a new user meets it: every line it prints for the "try-it" key runs as
printed, in a shell, and each client (boto3, the AWS CLI, curl, the JavaScript SDK, Claude
Code) gets the simulator's answer; boto3 and the CLI send their Bedrock API key over the
HTTPS port the demo serves with its own certificate."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers.demo import BIN, JS, NODE_BIN, running_demo, shell_env
from tests.helpers.processes import free_port


@pytest.mark.skipif(
    not (NODE_BIN / "claude").exists(), reason="make js-install installs Node clients"
)
def test_every_line_the_demo_prints_runs_as_printed(tmp_path):
    port, tls_port = free_port(), free_port()
    command = [str(BIN / "bedrock-proxy"), "demo", "--port", str(port), "--tls-port"]
    command += [str(tls_port), "--sqlite-path", str(tmp_path / "demo.db"), "--requests", "4"]
    with running_demo(command, port, tls_port, tmp_path) as demo:
        script = tmp_path / "printed.sh"
        script.write_text("set -e\n" + "\n".join(demo.block) + "\n")
        # In the Node clients' folder, where `npm install @aws-sdk/client-bedrock-runtime`
        # has been done (by make js-install).
        ran = subprocess.run(
            ["bash", "-x", str(script)],
            cwd=JS,
            env=shell_env(tmp_path),
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
        text = "\n".join(demo.block)
        assert f"https://127.0.0.1:{tls_port}" in text and "AWS_CA_BUNDLE" in text
        # The master key it exports is the demo store's own, random and owner-only: a
        # well-known one left in a shell would be the next proxy's master key.
        master = next(
            line.split("=", 1)[1]
            for line in demo.exports
            if line.startswith("export BEDROCK_PROXY_MASTER_KEY=")
        )
        kept = tmp_path / "demo-master-key"
        assert master.startswith("sk-demo-") and len(master) > 30
        assert kept.read_text().strip() == master and kept.stat().st_mode & 0o777 == 0o600
    assert not any("Traceback" in line for line in demo.stderr), "\n".join(demo.stderr[-50:])
