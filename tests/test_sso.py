"""Single sign-on against a real OpenID provider (the ``oidc-provider`` npm package, OpenID
Certified, started here on 127.0.0.1) through Chromium: the authorization code flow with
PKCE, state and nonce; groups mapped to roles and teams at every sign-in; each role's reach
on the console; and the ID tokens the verifier must refuse."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from proxy.access.oidc import IdTokenVerifier, OidcSettings
from proxy.wire import errors
from tests.conftest import MASTER_KEY, OffsetClock
from tests.helpers.admin import admin, new_key
from tests.helpers.browser import Page
from tests.helpers.processes import free_port

JS = Path(__file__).resolve().parent / "js"
SECRET = "sso-client-secret-for-tests"
GROUPS = {
    "roles": {
        "admin": ["proxy-admins"],
        "auditor": ["proxy-auditors"],
        "team-admin": ["ml-leads"],
        "member": ["engineers"],
    },
    "teams": {"ml-leads": "ml", "engineers": "ml"},
}


class Provider:
    """The OpenID provider process: its users' groups in a file it reads at each sign-in,
    its signing keys in another (a restart with new keys is a key rotation)."""

    def __init__(self, tmp: Path, port: int, redirect_uri: str) -> None:
        self.tmp, self.port, self.redirect_uri = tmp, port, redirect_uri
        self.users = tmp / "users.json"
        self.issuer = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[str] | None = None

    def set_users(self, users: dict[str, dict[str, Any]]) -> None:
        self.users.write_text(json.dumps(users))

    def start(self, kid: str) -> None:
        key = RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})
        jwks = self.tmp / f"jwks-{kid}.json"
        jwks.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
        self.proc = subprocess.Popen(
            ["node", "oidc_provider.mjs", str(self.port), SECRET, self.redirect_uri,
             str(jwks), str(self.users)],
            cwd=JS,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the process prints once it listens
        if not line:
            self.stop()
            raise AssertionError(f"the OpenID provider did not start: {self.output}")
        assert json.loads(line)["issuer"] == self.issuer

    @property
    def output(self) -> str:
        return self.proc.stderr.read() if self.proc and self.proc.stderr else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="module")
def provider(tmp_path_factory) -> Iterator[Provider]:
    port = free_port()
    proxy_port = free_port()
    provider = Provider(
        tmp_path_factory.mktemp("oidc"), port, f"http://127.0.0.1:{proxy_port}/ui/sso/callback"
    )
    provider.proxy_port = proxy_port  # type: ignore[attr-defined]
    provider.set_users(
        {
            "alice": {"email": "alice@example.com", "groups": ["proxy-admins"]},
            "lena": {"email": "lena@example.com", "groups": ["ml-leads", "engineers"]},
            "aud": {"email": "aud@example.com", "groups": ["proxy-auditors"]},
            "eve": {"email": "eve@example.com", "groups": ["engineers"]},
            "nobody": {"email": "nobody@example.com"},  # no groups claim at all
        }
    )
    provider.start("k1")
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture(scope="module")
def sso_proxy(start_proxy, provider):
    # Bedrock answered by the built-in simulator: the developer-machine test runs real
    # clients (boto3, Claude Code) with the keys the CLI gets.
    return start_proxy(
        listener_port=provider.proxy_port,
        oidc={"issuer": provider.issuer, "client_id": "bedrock-proxy", "client_secret": SECRET,
              "recheck_seconds": 1, **GROUPS},
        console_master_signin=False,
        simulate=True,
        endpoints={},
    )  # fmt: skip


@contextmanager
def _signed_in(page: Page, login: str) -> Iterator[None]:
    """Sign in through the provider's own pages: its login form, then its consent."""
    page.driver.delete_all_cookies()
    page.open("/ui/signin")
    page.click("#sso")
    page.fill({"login": login, "password": "any"})
    page.click("button[type=submit]")
    if "/interaction/" in page.driver.current_url:  # consent, the first time
        page.click("button[type=submit]")
    yield


