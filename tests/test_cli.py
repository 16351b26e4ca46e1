"""The real entry points as operators run them: the CLI, config file and environment,
the AWS SDKs' own endpoint variables, and the AWS CLI and boto3 with a bearer token."""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

import boto3
import pytest

from tests.conftest import MASTER_KEY, REGION, client_config
from tests.helpers.processes import BIN, _killed, free_port, running, server_env


def test_serve_with_config_file_env_and_sdk_clients(fake_server, tmp_path):
    _, fake_url = fake_server
    port, file_port = free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(f"host: 127.0.0.1\nport: {file_port}\nidle_timeout: 30\n")
    # The environment wins over the file.
    env = server_env(fake_url, BEDROCK_PROXY_PORT=str(port))
    with running([BIN, "serve", "--config", str(config)], env, port) as proc:
        base = f"http://127.0.0.1:{port}/bedrock"
        # boto3 with a Bedrock API key: botocore sends it as Authorization: Bearer.
        client_env = {"AWS_BEARER_TOKEN_BEDROCK": MASTER_KEY}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in client_env.items():
                mp.setenv(k, v)
            client = boto3.client(
                "bedrock-runtime", endpoint_url=base, region_name=REGION, config=client_config()
            )
            reply = client.converse(
                modelId="amazon.nova-pro-v1:0",
                messages=[{"role": "user", "content": [{"text": "hi"}]}],
            )
        assert reply["output"]["message"]["content"][0]["text"] == "model=amazon.nova-pro-v1:0"
        # The AWS CLI, pointed at the proxy with --endpoint-url.
        cli_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("AWS_ACCESS", "AWS_SECRET"))
        }
        cli_env["AWS_BEARER_TOKEN_BEDROCK"] = MASTER_KEY
        out = subprocess.run(
            [
                os.path.join(os.path.dirname(sys.executable), "aws"),
                "bedrock",
                "list-foundation-models",
                "--endpoint-url",
                base,
                "--region",
                REGION,
            ],
            env=cli_env,
            capture_output=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr.decode()
        assert json.loads(out.stdout)["modelSummaries"][0]["providerName"] == "Anthropic"
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    assert any("listening" in line.get("msg", "") for line in lines)
    assert MASTER_KEY not in stderr.decode()


def test_a_store_another_process_holds_delays_startup_rather_than_failing_it(fake_server, tmp_path):
    """A worker started beside one that is migrating waits for the store's lock (SQLite's
    busy_timeout), however short the per-call store deadline is."""
    _, fake_url = fake_server
    port = free_port()
    path = tmp_path / "proxy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    env = server_env(
        fake_url,
        BEDROCK_PROXY_PORT=str(port),
        BEDROCK_PROXY_SQLITE_PATH=str(path),
        BEDROCK_PROXY_STORE_TIMEOUT="0.2",
    )

    proc = subprocess.Popen([BIN, "serve"], env=env, stderr=subprocess.PIPE, start_new_session=True)
    try:
        fds = Path(f"/proc/{proc.pid}/fd")
        for _ in range(400):  # until the proxy has opened the file it now waits on
            with suppress(OSError):
                if any(os.readlink(fd) == str(path) for fd in fds.iterdir()):
                    break
            time.sleep(0.05)
        time.sleep(1.0)  # five times the store deadline, well within busy_timeout
        assert proc.poll() is None, "the proxy gave up waiting for the store"
        holder.execute("ROLLBACK")
        for _ in range(200):
            with (
                suppress(OSError),
                urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/health/readiness", timeout=1
                ) as ready,
            ):
                assert ready.status == 200
                break
            assert proc.poll() is None, "the proxy exited"
            time.sleep(0.1)
        else:
            raise AssertionError("never ready")
        proc.terminate()
        proc.wait(10)
    except BaseException as exc:
        exc.add_note("its stderr:\n" + _killed(proc))
        raise
    finally:
        holder.close()


def test_python_m_proxy_and_service_endpoint_variable(fake_server):
    _, fake_url = fake_server
    port = free_port()
    env = server_env(
        "http://127.0.0.1:9",
        AWS_ENDPOINT_URL_BEDROCK_RUNTIME=fake_url,
        BEDROCK_PROXY_HOST="127.0.0.1",
        BEDROCK_PROXY_PORT=str(port),
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def low_soft_limit() -> None:  # as a shell or a unit with the common default starts it
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))

    with running([sys.executable, "-m", "proxy", "serve"], env, port, low_soft_limit) as proc:
        # Two descriptors per stream: the soft limit is raised to the hard one.
        line = next(
            x
            for x in Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
            if x.startswith("Max open files")
        )
        expected = "1048576" if hard == resource.RLIM_INFINITY else str(hard)
        assert line.split()[3] == expected, line
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/bedrock/model/m1/count-tokens",
            data=b'{"input": {}}',
            headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read()) == {"inputTokens": 17}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveness", timeout=5) as r:
            assert json.loads(r.read())["status"] == "alive"
        proc.terminate()
        proc.wait(10)
        # Access log lines go to stdout, one JSON object per request.
        records = [json.loads(line) for line in proc.stdout.read().decode().splitlines()]
        assert [r["operation"] for r in records] == ["CountTokens"]


@pytest.mark.parametrize(
    ("extra", "args", "needle"),
    [
        ({"BEDROCK_PROXY_PORT": "eighty"}, [], "port"),
        ({"BEDROCK_PROXY_REGION": "us-east-1.evil.com"}, [], "region"),
        ({"BEDROCK_PROXY_MASTER_KEY": ""}, [], "master_key"),
        ({"BEDROCK_PROXY_IDLE_TIMEOUT": "0"}, [], "idle_timeout"),
        ({}, ["--config", "/nonexistent/proxy.yaml"], "config file"),
    ],
)
def test_config_errors_are_one_clear_line(extra, args, needle):
    env = server_env("http://127.0.0.1:9", **extra)
    out = subprocess.run([BIN, "serve", *args], env=env, capture_output=True, timeout=30)
    assert out.returncode == 2
    lines = out.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


@pytest.mark.parametrize("backend", ["keyring.backends.fail.Keyring", "file"])
def test_a_login_is_kept_in_the_keyring_where_one_exists_else_a_private_file(tmp_path, backend):
    """No OS keyring (a headless machine: the keyring package's fail backend) is a file
    only its owner reads; a keyring holds it alone, and a file left from before goes."""
    env = {k: v for k, v in os.environ.items() if k != "BEDROCK_PROXY_LOGIN_FILE"}
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    ring = tmp_path / "keyring.json"
    if backend == "file":
        env.update(PYTHON_KEYRING_BACKEND="tests.helpers.file_keyring.FileKeyring",
                   BEDROCK_PROXY_TEST_KEYRING=str(ring))  # fmt: skip
        (tmp_path / "bedrock-proxy").mkdir()
        (tmp_path / "bedrock-proxy" / "login.json").write_text('{"token": "old"}')
    else:
        env["PYTHON_KEYRING_BACKEND"] = backend
    script = (
        "from proxy.cli import login; "
        "login._save({'url': 'http://x', 'token': 'bpat-t'}); print(login._load()['token'])"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "bpat-t", done.stderr
    file = tmp_path / "bedrock-proxy" / "login.json"
    if backend == "file":
        assert not file.exists() and "bpat-t" in ring.read_text()
    else:
        assert oct(file.stat().st_mode & 0o777) == "0o600" and "bpat-t" in file.read_text()
