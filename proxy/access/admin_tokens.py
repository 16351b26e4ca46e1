"""Admin API tokens: automation (CI, Terraform) calls the admin API with a token of its own
instead of the master key. A token has a role (``admin``, ``team-admin`` with its team,
or ``auditor``), an optional expiry, and can be revoked. It is shown once, when made; the
store keeps its SHA-256 only. It opens the admin API and nothing else: the Bedrock routes
know virtual keys only.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from ..exchange import Identity
from ..store import Store
from ..store.audit import Actor, Change
from ..wire import errors
from ..wire.clock import SYSTEM_CLOCK, Clock
from ..wire.params import parse_duration
from .roles import ADMIN, AUDITOR, MEMBER, TEAM_ADMIN

TOKEN_PREFIX = "bpat-"
_TOKEN_ROLES = (ADMIN, TEAM_ADMIN, AUDITOR)
_FIELDS = frozenset({"name", "role", "team_id", "duration"})
# The most live machine logins (``bedrock-proxy login``) one user holds.
MACHINES_PER_USER = 10


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AdminTokens:
    def __init__(self, store: Store, clock: Clock = SYSTEM_CLOCK) -> None:
        self._store = store
        self._clock = clock

    async def mint(self, body: dict[str, Any], actor: Actor) -> dict[str, Any]:
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            raise errors.validation(f"Unknown field {unknown[0]!r}")
        name, role, team = body.get("name"), body.get("role"), body.get("team_id")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise errors.validation("name is required")
        if role not in _TOKEN_ROLES:
            raise errors.validation(f"role must be one of {', '.join(_TOKEN_ROLES)}")
        if (role == TEAM_ADMIN) != isinstance(team, str) or (team is not None and not team):
            raise errors.validation("a team-admin token names its team_id; other roles none")
        now = self._clock.time()
        duration = body.get("duration")
        expires = now + parse_duration("duration", str(duration)) if duration is not None else None
        token_id = "tok-" + secrets.token_hex(8)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = {
            "token_id": token_id,
            "name": name.strip(),
            "role": role,
            "team_id": team,
            "expires_at": expires,
            "created_at": now,
            "created_by": actor.email or actor.name,
        }
        async with self._store.audit.recording(Change(actor, "token.new", token_id, after=row)):
            await self._store.admin_tokens.insert(row, token_hash(token))
        return {"token": token, **row}

    async def identify(self, token: str) -> Identity:
        """The caller a token names, or the same refusal for any token that opens nothing
        (unknown, revoked, expired): no probing."""
        row = await self._store.admin_tokens.by_hash(token_hash(token))
        now = self._clock.time()
        if (
            row is None
            or row["revoked_at"] is not None
            or (row["expires_at"] is not None and row["expires_at"] <= now)
        ):
            raise errors.access_denied(
                "The admin API token is not valid (unknown, revoked or expired)"
            )
        if row.get("email"):  # a developer machine's: its user's, a member's reach
            teams = tuple(t for t in (row.get("teams") or "").split(",") if t)
            return Identity(
                "token", key_id=row["token_id"], alias=row["name"], role=MEMBER,
                teams=teams, email=row["email"],
            )  # fmt: skip
        teams = (row["team_id"],) if row["team_id"] else ()
        return Identity(
            "token", key_id=row["token_id"], alias=row["name"], role=row["role"], teams=teams
        )

    async def mint_for_user(
        self, user: Identity, actor: Actor, days: float = 30, refresh: str | None = None
    ) -> str:
        """A developer machine's token (``bedrock-proxy login``): the user's own, with a
        member's reach whatever their role (it opens their keys only), for ``days``.
        ``refresh``: the provider's refresh token, sealed, to ask about the user's groups
        again while the token lives (never in the audit log)."""
        now = self._clock.time()
        token_id = "tok-" + secrets.token_hex(8)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = {
            "token_id": token_id,
            "name": f"login {user.email or user.key_id}",
            "role": MEMBER,
            "team_id": None,
            "expires_at": now + days * 86400,
            "created_at": now,
            "created_by": user.email or str(user.key_id),
            "email": user.email or str(user.key_id),
            "teams": list(user.teams),
        }
        async with self._store.audit.recording(Change(actor, "token.login", token_id, after=row)):
            await self._store.admin_tokens.insert({**row, "refresh": refresh}, token_hash(token))
        # A user's machines: the newest MACHINES_PER_USER logins live, the older end (a
        # machine logged in again; and each login is asked about every recheck round).
        live = [
            r for r in await self._store.admin_tokens.of_user(str(row["email"]))
            if r["expires_at"] is None or r["expires_at"] > now
        ]  # fmt: skip
        live.sort(key=lambda r: (r["created_at"], r["token_id"] == token_id))
        for old in live[: max(0, len(live) - MACHINES_PER_USER)]:
            await self.revoke(old["token_id"], actor)
        return token

    async def revoke_user(self, email: str, actor: Actor) -> list[str]:
        """Every token of a user's machines, revoked (the user was deleted)."""
        revoked = []
        for row in await self._store.admin_tokens.of_user(email):
            await self.revoke(row["token_id"], actor)
            revoked.append(row["token_id"])
        return revoked

    async def list(self) -> dict[str, Any]:
        return {"tokens": await self._store.admin_tokens.list()}

    async def revoke(self, token_id: str, actor: Actor) -> dict[str, Any]:
        before = await self._store.admin_tokens.get(token_id)
        missing = errors.AwsError(404, "ResourceNotFoundException", f"No token {token_id!r}")
        if before is None or before["revoked_at"] is not None:
            raise missing
        now = self._clock.time()
        change = Change(actor, "token.revoke", token_id, before=before, after={"revoked_at": now})
        async with self._store.audit.recording(change):
            if not await self._store.admin_tokens.revoke(token_id, now):
                raise missing  # revoked meanwhile: the row rolls back with it
        return {"revoked_tokens": [token_id]}
