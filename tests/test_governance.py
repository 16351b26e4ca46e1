"""Roles, admin API tokens and the audit log, on both stores: every audited change leaves
exactly one row, chained and verifiable by ``bedrock-proxy audit verify``; a change and
its row are one transaction; each role reaches what it should and nothing else."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest
from botocore.exceptions import ClientError

from tests.conftest import MASTER_KEY, boto_client
from tests.helpers.admin import admin, new_key
from tests.helpers.console import console_get, sign_in

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
BIN = os.path.join(os.path.dirname(sys.executable), "bedrock-proxy")


def _audit(server, **filters) -> list[dict]:
    query = "&".join(f"{k}={v}" for k, v in {"size": "500", **filters}.items())
    status, body = admin(server, "GET", f"/audit/logs?{query}")
    assert status == 200, body
    return list(reversed(body["logs"]))  # oldest first


def _verify(store_settings: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDROCK_PROXY_")}
    for name, value in store_settings.items():
        env["BEDROCK_PROXY_" + name.upper()] = value
    env["BEDROCK_PROXY_MASTER_KEY"] = MASTER_KEY
    return subprocess.run(
        [BIN, "audit", "verify"], env=env, capture_output=True, text=True, timeout=60
    )


def _sql(store_settings: dict[str, str], bg, statement: str) -> None:
    """A statement run on the store behind the proxy's back (an attacker with access)."""
    if "sqlite_path" in store_settings:
        conn = sqlite3.connect(store_settings["sqlite_path"])
        try:
            conn.executescript(statement)
        finally:
            conn.close()
        return
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(store_settings["database_url"], timeout=5)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    bg.run(run())


def test_every_change_leaves_one_verifiable_row(start_proxy, store_settings, bg):
    server = start_proxy(**store_settings)
    key = new_key(server, team_id="ml", key_alias="audited")
    assert admin(server, "POST", "/key/update", {"key": key["key_id"], "rpm_limit": 7})[0] == 200
    assert admin(server, "POST", "/key/regenerate", {"key": key["key_id"]})[0] == 200
    assert admin(server, "POST", "/team/update", {"team_id": "ml", "upstream": None})[0] == 200
    limit = {"limit_id": "project-x", "max_budget": 5}
    assert admin(server, "POST", "/limit/new", limit)[0] == 200
    assert admin(server, "POST", "/limit/update", {**limit, "rpm_limit": 9})[0] == 200
    assert admin(server, "POST", "/limit/delete", {"limit_id": "project-x"})[0] == 200
    status, token = admin(server, "POST", "/token/new", {"name": "ci", "role": "auditor"})
    assert status == 200, token
    assert admin(server, "POST", "/token/revoke", {"token_id": token["token_id"]})[0] == 200
    assert sign_in(server, MASTER_KEY)[0] == 303
    assert sign_in(server, "sk-not-a-key")[0] == 401
    assert admin(server, "POST", "/key/delete", {"keys": [key["key_id"]]})[0] == 200
    # A refused change leaves no row: an unknown limit, a duplicate alias.
    assert admin(server, "POST", "/limit/delete", {"limit_id": "nope"})[0] == 404
    new_key(server, key_alias="taken")
    assert admin(server, "POST", "/key/generate", {"key_alias": "taken"})[0] == 400

    rows = _audit(server)
    assert [r["action"] for r in rows] == [
        "key.generate",
        "key.update",
        "key.regenerate",
        "team.update",
        "limit.new",
        "limit.update",
        "limit.delete",
        "token.new",
        "token.revoke",
        "console.signin",
        "console.signin.failed",
        "key.delete",
        "key.generate",
    ]
    update = rows[1]
    assert update["actor"] == "master" and update["actor_kind"] == "master"
    assert update["target"] == key["key_id"] and update["source"] == "127.0.0.1"
    assert update["before"]["rpm_limit"] is None and update["after"]["rpm_limit"] == 7
    assert rows[10]["actor_kind"] == "anonymous" and rows[10]["source"] == "127.0.0.1"
    text = json.dumps(rows)
    for secret in (key["key"], key["secret_access_key"], token["token"], MASTER_KEY):
        assert secret not in text  # never a secret, before or after
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))

    verified = _verify(store_settings)
    assert verified.returncode == 0, verified.stderr
    assert f"{len(rows)} rows" in verified.stdout

    # Append-only: the store itself refuses to change a row...
    with pytest.raises(Exception, match="append-only"):
        _sql(store_settings, bg, "UPDATE bp_audit SET actor = 'someone' WHERE seq = 2")
    # ...and a row changed by someone who removed that guard breaks the chain there.
    drop = (
        "DROP TRIGGER bp_audit_append_only"
        if "sqlite_path" in store_settings
        else "DROP TRIGGER bp_audit_append_only ON bp_audit"
    )
    _sql(store_settings, bg, drop)
    _sql(store_settings, bg, "UPDATE bp_audit SET after = NULL WHERE seq = 4")
    broken = _verify(store_settings)
    assert broken.returncode == 1 and "row 4" in broken.stderr, broken.stderr