def test_sign_in_maps_groups_to_roles_and_teams(browser, sso_proxy, provider):
    page = Page(browser, sso_proxy)
    ml = new_key(sso_proxy, team_id="ml", key_alias="ml-key")
    ads = new_key(sso_proxy, team_id="ads", key_alias="ads-key")

    with _signed_in(page, "alice"):
        assert page.path == "/ui/keys"
        assert "alice@example.com · admin" in page.find("#who").text
        assert page.find("#nav-audit") and page.find("#nav-tokens")
        page.shot("sso-admin")

    with _signed_in(page, "lena"):  # team-admin of ml: ml's keys only
        assert page.path == "/ui/keys"
        source = browser.page_source
        assert "ml-key" in source and "ads-key" not in source
        for path in (f"/ui/keys/{ads['key_id']}", f"/ui/spend?key_id={ads['key_id']}"):
            page.open(path)
            assert "No key within your reach" in browser.page_source, path
        page.open("/ui/keys.csv?team_id=ads")
        assert "not one of yours" in browser.page_source
        for path in ("/ui/audit", "/ui/tokens", "/ui/limits", "/ui/live"):
            page.open(path)
            assert "does not open this page" in browser.page_source, path
        page.open(f"/ui/keys/{ml['key_id']}")
        assert "ml-key" in browser.page_source
        # The team's policy binds what its team-admin mints in the console too.
        team_policy = {"team_id": "ml", "key_max_budget": 5, "team_member_budget": 3,
                       "team_member_budget_duration": "1d"}  # fmt: skip
        assert admin(sso_proxy, "POST", "/team/update", team_policy)[0] == 200
        page.open("/ui/keys/new")
        page.fill({"key_alias": "too-rich", "max_budget": "50"})
        page.click("#save")
        assert "key_max_budget" in browser.page_source
        page.fill({"key_alias": "within", "max_budget": "5"})
        page.click("#save")
        assert "within" in browser.page_source and "key_max_budget" not in browser.page_source
        admin(sso_proxy, "POST", "/team/new", {"team_id": "ads"})
        page.open("/ui/teams")  # its own team, its policy and members; not another's
        source = browser.page_source
        assert 'data-team-id="ml"' in source and 'data-team-id="ads"' not in source
        assert "lena@example.com (admin)" in source and "$3.00" in source
        page.shot("teams")
        # Its members are its team-admin's to manage; its policy is not (read only).
        page.open("/ui/teams/ml")
        assert not page.all("#save") and page.all("#team-policy fieldset[disabled]")
        page.find("#member-form [name=user_id]").send_keys("new-hire@example.com")
        page.click("#member-add")
        assert 'data-user-id="new-hire@example.com"' in browser.page_source
        page.click('tr[data-user-id="new-hire@example.com"] button')
        assert 'data-user-id="new-hire@example.com"' not in browser.page_source
        page.open("/ui/teams/ads")
        assert "not one of yours" in browser.page_source

    with _signed_in(page, "aud"):  # an auditor: reads, changes nothing
        page.open("/ui/audit")
        assert "console.signin" in browser.page_source
        page.shot("audit")
        page.open("/ui/keys/new")
        assert "does not open this page" in browser.page_source

    mine = new_key(sso_proxy, team_id="ml", user_id="eve@example.com", key_alias="eve-key")
    with _signed_in(page, "eve"):  # a member: their own keys, read-only
        assert page.path == "/ui/keys"
        source = browser.page_source
        assert "eve-key" in source and "ml-key" not in source and "ads-key" not in source
        page.open(f"/ui/keys/{ml['key_id']}")
        assert "No key within your reach" in browser.page_source
        page.open(f"/ui/keys/{mine['key_id']}")
        assert "eve-key" in browser.page_source
        # Self-service: a member mints their own key, in their team, as theirs.
        page.open("/ui/keys/new")
        page.fill({"key_alias": "eve-own", "user_id": "someone-else@example.com"})
        page.click("#save")
        assert "eve-own" in browser.page_source
        _, listing = admin(sso_proxy, "GET", "/key/list?return_full_object=true&key_alias=eve-own")
        mine_too = listing["keys"][0]
        assert mine_too["user_id"] == "eve@example.com" and mine_too["team_id"] == "ml"
        page.open("/ui/me")  # their own cap (their team's member default) and spend
        assert "$3.00" in page.find("#cap").text
        page.open("/ui/teams")  # their own team only
        source = browser.page_source
        assert 'data-team-id="ml"' in source and 'data-team-id="ads"' not in source
        assert not page.all("#member-form") and not page.all("#team-form")

    with _signed_in(page, "nobody"):  # no groups: no role, told so, reaches nothing
        assert page.path == "/ui/me"
        assert page.find("#no-role")
        page.open("/ui/keys")
        assert "no role" in browser.page_source

    # Every sign-in is audited, with the user's email and what their groups gave.
    _, body = admin(sso_proxy, "GET", "/audit/logs?action=console.signin&size=50")
    users = {(r["email"], (r["after"] or {}).get("role")) for r in body["logs"]}
    assert {("alice@example.com", "admin"), ("lena@example.com", "team-admin")} <= users


