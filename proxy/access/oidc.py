"""Single sign-on with the company's OpenID Connect provider: who a user is, from an ID
token the provider signed, and what they may do, from their groups.

The token is verified with ``joserfc`` (never by hand) against the provider's JWKS: its
signature, by a key the JWKS names and an algorithm the provider announced (never
``none``, never an HMAC keyed with a public key), and its claims (``iss``, ``aud``, ``exp``,
``iat``, ``nonce``) with a small clock skew. A token signed by a key the cached JWKS does
not hold is the provider rotating its keys: the JWKS is read again, once, and the token
checked against the new set.

The groups claim maps to a role and to teams at every sign-in (``roles`` and ``teams``),
so a user removed from a group loses what it gave at their next sign-in (and their
machines' logins, asked again every ``recheck_seconds``, within that). A user with no
mapped group has no role: they can sign in and are told so, and reach nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jwt import ClaimsOption

from ..exchange import Identity
from ..wire import errors
from ..wire.clock import SYSTEM_CLOCK, Clock
from .roles import ADMIN, AUDITOR, MEMBER, ROLES, TEAM_ADMIN

# The clock skew allowed on exp and iat, in seconds.
LEEWAY = 60
# Strongest first: a user in several groups gets the most a group gives.
_PRECEDENCE = (ADMIN, AUDITOR, TEAM_ADMIN, MEMBER)


class OidcConfigError(ValueError):
    """The ``oidc`` setting, or the provider's discovery document, is unusable."""


@dataclass(frozen=True, slots=True)
class OidcSettings:
    issuer: str
    client_id: str
    client_secret: str
    scopes: tuple[str, ...] = ("openid", "email", "profile", "groups")
    groups_claim: str = "groups"
    email_claim: str = "email"
    # role -> the groups that give it; group -> the team it administers or belongs to.
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    teams: dict[str, str] = field(default_factory=dict)
    # How often a developer machine's login asks the provider about its user again
    # (their refresh token): a user removed from a group loses their machines' keys
    # within this many seconds.
    recheck_seconds: float = 60.0
    # The prompt sent with offline_access (OpenID Connect Core 11 asks for "consent";
    # "" leaves it out, for a provider whose users may not consent themselves).
    offline_prompt: str = "consent"

    @staticmethod
    def parse(value: dict[str, Any], env: dict[str, str]) -> OidcSettings:
        """The ``oidc`` setting; ``client_secret`` may come from ``client_secret_env`` or
        ``client_secret_file`` rather than the file itself."""
        known = {
            "issuer", "client_id", "client_secret", "client_secret_env", "client_secret_file",
            "scopes", "groups_claim", "email_claim", "roles", "teams", "recheck_seconds",
            "offline_prompt",
        }  # fmt: skip
        unknown = sorted(set(value) - known)
        if unknown:
            raise OidcConfigError(f"oidc: unknown field {unknown[0]!r}")
        for name in ("issuer", "client_id"):
            if not isinstance(value.get(name), str) or not value[name]:
                raise OidcConfigError(f"oidc.{name}: required")
        secret = value.get("client_secret")
        if value.get("client_secret_env"):
            secret = env.get(str(value["client_secret_env"]))
        elif value.get("client_secret_file"):
            try:
                with open(str(value["client_secret_file"])) as fh:
                    secret = fh.read().strip()
            except OSError as exc:
                raise OidcConfigError(f"oidc.client_secret_file: {exc}") from None
        if not isinstance(secret, str) or not secret:
            raise OidcConfigError(
                "oidc.client_secret: required (or client_secret_env, client_secret_file)"
            )
        roles = value.get("roles") or {}
        if not isinstance(roles, dict) or not set(roles) <= set(ROLES):
            raise OidcConfigError(f"oidc.roles: a map of {', '.join(ROLES)} to lists of groups")
        teams = value.get("teams") or {}
        if not isinstance(teams, dict):
            raise OidcConfigError("oidc.teams: a map of group to team_id")
        scopes = value.get("scopes") or ("openid", "email", "profile", "groups")
        recheck = value.get("recheck_seconds", 60)
        if isinstance(recheck, bool) or not isinstance(recheck, int | float) or recheck < 1:
            raise OidcConfigError("oidc.recheck_seconds: a number of seconds, at least 1")
        return OidcSettings(
            issuer=str(value["issuer"]).rstrip("/"),
            client_id=str(value["client_id"]),
            client_secret=secret,
            scopes=tuple(str(s) for s in scopes),
            groups_claim=str(value.get("groups_claim") or "groups"),
            email_claim=str(value.get("email_claim") or "email"),
            roles={r: tuple(str(g) for g in groups or ()) for r, groups in roles.items()},
            teams={str(g): str(t) for g, t in teams.items()},
            recheck_seconds=float(recheck),
            offline_prompt=str(value.get("offline_prompt", "consent") or ""),
        )

    def identity(self, claims: dict[str, Any]) -> Identity:
        """The user an ID token names: their role (the strongest their groups give, or
        none) and teams, as the groups say now."""
        raw = claims.get(self.groups_claim)
        groups = {str(g) for g in raw} if isinstance(raw, list) else set()
        role = next(
            (r for r in _PRECEDENCE if groups & set(self.roles.get(r, ()))),
            None,
        )
        teams = tuple(sorted({self.teams[g] for g in groups if g in self.teams}))
        email = claims.get(self.email_claim)
        return Identity(
            "user",
            key_id=str(claims["sub"]),
            role=role,
            teams=teams,
            email=str(email) if isinstance(email, str) else None,
        )