def test_no_change_without_its_row(start_proxy, tmp_path, bg):
    """The row is written in the change's transaction: when it cannot be, nothing
    changes (and the caller gets the store's 503)."""
    settings = {"sqlite_path": str(tmp_path / "atomic.db")}
    server = start_proxy(**settings)
    kept = new_key(server, key_alias="kept")
    _sql(settings, bg, "ALTER TABLE bp_audit RENAME TO bp_audit_away")  # rows cannot go in
    status, body = admin(server, "POST", "/key/generate", {"key_alias": "never"})
    assert status == 503, body
    assert admin(server, "POST", "/key/update", {"key": kept["key_id"], "rpm_limit": 1})[0] == 503
    _sql(settings, bg, "ALTER TABLE bp_audit_away RENAME TO bp_audit")
    status, listing = admin(server, "GET", "/key/list?return_full_object=true")
    assert [k["key_alias"] for k in listing["keys"]] == ["kept"]
    assert listing["keys"][0]["rpm_limit"] is None
    assert [r["action"] for r in _audit(server)] == ["key.generate"]


def _token(server, **fields) -> str:
    status, body = admin(server, "POST", "/token/new", {"name": "t", **fields})
    assert status == 200, body
    assert body["token"].startswith("bpat-")
    return body["token"]