def test_removed_from_a_group_loses_it_at_the_next_sign_in(browser, sso_proxy, provider):
    page = Page(browser, sso_proxy)
    with _signed_in(page, "alice"):
        assert page.path == "/ui/keys"
    given = new_key(sso_proxy, user_id="alice@example.com", key_alias="alice-given")
    short = new_key(sso_proxy, user_id="alice@example.com", metadata={"session": True})
    provider.set_users({**json.loads(provider.users.read_text()), "alice": {"groups": []}})
    with _signed_in(page, "alice"):
        assert page.path == "/ui/me" and page.find("#no-role")
    # Their groups give them nothing now: their machines' short-lived keys end with it;
    # a key an admin gave them stays the admin's to revoke.
    assert admin(sso_proxy, "GET", f"/key/info?key={short['key_id']}")[0] == 404
    assert admin(sso_proxy, "GET", f"/key/info?key={given['key_id']}")[0] == 200
    provider.set_users(
        {**json.loads(provider.users.read_text()), "alice": {"groups": ["proxy-admins"]}}
    )


def _flow_by_http(server, login: str) -> tuple[Any, str]:
    """The sign-in as a plain HTTP client runs it (the provider's forms posted): the
    cookie jar, and the callback URL the provider sent back, not yet followed."""
    import http.cookiejar
    import re
    import urllib.parse
    import urllib.request

    jar = http.cookiejar.CookieJar()

    class Stop(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
            if urllib.parse.urlsplit(newurl).path == "/ui/sso/callback":
                raise _Callback(newurl)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), Stop)
    try:
        page = opener.open(server.url + "/ui/signin/sso", timeout=10)
        for fields in (
            {"prompt": "login", "login": login, "password": "any"},
            {"prompt": "consent"},
        ):
            html = page.read().decode()
            action = re.search(r'action="([^"]+)"', html)
            assert action, html[:500]
            target = urllib.parse.urljoin(page.url, action.group(1))
            page = opener.open(target, urllib.parse.urlencode(fields).encode(), timeout=10)
    except _Callback as found:
        return jar, found.url
    raise AssertionError("the provider never sent the browser back")


class _Callback(Exception):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