class IdTokenVerifier:
    """ID tokens checked against the provider's JWKS (read again when a token names a key
    it does not hold: the provider rotated its keys)."""

    def __init__(
        self,
        settings: OidcSettings,
        algorithms: list[str],
        read_jwks: Callable[[], Awaitable[dict[str, Any]]],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        # HMAC algorithms would be keyed with the client secret, and "none" is no
        # signature: neither is accepted whatever the provider announces.
        self._algorithms = [a for a in algorithms if a != "none" and not a.startswith("HS")]
        if not self._algorithms:
            raise OidcConfigError("oidc: the provider announces no asymmetric signing algorithm")
        self._settings = settings
        self._read_jwks = read_jwks
        self._clock = clock
        self._keys: KeySet | None = None

    async def verify(self, id_token: str, nonce: str | None) -> dict[str, Any]:
        """The token's claims, or an AccessDenied refusal saying what was wrong. A token
        from a refresh (``nonce`` None) carries no nonce of its own; its caller compares
        its ``sub`` (OpenID Connect Core 12.2)."""
        if self._keys is None:
            self._keys = await self._load_keys()
        try:
            token = self._decode(id_token)
        except JoseError as exc:
            if not _unknown_key(exc):
                raise _refused(exc) from None
            self._keys = await self._load_keys()
            try:
                token = self._decode(id_token)
            except JoseError as again:
                raise _refused(again) from None
        options: dict[str, ClaimsOption] = {
            "iss": {"essential": True, "value": self._settings.issuer},
            "aud": {"essential": True, "value": self._settings.client_id},
            "exp": {"essential": True},
            "iat": {"essential": True},
            "sub": {"essential": True},
        }
        if nonce is not None:
            options["nonce"] = {"essential": True, "value": nonce}
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self._clock.time()), leeway=LEEWAY, **options
        )
        try:
            registry.validate(token.claims)
        except JoseError as exc:
            raise _refused(exc) from None
        return dict(token.claims)

    async def _load_keys(self) -> KeySet:
        """The provider's keys; a key set joserfc cannot read is the provider's failure."""
        published = await self._read_jwks()
        try:
            return KeySet.import_key_set(published)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise errors.service_unavailable(
                f"The identity provider's keys are not usable: {exc}"
            ) from None

    def _decode(self, id_token: str) -> jwt.Token:
        assert self._keys is not None
        return jwt.decode(id_token, self._keys, algorithms=self._algorithms)


def _unknown_key(exc: JoseError) -> bool:
    return isinstance(exc, InvalidKeyIdError)


def _refused(exc: Exception) -> errors.AwsError:
    return errors.access_denied(f"The identity provider's ID token was refused: {exc}")
