"""``bedrock-proxy login`` and ``bedrock-proxy token``: short-lived keys on a developer's
machine, with no long-lived key in any file.

``login --url URL`` waits on a loopback port, sends the browser to the proxy's console
(single sign-on), and receives a sealed code it alone can open (its verifier), for a token
of the user's machine: it keeps only that, in the OS keyring where there is one (the
``keyring`` package's backends), else in a file only its owner reads. ``token`` prints a
short-lived virtual key for the signed-in user (reused until five minutes before it
expires), in the form a client takes: the bare key (Claude Code's ``apiKeyHelper``, the
OpenAI and Anthropic SDKs), ``credential-process`` JSON (boto3, the AWS CLI, the
JavaScript SDK), or ``env``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import secrets
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Refresh a short-lived key this long before it expires.
_MARGIN = 300
_KEYRING_SERVICE = "bedrock-proxy"


def credentials_path() -> Path:
    explicit = os.environ.get("BEDROCK_PROXY_LOGIN_FILE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "bedrock-proxy" / "login.json"


def login(url: str, open_browser: bool, wait_seconds: float = 600) -> int:
    url = url.rstrip("/")
    state, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    received: dict[str, str] = {}
    done = threading.Event()

    class Callback(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
            ok = self.path.startswith("/callback?") and query.get("state") == state
            if ok:
                received.update(query)
                done.set()
            self.send_response(200 if ok else 400)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.end_headers()
            answer = "Signed in: you can close this tab." if ok else "Not this login's answer."
            self.wfile.write(answer.encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Callback)
    port = server.server_address[1]
    query = urllib.parse.urlencode(
        {"port": port, "state": state, "challenge": challenge.rstrip(b"=").decode()}
    )
    address = f"{url}/ui/cli/login?{query}"
    print(f"Open this address to sign in:\n{address}", flush=True)
    if open_browser:
        with contextlib.suppress(Exception):
            webbrowser.open(address)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        if not done.wait(wait_seconds):
            print("bedrock-proxy: no sign-in arrived; run login again", file=sys.stderr)
            return 1
    finally:
        server.shutdown()
    answer = _post(url + "/cli/token", {"code": received["code"], "verifier": verifier})
    _save({"url": url, "token": answer["token"]})
    print(f"Signed in to {url}. `bedrock-proxy token` prints a short-lived key.")
    return 0


def token(kind: str) -> int:
    saved = _load()
    if not saved.get("token"):
        print("bedrock-proxy: not signed in: run `bedrock-proxy login --url URL`", file=sys.stderr)
        return 1
    key = saved.get("key")
    if key and not _still_good(saved["url"], key["key"]):
        key = None  # deleted or regenerated since: a client asking again gets a new one
    if not key or key["expires_at"] - time.time() < _MARGIN:
        minted = _post(saved["url"] + "/key/session", {}, saved["token"])
        expires = datetime.fromisoformat(minted["expires"].replace("Z", "+00:00")).timestamp()
        key = {
            "key": minted["key"],
            "access_key_id": minted["access_key_id"],
            "secret_access_key": minted["secret_access_key"],
            "expires_at": expires,
        }
        _save({**saved, "key": key})
    if kind == "credential-process":
        expiration = datetime.fromtimestamp(key["expires_at"], UTC).isoformat()
        print(
            json.dumps(
                {
                    "Version": 1,
                    "AccessKeyId": key["access_key_id"],
                    "SecretAccessKey": key["secret_access_key"],
                    "Expiration": expiration.replace("+00:00", "Z"),
                }
            )
        )
    elif kind == "env":
        print(f"export AWS_BEARER_TOKEN_BEDROCK={key['key']}")
    else:
        print(key["key"])
    return 0


def _still_good(url: str, key: str) -> bool:
    """Whether the proxy still takes the cached key (one small call; Claude Code asks its
    helper again on a 401, and would otherwise get the same dead key back until it
    expires). A proxy that cannot be asked leaves the cached key in use."""
    request = urllib.request.Request(url + "/key/info", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=5):
            return True
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403, 404):
            return True
        # A key an admin blocked stays this machine's key: a new one would undo the block.
        return "blocked" in exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return True


def _post(url: str, body: dict[str, Any], bearer: str | None = None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise SystemExit(f"bedrock-proxy: {url} answered {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(f"bedrock-proxy: cannot reach {url}: {exc.reason}") from None


def _keyring() -> Any:
    """The OS keyring (macOS Keychain, Windows Credential Locker, the Secret Service), or
    None where there is none: a headless Linux machine, a container, or a file named by
    ``BEDROCK_PROXY_LOGIN_FILE``."""
    if os.environ.get("BEDROCK_PROXY_LOGIN_FILE"):
        return None  # a file named for this: the keyring is not asked
    try:
        import keyring
        from keyring.backends import fail
    except ImportError:
        return None
    try:
        backend = keyring.get_keyring()
    except Exception:  # a backend that cannot even be loaded: no keyring here
        return None
    return None if isinstance(backend, fail.Keyring) else keyring


def _save(saved: dict[str, Any]) -> None:
    ring = _keyring()
    if ring is not None:
        try:
            ring.set_password(_KEYRING_SERVICE, "login", json.dumps(saved))
            _forget_file()  # one place only: a login moved to the keyring leaves no copy
            return
        except ring.errors.KeyringError as exc:  # a locked or absent Secret Service
            print(f"bedrock-proxy: the keyring refused ({exc}); using a file", file=sys.stderr)
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(saved, fh)
    os.chmod(path, 0o600)  # (an older file with a wider mode)


def _load() -> dict[str, Any]:
    ring = _keyring()
    if ring is not None:
        try:
            text = ring.get_password(_KEYRING_SERVICE, "login")
        except ring.errors.KeyringError:
            text = None
        if text:
            loaded: dict[str, Any] = json.loads(text)
            return loaded
    path = credentials_path()
    if not path.exists():
        return {}
    saved: dict[str, Any] = json.loads(path.read_text())
    return saved


def _forget_file() -> None:
    with contextlib.suppress(FileNotFoundError):
        credentials_path().unlink()
