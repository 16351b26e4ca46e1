"""The console's single sign-on: OpenID Connect's authorization code flow with PKCE,
``state`` and ``nonce``, against the provider in the ``oidc`` setting.

The provider's discovery document is read at start-up (a wrong issuer, an unreachable
provider or a document without what the flow needs is a one-line error). A sign-in keeps
nothing on the server until it succeeds: its state, nonce and PKCE verifier travel in a
short-lived cookie sealed with the server's secret, used once. The code is exchanged at
the token endpoint with the client's secret; the ID token is verified by
``access.oidc.IdTokenVerifier``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson

from ..access.oidc import IdTokenVerifier, OidcConfigError, OidcSettings
from ..access.secretbox import SecretBox, SecretBoxError
from ..exchange import Identity
from ..wire import errors
from ..wire.clock import SYSTEM_CLOCK, Clock

PENDING_COOKIE = "bp_sso"
# How long a sign-in may take at the provider.
PENDING_SECONDS = 600
_TIMEOUT = aiohttp.ClientTimeout(total=10)


class GrantRefused(errors.AwsError):
    """The provider says a grant is gone (RFC 6749 5.2, ``invalid_grant``)."""

    def __init__(self, message: str) -> None:
        super().__init__(403, "AccessDeniedException", message)


class RefreshUnverified(errors.AwsError):
    """A refresh answered with an ID token that does not verify: nothing is known of the
    user, but the refresh token to use next (``following``) must be kept."""

    def __init__(self, message: str, following: str) -> None:
        super().__init__(503, "ServiceUnavailableException", message)
        self.following = following


class SingleSignOn:
    def __init__(self, settings: OidcSettings, box: SecretBox, clock: Clock = SYSTEM_CLOCK):
        self.settings = settings
        self._box = box
        self._transient = box.transient()
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._discovery: dict[str, Any] = {}
        self._verifier: IdTokenVerifier | None = None

    async def start(self) -> None:
        """Read the discovery document; OidcConfigError, in one line, if it is unusable."""
        self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        issuer = self.settings.issuer
        url = issuer + "/.well-known/openid-configuration"
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    raise OidcConfigError(f"oidc: {url} answered {response.status}")
                document = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise OidcConfigError(f"oidc: cannot read {url}: {type(exc).__name__}: {exc}") from None
        if not isinstance(document, dict) or document.get("issuer", "").rstrip("/") != issuer:
            raise OidcConfigError(f"oidc: {url} names another issuer than {issuer!r}")
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(document.get(name), str):
                raise OidcConfigError(f"oidc: the discovery document has no {name}")
        self._discovery = document
        algorithms = document.get("id_token_signing_alg_values_supported") or ["RS256"]
        self._verifier = IdTokenVerifier(self.settings, list(algorithms), self._jwks, self._clock)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def offline(self) -> bool:
        """Whether the provider can hand out refresh tokens (``offline_access``): a
        provider that does not say which scopes it supports is asked anyway."""
        supported = self._discovery.get("scopes_supported")
        return not isinstance(supported, list) or "offline_access" in supported

    def begin(
        self, redirect_uri: str, then: str | None = None, offline: bool = False
    ) -> tuple[str, str]:
        """Where to send the browser, and the sealed cookie that remembers the sign-in
        (and the console page to go on to, ``then``). ``offline`` asks for a refresh
        token as well (``bedrock-proxy login``: the groups are asked again with it while
        the machine holds its token); OpenID Connect Core 11 wants ``prompt=consent``
        (``offline_prompt``)."""
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        scopes = [s for s in self.settings.scopes if s != "offline_access"]
        query = {
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join([*scopes, "offline_access"] if offline else scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
        }
        if offline and self.settings.offline_prompt:
            query["prompt"] = self.settings.offline_prompt
        pending = {"state": state, "nonce": nonce, "verifier": verifier, "then": then}
        cookie = self.seal(pending, PENDING_SECONDS)
        return self._discovery["authorization_endpoint"] + "?" + urlencode(query), cookie

    def then(self, cookie: str | None) -> str | None:
        """The console page a sign-in goes on to, if it named one."""
        try:
            then = self._pending(cookie).get("then")
        except errors.AwsError:
            return None
        return then if isinstance(then, str) else None

    async def finish(
        self, query: dict[str, str], cookie: str | None, redirect_uri: str
    ) -> tuple[Identity, str | None]:
        """The user the provider signed in, and the refresh token it gave (if any), or a
        refusal saying why not."""
        pending = self._pending(cookie)
        state = query.get("state", "")
        if not hmac.compare_digest(state.encode(), str(pending["state"]).encode()):
            raise errors.access_denied("The sign-in's state does not match: start again")
        if "error" in query:
            raise errors.access_denied(f"The identity provider refused: {query['error'][:200]}")
        code = query.get("code")
        if not code:
            raise errors.access_denied("The identity provider sent no authorization code")
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": str(pending["verifier"]),
        }
        answer = await self._token_call(form)
        assert self._verifier is not None
        claims = await self._verifier.verify(str(answer["id_token"]), str(pending["nonce"]))
        refresh = answer.get("refresh_token")
        return self.settings.identity(claims), refresh if isinstance(refresh, str) else None

    async def refresh(self, refresh_token: str, subject: str) -> tuple[Identity, str]:
        """The user as the provider sees them now, through their refresh token: their
        groups again, and the refresh token to use next (the provider may rotate it).

        ``GrantRefused`` only when the provider says the grant is gone (``invalid_grant``:
        the user, or their consent, was removed) or answers for another user. Anything
        else (the provider unreachable, the proxy's client refused, a token that does not
        verify against a skewed clock) is an ``AwsError`` that ends nothing: a
        misconfiguration must not end every developer's keys at once."""
        answer = await self._token_call(
            {"grant_type": "refresh_token", "refresh_token": refresh_token}
        )
        rotated = answer.get("refresh_token")
        following = rotated if isinstance(rotated, str) else refresh_token
        assert self._verifier is not None
        try:
            claims = await self._verifier.verify(str(answer["id_token"]), None)
        except errors.AwsError as exc:  # the provider may have rotated it all the same
            raise RefreshUnverified(exc.message, following) from None
        if claims.get("sub") != subject:  # OpenID Connect Core 12.2: the same sub
            raise GrantRefused("The identity provider answered for another user")
        return self.settings.identity(claims), following

    def seal(self, document: dict[str, Any], seconds: float, at_rest: bool = False) -> str:
        """``document`` sealed with the server's secret, good for ``seconds``: for a
        browser or the CLI to bring back (a fast box: anyone may send one), or, ``at_rest``,
        for the store (the scrypt-keyed ``SecretBox`` the keys' secrets are sealed with)."""
        plain = orjson.dumps({**document, "until": self._clock.time() + seconds}).decode()
        return self._box.seal(plain) if at_rest else self._transient.seal(plain)

    def unseal(self, sealed: str | None, at_rest: bool = False) -> dict[str, Any] | None:
        """What ``seal`` sealed, while it is good; else None."""
        try:
            box = self._box if at_rest else self._transient
            document = orjson.loads(box.open(sealed or ""))
        except (SecretBoxError, orjson.JSONDecodeError, ValueError):
            return None
        if not isinstance(document, dict) or document.get("until", 0) < self._clock.time():
            return None
        return document

    def cli_code(self, token: str, challenge: str) -> str:
        """What the browser carries back to ``bedrock-proxy login`` on its loopback port:
        the machine's token, sealed, and opened only with the verifier of ``challenge``."""
        return self.seal({"token": token, "challenge": challenge}, 300)

    def cli_token(self, code: str, verifier: str) -> str:
        """The token a code holds, for the CLI that made its challenge (and no one else)."""
        sealed = self.unseal(code)
        if sealed is None:
            raise errors.access_denied("The login code is not valid or has expired: log in again")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if not hmac.compare_digest(digest.rstrip(b"=").decode(), str(sealed["challenge"])):
            raise errors.access_denied("The login code was made for another login")
        return str(sealed["token"])

    def _pending(self, cookie: str | None) -> dict[str, Any]:
        pending = self.unseal(cookie)
        if pending is None:
            raise errors.access_denied("The sign-in expired or was already used: start again")
        return pending

    async def _token_call(self, form: dict[str, str]) -> dict[str, Any]:
        """The token endpoint's answer to ``form``, holding an ID token."""
        assert self._session is not None
        # client_secret_basic: each part form-encoded, then Basic (RFC 6749 2.3.1).
        client, secret = self.settings.client_id, self.settings.client_secret
        pair = f"{quote(client, safe='')}:{quote(secret, safe='')}"
        auth = {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
        try:
            async with self._session.post(
                self._discovery["token_endpoint"], data=form, headers=auth
            ) as response:
                answer = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise errors.service_unavailable(
                f"The identity provider's token endpoint failed: {type(exc).__name__}"
            ) from None
        if response.status != 200 or not isinstance(answer, dict) or "id_token" not in answer:
            if response.status >= 500:
                raise errors.service_unavailable(
                    f"The identity provider's token endpoint answered {response.status}"
                )
            reason = answer.get("error") if isinstance(answer, dict) else None
            message = f"The identity provider refused the grant: {reason}"
            if reason == "invalid_grant":  # the code, or the refresh token, is no more
                raise GrantRefused(message)
            raise errors.access_denied(message)
        return answer

    async def _jwks(self) -> dict[str, Any]:
        """The provider's published keys; a provider that does not answer is a 503 the
        sign-in page says, not a failure of the proxy's."""
        assert self._session is not None
        try:
            async with self._session.get(self._discovery["jwks_uri"]) as response:
                keys = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise errors.service_unavailable(
                f"The identity provider's keys could not be read: {type(exc).__name__}"
            ) from None
        if not isinstance(keys, dict):
            raise errors.service_unavailable("The identity provider's JWKS is not a key set")
        return keys