def _callback(server, jar: Any, url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect)
    try:
        with opener.open(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_code_replayed_and_a_state_changed_are_refused(sso_proxy, provider):
    import copy

    jar, url = _flow_by_http(sso_proxy, "alice")
    kept = [copy.copy(c) for c in jar if c.name == "bp_sso"]  # an attacker's copy
    status, _ = _callback(sso_proxy, jar, url)
    assert status == 303  # signed in; the sign-in cookie is spent
    status, text = _callback(sso_proxy, jar, url)
    assert status == 401 and "already used" in text
    # The same code again with the sign-in cookie kept: the provider refuses a used code.
    jar.set_cookie(kept[0])
    status, text = _callback(sso_proxy, jar, url)
    assert status == 401 and "refused the grant" in text, text
    # Another sign-in, its state changed on the way back.
    jar, url = _flow_by_http(sso_proxy, "alice")
    status, text = _callback(sso_proxy, jar, url.replace("state=", "state=x"))
    assert status == 401 and "state does not match" in text
    # The master key cannot sign in while the break-glass sign-in is off.
    from tests.helpers.console import console_post

    status, _ = console_post(sso_proxy, "/ui/signin", {"key": MASTER_KEY}, {})
    assert status == 401


def test_a_login_page_asks_once_for_a_refresh_token_never_in_a_loop(sso_proxy, provider):
    """Signed in without a refresh token for this login, the page sends the browser to
    the provider once for one; come back still without (a browser refusing the cookie),
    it goes on, rather than round the provider for ever."""
    jar, url = _flow_by_http(sso_proxy, "eve")
    assert _callback(sso_proxy, jar, url)[0] == 303  # a console session, no refresh token
    query = "port=40000&state=" + "s" * 20 + "&challenge=" + "c" * 43
    status, _ = _callback(sso_proxy, jar, f"{sso_proxy.url}/ui/cli/login?{query}")
    assert status == 303  # to the provider, for one
    status, page = _callback(sso_proxy, jar, f"{sso_proxy.url}/ui/cli/login?{query}&offline=asked")
    assert status == 200 and 'id="cli-allow"' in page, page[:500]


def test_teams_follow_the_groups_and_hand_made_memberships_stay(sso_proxy, provider):
    """A membership the groups gave goes when they no longer name the team; one added by
    hand stays, whatever the groups say."""
    users = json.loads(provider.users.read_text())
    provider.set_users({**users, "ivy": {"email": "ivy@example.com", "groups": ["engineers"]}})
    jar, url = _flow_by_http(sso_proxy, "ivy")
    assert _callback(sso_proxy, jar, url)[0] == 303
    admin(sso_proxy, "POST", "/team/new", {"team_id": "ivy-hand"})
    member = {"team_id": "ivy-hand", "member": {"user_id": "ivy@example.com", "role": "user"}}
    assert admin(sso_proxy, "POST", "/team/member_add", member)[0] == 200
    status, ivy = admin(sso_proxy, "GET", "/user/info?user_id=ivy@example.com")
    assert sorted(ivy["teams"]) == ["ivy-hand", "ml"], ivy
    short = new_key(sso_proxy, user_id="ivy@example.com", team_id="ml", metadata={"session": True})
    given = new_key(sso_proxy, user_id="ivy@example.com", team_id="ml", key_alias="ivy-given")
    # Moved to a group with a role and no team: out of ml, still in the team added by hand.
    provider.set_users({**users, "ivy": {"email": "ivy@example.com", "groups": ["proxy-auditors"]}})
    jar, url = _flow_by_http(sso_proxy, "ivy")
    assert _callback(sso_proxy, jar, url)[0] == 303
    status, ivy = admin(sso_proxy, "GET", "/user/info?user_id=ivy@example.com")
    assert status == 200 and ivy["teams"] == ["ivy-hand"], ivy
    # Out of ml: the short-lived key they held in it ends; one an admin gave them stays.
    assert admin(sso_proxy, "GET", f"/key/info?key={short['key_id']}")[0] == 404
    assert admin(sso_proxy, "GET", f"/key/info?key={given['key_id']}")[0] == 200
    _, audit = admin(sso_proxy, "GET", "/audit/logs?action=team.member_delete&target=ml")
    assert any((r["before"] or {}).get("user_id") == "ivy@example.com" for r in audit["logs"])
    provider.set_users(users)


def test_forged_callbacks_are_throttled_like_wrong_keys(start_proxy, provider):
    """An anonymous flood of callbacks costs a provider call and an audit row only up to
    the sign-in allowance of its address; then a 429, and nothing written."""
    proxy = start_proxy(
        oidc={"issuer": provider.issuer, "client_id": "bedrock-proxy", "client_secret": SECRET}
    )
    statuses = [
        _callback(proxy, None, proxy.url + "/ui/sso/callback?code=forged&state=x")[0]
        for _ in range(7)
    ]
    assert statuses == [401] * 5 + [429] * 2, statuses
    _, rows = admin(proxy, "GET", "/audit/logs?action=console.signin.failed")
    assert rows["total"] == 5


def test_a_rotated_key_is_fetched_again(browser, sso_proxy, provider):
    page = Page(browser, sso_proxy)
    with _signed_in(page, "alice"):
        assert page.path == "/ui/keys"
    provider.stop()
    provider.start("k2")  # the same issuer, a new signing key
    with _signed_in(page, "alice"):
        assert page.path == "/ui/keys"


def test_a_wrong_discovery_document_is_one_line(start_proxy, provider, bg):
    from proxy.server.app import StartupError

    async def writers() -> int:
        return sum(
            t.get_coro().__qualname__ in ("Ledger._run", "BatchSettler._run")  # type: ignore[union-attr]
            for t in asyncio.all_tasks()
            if not t.done()
        )

    before = bg.run(writers())
    nowhere = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StartupError) as failed:
        start_proxy(oidc={"issuer": nowhere, "client_id": "x", "client_secret": "y"})
    assert str(failed.value).startswith(f"oidc: cannot read {nowhere}/.well-known")
    assert "\n" not in str(failed.value)
    # What the failed start had started (the ledger's writer, the settler) was stopped.
    assert bg.run(writers()) == before
    # A provider that names another issuer than the one configured.
    elsewhere = provider.issuer.replace("127.0.0.1", "localhost")
    with pytest.raises(StartupError) as failed:
        start_proxy(oidc={"issuer": elsewhere, "client_id": "x", "client_secret": "y"})
    assert "names another issuer" in str(failed.value)


