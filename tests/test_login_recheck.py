"""A developer machine's login asked about again (``server.login_recheck``) against a
provider whose answers the test chooses: down (the keys live on), refusing the refresh
token (they end), or answering with a rotated refresh token (kept, sealed), on both
store backends. The real provider's round trip is in ``test_sso``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from proxy.access.admin_tokens import AdminTokens, token_hash
from proxy.access.oidc import OidcSettings
from proxy.access.secretbox import SecretBox
from proxy.exchange import Identity
from proxy.server.login_recheck import LoginRecheck
from proxy.server.sso import SingleSignOn
from proxy.store import open_store
from proxy.store.audit import SYSTEM, Actor
from proxy.wire import errors
from tests.conftest import OffsetClock
from tests.helpers.ports import free_port


class Provider:
    """The token endpoint's next answer: "ok" (an ID token with ``groups``, and a new
    refresh token), "refuse" (invalid_grant) or "down" (503)."""

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "k", "use": "sig"})
        self.mode = "ok"
        self.groups = ["engineers"]
        self.sub = "gus"
        self.issued = 0
        self.issuer = ""
        self.skew = 0
        self.presented: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/jwks", self.jwks)
        app.router.add_post("/token", self.token)
        return app

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.issuer,
                "authorization_endpoint": self.issuer + "/auth",
                "token_endpoint": self.issuer + "/token",
                "jwks_uri": self.issuer + "/jwks",
                "scopes_supported": ["openid", "email", "offline_access"],
            }
        )

    async def jwks(self, request: web.Request) -> web.Response:
        return web.json_response(KeySet([self.key]).as_dict(private=False))

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        assert form["grant_type"] == "refresh_token"
        self.presented.append(str(form["refresh_token"]))
        if self.mode == "down":
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        if self.mode == "refuse":
            return web.json_response({"error": "invalid_grant"}, status=400)
        if self.mode == "misconfigured":  # the proxy's client secret, say
            return web.json_response({"error": "invalid_client"}, status=401)
        now = int(time.time()) - self.skew
        claims = {"iss": self.issuer, "aud": "bedrock-proxy", "sub": self.sub, "iat": now,
                  "exp": now + 300, "email": "gus@example.com", "groups": self.groups}  # fmt: skip
        self.issued += 1
        return web.json_response(
            {
                "id_token": jwt.encode({"alg": "RS256", "kid": "k"}, claims, self.key),
                "refresh_token": f"rt-{self.issued}",
            }
        )


@pytest.fixture
async def setup(store_settings, tmp_path) -> AsyncIterator[dict[str, Any]]:
    provider = Provider()
    runner = web.AppRunner(provider.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    provider.issuer = f"http://127.0.0.1:{port}"
    settings = OidcSettings(
        issuer=provider.issuer, client_id="bedrock-proxy", client_secret="s",
        roles={"member": ("engineers",)}, teams={"engineers": "ml"}, recheck_seconds=60,
    )  # fmt: skip
    clock = OffsetClock()
    sso = SingleSignOn(settings, SecretBox("server-secret-for-tests-0123456789"), clock)
    await sso.start()
    store = open_store(store_settings.get("database_url"), store_settings.get("sqlite_path", ""))
    await store.open()
    ended: list[tuple[str, bool]] = []
    signed_in: list[Identity] = []

    async def end_user(user_id: str, actor: Actor, sessions_only: bool) -> None:
        ended.append((user_id, sessions_only))

    async def sign_in(user: Identity, actor: Actor) -> None:
        signed_in.append(user)
        if user.role is None:
            await end_user(user.email or "", actor, True)

    tokens = AdminTokens(store, clock)
    recheck = LoginRecheck(sso, store, tokens, sign_in, end_user, clock)
    user = Identity("user", key_id="gus", role="member", teams=("ml",), email="gus@example.com")
    sealed = sso.seal({"sub": "gus", "refresh": "rt-0"}, 30 * 86400, at_rest=True)
    token = await tokens.mint_for_user(user, SYSTEM, 30, sealed)
    row = await store.admin_tokens.by_hash(token_hash(token))
    assert row is not None
    try:
        yield {"provider": provider, "recheck": recheck, "store": store, "clock": clock,
               "ended": ended, "signed_in": signed_in, "sso": sso, "token_id": row["token_id"]}  # fmt: skip
    finally:  # every login of this test's user ends with it
        for live in await store.admin_tokens.of_user("gus@example.com"):
            await store.admin_tokens.revoke(live["token_id"], clock.time())
        await store.close()
        await sso.close()
        await runner.cleanup()


async def _stored_refresh(s: dict[str, Any]) -> str:
    now = s["clock"].time()
    rows = await s["store"].admin_tokens.due(now + 1, now, s["token_id"])
    opened = s["sso"].unseal(rows[0]["refresh"], at_rest=True)
    assert opened is not None and opened["sub"] == "gus"
    return str(opened["refresh"])


async def test_a_login_asked_again_is_kept_with_its_rotated_refresh_token(setup):
    s = setup
    await s["recheck"].sweep()
    assert s["signed_in"] == []  # not due: asked at login
    s["clock"].advance(61)
    await s["recheck"].sweep()
    assert [u.role for u in s["signed_in"]] == ["member"] and s["ended"] == []
    assert await _stored_refresh(s) == "rt-1"  # the provider rotated it
    await s["recheck"].sweep()  # asked just now: not again
    assert s["provider"].issued == 1
    s["clock"].advance(61)
    await s["recheck"].before_mint(s["token_id"])  # a key minted: asked first
    assert s["provider"].issued == 2 and await _stored_refresh(s) == "rt-2"


@pytest.mark.parametrize("mode", ["down", "misconfigured", "skewed"])
async def test_a_provider_that_cannot_be_asked_ends_nothing(setup, mode):
    """Down, refusing the proxy's own client, or answering with a token this server's
    clock calls expired: not the user's doing, and not a reason to end everyone's keys."""
    s = setup
    s["provider"].mode = mode
    if mode == "skewed":  # its clock an hour behind: the tokens it signs look expired
        s["provider"].mode, s["provider"].skew = "ok", 3600
    s["clock"].advance(61)
    await s["recheck"].before_mint(s["token_id"])  # no refusal: the keys live on
    await s["recheck"].sweep()
    assert s["ended"] == []
    # Skewed, the provider answered and rotated the refresh token: the new one is kept.
    assert await _stored_refresh(s) == ("rt-1" if mode == "skewed" else "rt-0")
    s["provider"].mode, s["provider"].skew = "ok", 0
    s["clock"].advance(61)
    await s["recheck"].sweep()  # asked again next round
    assert await _stored_refresh(s) == f"rt-{s['provider'].issued}" and s["ended"] == []


@pytest.mark.parametrize("change", ["refuse", "no-group", "other-subject"])
async def test_a_login_the_provider_no_longer_backs_ends(setup, change):
    s = setup
    if change == "refuse":
        s["provider"].mode = "refuse"
    elif change == "no-group":
        s["provider"].groups = []
    else:  # an ID token for someone else is refused, like the provider refusing
        s["provider"].sub = "mallory"
    s["clock"].advance(61)
    with pytest.raises(errors.AwsError) as refused:
        await s["recheck"].before_mint(s["token_id"])
    assert refused.value.status == 403
    assert s["ended"] == [("gus@example.com", True)]


async def test_each_of_a_users_machines_is_asked_about_and_the_newest_ten_live(setup):
    s = setup
    from proxy.access.admin_tokens import MACHINES_PER_USER

    tokens = AdminTokens(s["store"], s["clock"])
    user = Identity("user", key_id="gus", role="member", teams=("ml",), email="gus@example.com")
    for n in range(MACHINES_PER_USER):  # ten more logins: the first one ends
        sealed = s["sso"].seal({"sub": "gus", "refresh": f"m{n}"}, 86400, at_rest=True)
        await tokens.mint_for_user(user, SYSTEM, 30, sealed)
    live = await s["store"].admin_tokens.of_user("gus@example.com")
    assert len(live) == MACHINES_PER_USER
    assert s["token_id"] not in {r["token_id"] for r in live}  # the oldest
    s["clock"].advance(61)
    await s["recheck"].sweep()  # every live one asked about, once
    assert s["provider"].issued == MACHINES_PER_USER and s["ended"] == []


async def test_a_login_sealed_with_a_dropped_secret_ends_rather_than_lives_unchecked(setup):
    s = setup
    other = SingleSignOn(s["sso"].settings, SecretBox("a-secret-since-dropped-0123456789"))
    unreadable = other.seal({"sub": "gus", "refresh": "rt-x"}, 86400, at_rest=True)
    await s["store"].admin_tokens.refreshed(s["token_id"], unreadable, ["ml"])
    s["clock"].advance(61)
    with pytest.raises(errors.AwsError):
        await s["recheck"].before_mint(s["token_id"])
    assert (await s["store"].admin_tokens.get(s["token_id"]))["revoked_at"] is not None
    assert s["provider"].issued == 0 and s["ended"] == []  # the login only, not the keys


async def test_a_login_asks_for_offline_access_with_the_prompt_configured(setup):
    from dataclasses import replace
    from urllib.parse import parse_qs, urlsplit

    s = setup
    assert s["sso"].offline  # the discovery document lists offline_access
    url, _ = s["sso"].begin("http://127.0.0.1/cb", "/ui/cli/login", offline=True)
    query = parse_qs(urlsplit(url).query)
    assert "offline_access" in query["scope"][0].split() and query["prompt"] == ["consent"]
    plain, _ = s["sso"].begin("http://127.0.0.1/cb", "/ui/keys")
    assert "offline_access" not in parse_qs(urlsplit(plain).query)["scope"][0]
    quiet = SingleSignOn(replace(s["sso"].settings, offline_prompt=""), SecretBox("x" * 32))
    await quiet.start()
    try:
        url, _ = quiet.begin("http://127.0.0.1/cb", None, offline=True)
    finally:
        await quiet.close()
    assert "prompt" not in parse_qs(urlsplit(url).query)


async def test_a_rotated_refresh_token_the_store_missed_is_used_next(setup, monkeypatch):
    """The provider rotated the token (the old one is dead) and the store did not take
    the new one: the next round presents the new one, not the dead one, and stores it."""
    from proxy.store import StoreUnavailable

    s = setup
    repository = s["store"].admin_tokens
    written = repository.refreshed

    async def blip(*args: Any) -> None:
        raise StoreUnavailable("a blip")

    monkeypatch.setattr(repository, "refreshed", blip)
    s["clock"].advance(61)
    await s["recheck"].sweep()  # rotated to rt-1; the write failed
    assert await _stored_refresh(s) == "rt-0"
    monkeypatch.setattr(repository, "refreshed", written)
    s["clock"].advance(61)
    await s["recheck"].sweep()
    assert s["provider"].presented == ["rt-0", "rt-1"] and await _stored_refresh(s) == "rt-2"
    assert s["ended"] == []
