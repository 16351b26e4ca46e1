"""``make demo`` (or ``bedrock-proxy demo``) run as a user runs it, for tests: started on
free ports, its printed lines for the try-it key read as they come, stopped with SIGTERM.
Its stderr is returned for the caller to check, and shown whenever the demo fails."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
JS = ROOT / "tests" / "js"
NODE_BIN = JS / "node_modules" / ".bin"


@dataclass
class Demo:
    port: int
    tls_port: int
    # The try-it key's lines, as printed (exports, comments, calls).
    block: list[str]
    # Filled once the demo has stopped.
    stderr: list[str] = field(default_factory=list)

    @property
    def exports(self) -> list[str]:
        return [line for line in self.block if line.startswith("export ")]


def shell_env(home: Path) -> dict[str, str]:
    """A user's shell: this checkout's tools on PATH, no AWS or SDK settings of the
    machine's, a home of its own (no ~/.aws, no Claude Code settings)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "ANTHROPIC_", "OPENAI_", "BEDROCK_PROXY_"))
    }
    env.update(
        PATH=f"{BIN}:{NODE_BIN}:{os.environ['PATH']}",
        HOME=str(home),
        DISABLE_AUTOUPDATER="1",
        DISABLE_TELEMETRY="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
    )
    return env


@contextlib.contextmanager
def running_demo(command: list[str], port: int, tls_port: int, home: Path) -> Iterator[Demo]:
    """Run ``command`` (the demo, on ``port`` and ``tls_port``) until the block is read."""
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=shell_env(home),
        start_new_session=True,  # make's child too gets the SIGTERM
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    demo = Demo(port, tls_port, [])
    try:
        demo.block = _block(proc, lines, time.monotonic() + 120)
        yield demo
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate(timeout=10)
        demo.stderr = err.splitlines()


def _block(proc: subprocess.Popen, lines: queue.Queue, deadline: float) -> list[str]:
    """The lines from "# The try-it key" to the blank line after them."""
    block: list[str] = []
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if line is None:
            break
        seen.append(line)
        if line.startswith("# The try-it key") or block:
            if not line.strip():
                return block
            block.append(line.rstrip("\n"))
    stderr = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
    raise AssertionError(f"the demo printed no try-it block:\n{''.join(seen)}\n{stderr}")