# ---------------------------------------------------------------- the ID tokens refused


ISSUER = "https://idp.example"
SETTINGS = OidcSettings(ISSUER, "bedrock-proxy", "secret", roles={"admin": ("a",)})


@pytest.fixture
def signer():
    key = RSAKey.generate_key(2048, parameters={"kid": "good"})
    public = KeySet([RSAKey.import_key(key.as_dict(private=False))])
    return key, public


def _verify(public: KeySet, token: str, clock: OffsetClock | None = None) -> dict[str, Any]:
    async def jwks() -> dict[str, Any]:
        return public.as_dict()

    import asyncio

    verifier = IdTokenVerifier(SETTINGS, ["RS256", "HS256", "none"], jwks, clock or OffsetClock())
    return asyncio.run(verifier.verify(token, "n-1"))


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "bedrock-proxy", "sub": "u1", "iat": now, "exp": now + 300,
              "nonce": "n-1", "groups": ["a"]}  # fmt: skip
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def test_a_good_token_names_its_user(signer):
    key, public = signer
    claims = _verify(public, jwt.encode({"alg": "RS256", "kid": "good"}, _claims(), key))
    assert SETTINGS.identity(claims).role == "admin"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"iss": "https://evil.example"}, "iss"),
        ({"aud": "someone-else"}, "aud"),
        ({"nonce": "replayed"}, "nonce"),
        ({"exp": int(time.time()) - 3600}, "exp"),
        ({"nonce": None}, "nonce"),
    ],
)
def test_claims_that_are_wrong_are_refused(signer, overrides, reason):
    key, public = signer
    token = jwt.encode({"alg": "RS256", "kid": "good"}, _claims(**overrides), key)
    with pytest.raises(errors.AwsError) as refused:
        _verify(public, token)
    assert refused.value.status == 403 and reason in refused.value.message


def test_forged_signatures_are_refused(signer):
    import base64
    import hashlib
    import hmac

    key, public = signer

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    unsigned = b64({"alg": "none", "kid": "good"}) + "." + b64(_claims()) + "."
    head = b64({"alg": "HS256", "kid": "good"}) + "." + b64(_claims())
    # HS256 keyed with the provider's public key (the classic algorithm confusion).
    pem = key.as_pem(private=False)
    mac = hmac.new(pem, head.encode(), hashlib.sha256).digest()
    confused = head + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    stranger = RSAKey.generate_key(2048, parameters={"kid": "not-in-jwks"})
    unknown_kid = jwt.encode({"alg": "RS256", "kid": "not-in-jwks"}, _claims(), stranger)
    for token in (unsigned, confused, unknown_kid):
        with pytest.raises(errors.AwsError) as refused:
            _verify(public, token)
        assert refused.value.status == 403, token


def test_no_groups_claim_is_no_role():
    identity = SETTINGS.identity({"sub": "u2", "email": "u2@example.com"})
    assert identity.role is None and identity.teams == ()


# ---------------------------------------------------------------- a developer's machine

BIN = os.path.join(os.path.dirname(sys.executable), "bedrock-proxy")
CLAUDE = JS / "node_modules" / ".bin" / "claude"


