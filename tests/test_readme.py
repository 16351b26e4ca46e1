"""The README, played as a new user plays it: ``make demo`` as the README says, its printed
lines pasted into a shell, then every snippet of "Keys" and "Calling it" run as written
(Python, shell and JavaScript). And the README stays a README: short, no commit hashes,
every link to a file that exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers.demo import JS, NODE_BIN, ROOT, running_demo, shell_env
from tests.helpers.processes import free_port

README = ROOT / "README.md"
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _snippets(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block: ``text`` blocks are for reading only."""
    return [(lang, code) for lang, code in _FENCE.findall(text) if lang != "text"]


def test_the_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 350
    # No commit hashes: seven or more hex digits, with a digit and a letter among them, that
    # are a word of their own (not the tail of an id such as my_agent-abc1234567).
    hashes = [
        w
        for w in re.findall(r"(?<![-_./:\w])[0-9a-f]{7,40}\b", text)
        if re.search(r"\d", w) and re.search(r"[a-f]", w)
    ]
    assert not hashes, hashes
    for path in [README, *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"


def test_the_configuration_reference_is_generated_from_the_settings():
    from proxy.server.config_reference import reference

    assert (DOCS / "configuration.md").read_text() == reference(), (
        "docs/configuration.md is stale: run python -m proxy.server.config_reference --write"
    )


@pytest.mark.skipif(
    not (NODE_BIN / "claude").exists(), reason="make js-install installs Node clients"
)
def test_a_new_user_follows_the_readme(tmp_path):
    text = README.read_text()
    start = _section(text, "Try it without AWS")
    assert "\nmake demo\n" in start
    port, tls_port = free_port(), free_port()
    command = ["make", "demo", f"PORT={port}", f"DEMO_TLS_PORT={tls_port}"]
    command.append(f"DEMO_DB={tmp_path / 'demo.db'}")
    with running_demo(command, port, tls_port, tmp_path) as demo:
        exports = "\n".join(demo.exports) + "\n"
        snippets = _snippets(_section(text, "Keys")) + _snippets(_section(text, "Calling it"))
        assert [lang for lang, _ in snippets].count("python") >= 5
        for i, (lang, code) in enumerate(snippets):
            if lang == "python":
                (tmp_path / f"snippet{i}.py").write_text(code)
                run = f"{sys.executable} {tmp_path / f'snippet{i}.py'}"
            elif lang == "js":  # beside node_modules, where its imports resolve
                js_file = JS / f".readme-{os.getpid()}-{i}.mjs"
                js_file.write_text(code)
                run = f"node {js_file}"
            else:
                assert lang == "sh", lang
                run = code
            script = tmp_path / f"snippet{i}.sh"
            script.write_text("set -e\n" + exports + run + "\n")
            try:
                ran = subprocess.run(
                    ["bash", str(script)],
                    cwd=JS if lang == "js" else ROOT,  # (.venv/bin: the checkout's)
                    env=shell_env(tmp_path),
                    capture_output=True,
                    text=True,
                    timeout=180,
                )
            finally:
                (JS / f".readme-{os.getpid()}-{i}.mjs").unlink(missing_ok=True)
            assert ran.returncode == 0, f"snippet {i} ({lang}):\n{code}\n{ran.stdout}\n{ran.stderr}"
            assert ran.stdout.strip(), f"snippet {i} printed nothing:\n{code}\n{ran.stderr}"
    assert not any("Traceback" in line for line in demo.stderr), "\n".join(demo.stderr[-50:])


def test_the_readmes_commands_to_run_in_front_of_aws_start_the_proxy(tmp_path):
    """``make run`` and ``make run-tls`` as the README shows them (with a master key, on a
    free port, loopback only, and no AWS credentials: the proxy is live, not ready)."""
    import contextlib
    import os
    import signal
    import ssl
    import time
    import urllib.request

    block = _FENCE.findall(_section(README.read_text(), "Run it in front of AWS"))[0][1]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert [c for c in commands if c.startswith("make")] == ["make run", "make run-tls"]
    assert "export BEDROCK_PROXY_MASTER_KEY=sk-choose-a-long-secret" in commands
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    for command, scheme in (("make run", "http"), ("make run-tls", "https")):
        port = free_port()
        env = shell_env(tmp_path)
        env.update(
            BEDROCK_PROXY_MASTER_KEY="sk-choose-a-long-secret",
            BEDROCK_PROXY_HOST="127.0.0.1",
            BEDROCK_PROXY_SQLITE_PATH=str(tmp_path / "run.db"),
            AWS_EC2_METADATA_DISABLED="true",
        )
        proc = subprocess.Popen(
            [*command.split(), f"PORT={port}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    url = f"{scheme}://127.0.0.1:{port}/health/liveness"
                    with urllib.request.urlopen(url, timeout=2, context=insecure) as live:
                        assert live.status == 200
                        break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline, command
                    time.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        assert "Traceback" not in err, f"{command}:\n{out}\n{err}"