def test_admin_tokens_reach_what_their_role_grants(start_proxy, fake):
    server = start_proxy()
    team = _token(server, role="team-admin", team_id="ml")
    auditor = _token(server, role="auditor")
    theirs = new_key(server, team_id="ml", key_alias="ml-key")
    other = new_key(server, team_id="ads", key_alias="ads-key")

    # A team-admin: its team's keys, minted into its team whatever it asks.
    status, minted = admin(server, "POST", "/key/generate", {"key_alias": "by-token"}, key=team)
    assert status == 200 and minted["team_id"] == "ml", minted
    assert admin(server, "POST", "/key/generate", {"team_id": "ads"}, key=team)[0] == 403
    status, listing = admin(server, "GET", "/key/list?return_full_object=true", key=team)
    assert status == 200 and {k["team_id"] for k in listing["keys"]} == {"ml"}
    assert admin(server, "GET", "/key/list?team_id=ads", key=team)[0] == 403
    ok = admin(server, "GET", f"/key/info?key={theirs['key_id']}", key=team)
    assert ok[0] == 200
    # Another team's key: the same refusal as a key that does not exist (no probing).
    denied = admin(server, "GET", f"/key/info?key={other['key_id']}", key=team)
    unknown = admin(server, "GET", "/key/info?key=no-such-key", key=team)
    assert denied[0] == unknown[0] == 403 and denied[1]["message"] == unknown[1]["message"]
    for path, body in (
        ("/key/update", {"key": other["key_id"], "rpm_limit": 1}),
        ("/key/regenerate", {"key": other["key_id"]}),
        ("/key/delete", {"keys": [other["key_id"]]}),
        ("/key/update", {"key": theirs["key_id"], "team_id": "ads"}),  # moving it out
    ):
        assert admin(server, "POST", path, body, key=team)[0] == 403, path
    assert admin(server, "GET", "/spend/logs?team_id=ads", key=team)[0] == 403
    assert admin(server, "GET", f"/spend/logs?api_key={other['key_id']}", key=team)[0] == 403
    assert admin(server, "GET", "/spend/logs", key=team)[0] == 200
    for method, path in (
        ("POST", "/limit/new"),
        ("GET", "/limit/list"),
        ("GET", "/spend/report"),
        ("POST", "/team/update"),
        ("POST", "/token/new"),
        ("GET", "/token/list"),
        ("GET", "/audit/logs"),
        ("GET", "/metrics"),
    ):
        body = {} if method == "POST" else None
        assert admin(server, method, path, body, key=team)[0] == 403, path

    # An auditor reads everything, the audit log included, and changes nothing.
    for path in ("/key/list", "/spend/report", "/limit/list", "/audit/logs", "/team/list"):
        assert admin(server, "GET", path, key=auditor)[0] == 200, path
    for path, body in (
        ("/key/generate", {}),
        ("/key/update", {"key": theirs["key_id"], "rpm_limit": 1}),
        ("/limit/new", {"limit_id": "x", "max_budget": 1}),
        ("/token/new", {"name": "x", "role": "admin"}),
    ):
        assert admin(server, "POST", path, body, key=auditor)[0] == 403, path

    # The audit log names the token that made a change.
    rows = _audit(server, action="key.generate")
    assert rows[-1]["actor_kind"] == "token" and rows[-1]["actor"].startswith("tok-")

    # An admin API token opens the admin API only, never a Bedrock call.
    client = boto_client("bedrock-runtime", server, key=team)
    with pytest.raises(ClientError) as refused:
        client.converse(modelId=HAIKU, messages=[{"role": "user", "content": [{"text": "x"}]}])
    assert refused.value.response["Error"]["Code"] in (
        "AccessDeniedException",
        "UnrecognizedClientException",
    )


def test_a_token_expires_and_is_revoked(start_proxy):
    server = start_proxy()
    expiring = _token(server, role="admin", duration="1h")
    assert admin(server, "GET", "/key/list", key=expiring)[0] == 200
    server.clock.advance(3600 + 1)
    status, body = admin(server, "GET", "/key/list", key=expiring)
    assert status == 403 and "not valid" in body["message"]
    revoked = _token(server, role="auditor")
    status, listing = admin(server, "GET", "/token/list")
    token_id = next(t["token_id"] for t in listing["tokens"] if t["role"] == "auditor")
    assert admin(server, "POST", "/token/revoke", {"token_id": token_id})[0] == 200
    status, body = admin(server, "GET", "/key/list", key=revoked)
    assert status == 403 and "not valid" in body["message"]
    # Shown once, kept hashed: the listing never carries a token.
    assert "bpat-" not in json.dumps(listing)
    # Refused shapes: an unknown role, a team-admin without its team.
    assert admin(server, "POST", "/token/new", {"name": "x", "role": "root"})[0] == 400
    assert admin(server, "POST", "/token/new", {"name": "x", "role": "team-admin"})[0] == 400


def test_the_console_shows_the_audit_log_and_tokens(start_proxy):
    server = start_proxy()
    new_key(server, key_alias="seen-in-audit")
    status, sid = sign_in(server, MASTER_KEY)
    cookie = {"bp_console": sid}
    status, page = console_get(server, "/ui/audit?action=key.generate", cookie)
    assert status == 200 and "seen-in-audit" in page and "console.signin" not in page
    status, csv_text = console_get(server, "/ui/audit.csv", cookie)
    assert status == 200 and csv_text.splitlines()[0].startswith("seq,ts,actor")
    status, jsonl = console_get(server, "/ui/audit.jsonl?action=console.signin", cookie)
    assert status == 200 and json.loads(jsonl.splitlines()[0])["action"] == "console.signin"
    status, page = console_get(server, "/ui/tokens", cookie)
    assert status == 200 and 'id="token-form"' in page