def _cli(args: list[str], env: dict[str, str], timeout: float = 60) -> str:
    done = subprocess.run([BIN, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def _login(browser, proxy, user: str, tmp_path: Path, keyring: bool = False) -> dict[str, str]:
    """``bedrock-proxy login`` as ``user``, through Chromium and the provider's own pages:
    the environment its later commands run in. Its login is kept in a file named for it,
    or (``keyring``) in a keyring backend the keyring package is told to use."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ANTHROPIC_"))}
    if keyring:
        env.update(
            PYTHON_KEYRING_BACKEND="tests.helpers.file_keyring.FileKeyring",
            BEDROCK_PROXY_TEST_KEYRING=str(tmp_path / "keyring.json"),
            PYTHONPATH=str(JS.parent.parent),
            XDG_CONFIG_HOME=str(tmp_path / "config"),
        )
        env.pop("BEDROCK_PROXY_LOGIN_FILE", None)
    else:
        env["BEDROCK_PROXY_LOGIN_FILE"] = str(tmp_path / "login.json")
    login = subprocess.Popen(
        [BIN, "login", "--url", proxy.url, "--no-browser"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert login.stdout is not None
        assert login.stdout.readline().startswith("Open this address")
        address = login.stdout.readline().strip()
        page = Page(browser, proxy)
        page.open("/ui/signin")  # cookies are cleared for the page's host (both servers')
        page.driver.delete_all_cookies()
        page.driver.get(address)  # not signed in: the sign-in page, then single sign-on
        page.click("#sso")
        page.fill({"login": user, "password": "any"})
        page.click("button[type=submit]")
        while "/interaction/" in page.driver.current_url:  # consent (offline access too)
            page.click("button[type=submit]")
        assert page.path == "/ui/cli/login", page.driver.current_url
        page.click("#cli-allow")
        out, err = login.communicate(timeout=30)
        assert login.returncode == 0, (out, err)
    finally:
        if login.poll() is None:
            login.kill()
    return env


def test_login_then_short_lived_keys_for_every_client(browser, sso_proxy, provider, tmp_path):
    env = _login(browser, sso_proxy, "eve", tmp_path)
    assert oct(os.stat(tmp_path / "login.json").st_mode & 0o777) == "0o600"
    saved = json.loads((tmp_path / "login.json").read_text())
    assert saved["token"].startswith("bpat-") and "key" not in saved

    key = _cli(["token"], env).strip()
    assert _cli(["token"], env).strip() == key  # reused until near its expiry
    # A key an admin blocked stays blocked: asking again brings the same key back...
    assert admin(sso_proxy, "POST", "/key/block", {"key": key})[0] == 200
    assert _cli(["token"], env).strip() == key
    status, refused = admin(sso_proxy, "POST", "/key/unblock", {"key": key}, key=saved["token"])
    assert status == 403 and "not unblock" in refused["message"], refused  # not its owner's
    assert admin(sso_proxy, "POST", "/key/block", {"key": key}, key=saved["token"])[0] == 200
    status, refused = admin(sso_proxy, "POST", "/key/delete", {"keys": [key]}, key=saved["token"])
    assert status == 403 and "blocked" in refused["message"], refused  # nor delete it...
    status, refused = admin(sso_proxy, "POST", "/key/session", {}, key=saved["token"])
    assert status == 403 and "blocked" in refused["message"], refused  # ...nor mint round it
    status, refused = admin(sso_proxy, "POST", "/key/generate", {}, key=saved["token"])
    assert status == 403 and "blocked" in refused["message"], refused  # with any kind of key
    # ...but one the proxy no longer knows is replaced (Claude Code asks after a 401).
    assert admin(sso_proxy, "POST", "/key/delete", {"keys": [key]})[0] == 200
    fresh = _cli(["token"], env).strip()
    assert fresh != key and fresh.startswith("sk-bp-")
    key = fresh
    status, info = admin(sso_proxy, "GET", f"/key/info?key={key}")
    assert status == 200, info
    assert info["info"]["user_id"] == "eve@example.com" and info["info"]["team_id"] == "ml"
    assert info["info"]["expires"]  # short-lived: 8 h unless the team says

    # boto3 with credential_process: no key in any file the SDK reads.
    process = json.loads(_cli(["token", "--format", "credential-process"], env))
    assert process["Version"] == 1 and process["AccessKeyId"].startswith("BPK")
    config = tmp_path / "aws-config"
    config.write_text(
        f"[profile dev]\ncredential_process = {BIN} token --format credential-process\n"
    )
    import boto3

    saved_env = dict(os.environ)
    try:
        os.environ.update(
            AWS_CONFIG_FILE=str(config),
            AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
            BEDROCK_PROXY_LOGIN_FILE=env["BEDROCK_PROXY_LOGIN_FILE"],
        )
        client = boto3.Session(profile_name="dev", region_name="us-east-1").client(
            "bedrock-runtime", endpoint_url=sso_proxy.url + "/bedrock"
        )
        answer = client.converse(
            modelId="anthropic.claude-3-haiku-20240307-v1:0",
            messages=[{"role": "user", "content": [{"text": "hi"}]}],
        )
        assert answer["output"]["message"]["content"][0]["text"]
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    # The AWS CLI, with the same profile.
    aws_env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    aws_env.update(AWS_CONFIG_FILE=str(config), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    cli = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "aws"), "bedrock-runtime", "converse",
         "--profile", "dev", "--region", "us-east-1", "--endpoint-url", sso_proxy.url + "/bedrock",
         "--model-id", "anthropic.claude-3-haiku-20240307-v1:0",
         "--messages", json.dumps([{"role": "user", "content": [{"text": "hi"}]}])],
        env=aws_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["output"]["message"]["content"][0]["text"]

    if CLAUDE.exists():  # Claude Code asks the helper for its key
        home = tmp_path / "home"
        (home / ".claude").mkdir(parents=True)
        (home / ".claude" / "settings.json").write_text(
            json.dumps({"apiKeyHelper": f"{BIN} token"})
        )
        claude_env = {
            **env,
            "HOME": str(home),
            "ANTHROPIC_BASE_URL": sso_proxy.url + "/bedrock/anthropic",
            "ANTHROPIC_MODEL": "anthropic.claude-3-haiku-20240307-v1:0",
            "ANTHROPIC_DEFAULT_HAIKU_MODEL": "anthropic.claude-3-haiku-20240307-v1:0",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_TELEMETRY": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        }
        done = subprocess.run(
            [str(CLAUDE), "-p", "Say hello", "--output-format", "json", "--max-turns", "1"],
            env=claude_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
        assert json.loads(done.stdout)["result"], done.stdout

    # Over the user's daily cap, every key of theirs is refused...
    assert admin(sso_proxy, "POST", "/user/update",
                 {"user_id": "eve@example.com", "max_budget": 0.0, "budget_duration": "1d"})[0] == 200  # fmt: skip
    import botocore.exceptions

    from tests.conftest import boto_client

    bearer = boto_client("bedrock-runtime", sso_proxy, key=key)
    with pytest.raises(botocore.exceptions.ClientError) as capped:
        bearer.converse(modelId="anthropic.claude-3-haiku-20240307-v1:0",
                        messages=[{"role": "user", "content": [{"text": "x"}]}])  # fmt: skip
    assert capped.value.response["Error"]["Code"] == "ServiceQuotaExceededException"
    # ...and once the user is removed, their keys and their machine's login end at once.
    assert admin(sso_proxy, "POST", "/user/delete", {"user_ids": ["eve@example.com"]})[0] == 200
    with pytest.raises(botocore.exceptions.ClientError):
        bearer.converse(modelId="anthropic.claude-3-haiku-20240307-v1:0",
                        messages=[{"role": "user", "content": [{"text": "x"}]}])  # fmt: skip
    page = Page(browser, sso_proxy)  # the console session eve signed in with ends too
    page.open("/ui/keys")
    assert page.path == "/ui/signin", page.driver.current_url
    (tmp_path / "login.json").write_text(json.dumps({**saved}))  # no cached key: ask the proxy
    failed = subprocess.run([BIN, "token"], env=env, capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0 and "403" in failed.stderr, failed.stderr


def test_a_provider_whose_keys_are_unusable_is_a_503(signer):
    import asyncio

    key, _ = signer

    async def broken() -> dict[str, Any]:
        return {"keys": [{"kty": "RSA", "kid": "good"}]}  # no modulus, no exponent

    verifier = IdTokenVerifier(SETTINGS, ["RS256"], broken, OffsetClock())
    token = jwt.encode({"alg": "RS256", "kid": "good"}, _claims(), key)
    with pytest.raises(errors.AwsError) as refused:
        asyncio.run(verifier.verify(token, "n-1"))
    assert refused.value.status == 503


def test_removed_from_the_group_ends_the_machines_keys_within_seconds(
    browser, sso_proxy, provider, tmp_path
):
    """The provider is asked again with each login's refresh token (every second here): a
    user taken out of the group that gave them a role, or out of the provider itself,
    loses their short-lived keys and their machine's token without signing in again."""
    users = json.loads(provider.users.read_text())
    gus = {"email": "gus@example.com", "groups": ["engineers"]}
    hal = {"email": "hal@example.com", "groups": ["engineers"]}
    provider.set_users({**users, "gus": gus, "hal": hal})
    import botocore.exceptions

    from tests.conftest import boto_client

    model = "anthropic.claude-3-haiku-20240307-v1:0"
    message = [{"role": "user", "content": [{"text": "hi"}]}]
    machines = {}
    for user in ("gus", "hal"):
        (tmp_path / user).mkdir()
        env = _login(browser, sso_proxy, user, tmp_path / user, keyring=user == "hal")
        bearer = boto_client("bedrock-runtime", sso_proxy, key=_cli(["token"], env).strip())
        assert bearer.converse(modelId=model, messages=message)["output"]
        machines[user] = (env, bearer)

    def ended(user: str) -> None:
        env, bearer = machines[user]
        refused = None
        for _ in range(200):  # each round is one call; the recheck runs every second
            try:
                bearer.converse(modelId=model, messages=message)
            except botocore.exceptions.ClientError as exc:
                refused = exc.response
                break
            time.sleep(0.1)
        assert refused is not None, f"{user}'s key outlived their removal by 20 s"
        assert refused["ResponseMetadata"]["HTTPStatusCode"] in (401, 403), refused
        if user == "hal":  # in the keyring, and in no file
            ring = tmp_path / user / "keyring.json"
            assert not list((tmp_path / user).rglob("login.json"))
            saved = json.loads(json.loads(ring.read_text())["bedrock-proxy/login"])
            kept = {k: saved[k] for k in ("url", "token")}  # no cached key
            ring.write_text(json.dumps({"bedrock-proxy/login": json.dumps(kept)}))
        else:
            login = tmp_path / user / "login.json"
            saved = json.loads(login.read_text())
            login.write_text(json.dumps({k: saved[k] for k in ("url", "token")}))
        failed = subprocess.run([BIN, "token"], env=env, capture_output=True, text=True, timeout=60)
        assert failed.returncode != 0 and "403" in failed.stderr, failed.stderr

    provider.set_users({**users, "gus": {**gus, "groups": []}, "hal": hal})
    ended("gus")  # out of the group...
    # ...while hal, asked about in the same rounds, still in it, keeps his key.
    assert machines["hal"][1].converse(modelId=model, messages=message)["output"]
    provider.set_users({**users, "gus": {**gus, "groups": []}})
    ended("hal")  # out of the company: the provider refuses his refresh token
    # Recorded as the proxy's own doing, on the provider's word.
    status, audit = admin(sso_proxy, "GET", "/audit/logs?actor=identity-provider-recheck")
    assert status == 200, audit
    ended = {(row["action"], row["before"]["user_id"]) for row in audit["logs"]
             if row["action"] == "key.delete"}  # fmt: skip
    assert ended == {("key.delete", "gus@example.com"), ("key.delete", "hal@example.com")}, audit


def test_values_clients_send_back_are_opened_without_scrypt():
    """Sign-in cookies and login codes come back from anyone: a forged one is a failed
    tag check under a key derived once, never a key derived for its salt (0.1 s of the
    event loop and a cache entry each, before any throttle)."""
    import base64

    from proxy.access.secretbox import SecretBox
    from proxy.server.sso import SingleSignOn

    box = SecretBox("the-server-secret-0123456789", ["an-older-secret-0123456789"])
    sso = SingleSignOn(SETTINGS, box)
    derived = len(box._derived)
    forged = "v2:" + base64.b64encode(os.urandom(16)).decode() + ":" + "A" * 60
    for value in (forged, "t1:" + "A" * 80, "t1:!!", "", "x" * 100_000):
        assert sso.unseal(value) is None
    assert len(box._derived) == derived  # no key derived for a client's value
    sealed = sso.seal({"then": "/ui/keys"}, 60)
    assert sso.unseal(sealed)["then"] == "/ui/keys"
    assert sso.unseal(sealed[:-4] + "AAAA") is None  # tampered
    # Sealed by a replica still on the older secret: opened during a rotation.
    older = SingleSignOn(SETTINGS, SecretBox("an-older-secret-0123456789"))
    assert sso.unseal(older.seal({"n": 1}, 60))["n"] == 1
    # At rest (a login's refresh token in the store): the scrypt box, not the fast one.
    stored = sso.seal({"refresh": "rt"}, 60, at_rest=True)
    assert stored.startswith("v2:") and sso.unseal(stored) is None
    assert sso.unseal(stored, at_rest=True)["refresh"] == "rt"
