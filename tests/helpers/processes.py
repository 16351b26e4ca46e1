"""The proxy as operators run it in tests: its command, a free loopback port, the
environment pointing it at a fake upstream, and a process that is ready before the test
goes on and shows what it printed whenever anything fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from tests.conftest import MASTER_KEY, REGION
from tests.fake_bedrock import UPSTREAM_ACCESS_KEY, UPSTREAM_SECRET_KEY, UPSTREAM_SESSION_TOKEN
from tests.helpers.ports import free_port as free_port  # (where the tests import it from)
from tests.stores import REDIS_PREFIX

BIN = os.path.join(os.path.dirname(sys.executable), "bedrock-proxy")


def server_env(fake_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BEDROCK_PROXY_"))}
    env.update(
        AWS_ACCESS_KEY_ID=UPSTREAM_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=UPSTREAM_SECRET_KEY,
        AWS_SESSION_TOKEN=UPSTREAM_SESSION_TOKEN,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_REGION=REGION,
        AWS_ENDPOINT_URL=fake_url,
        BEDROCK_PROXY_MASTER_KEY=MASTER_KEY,
        BEDROCK_PROXY_SQLITE_PATH=os.path.join(tempfile.mkdtemp(), "proxy.db"),
        BEDROCK_PROXY_REDIS_PREFIX=REDIS_PREFIX,
    )
    env.update(extra)
    return env


@contextmanager
def running(
    args: list[str], env: dict[str, str], port: int, preexec_fn: Any = None
) -> Iterator[subprocess.Popen]:
    """The command, ready on ``port``, stopped with SIGTERM afterwards. Its own session, so
    that a failure ends its workers too; what it printed is shown whenever anything fails."""
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=preexec_fn,
        start_new_session=True,
    )
    try:
        # Bounded, with room for a machine running another suite beside this one.
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/readiness", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("never ready") from None
                time.sleep(0.1)
        yield proc
        proc.terminate()
        proc.wait(10)
    except BaseException as exc:
        exc.add_note("its stderr:\n" + _killed(proc))
        raise


def _killed(proc: subprocess.Popen) -> str:
    """Everything the process and its children printed, once they are all gone (reading
    the pipe of a process still running would wait for it for ever)."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=10)
    return err.decode(errors="replace") if err else ""


def proxy_env(fake_url: str, port: int, tmp_path, **extra: str) -> dict[str, str]:
    return server_env(
        fake_url,
        BEDROCK_PROXY_HOST="127.0.0.1",
        BEDROCK_PROXY_PORT=str(port),
        BEDROCK_PROXY_SQLITE_PATH=str(tmp_path / "ops.db"),
        **extra,
    )
