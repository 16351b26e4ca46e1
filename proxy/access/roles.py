"""Roles: what the admin API's and the console's callers may see and change.

- ``admin``: everything (the master key is an admin).
- ``team-admin``: the keys, key limits and spend of their own teams.
- ``member``: their own keys and spend (keys whose ``user_id`` is their email).
- ``auditor``: reads everything, the audit log included; changes nothing.

A caller's role and teams come from an admin API token or, at every sign-in, from the
identity provider's groups (``access.oidc``). Every admin route and console page names
what it needs (one of the ``NEEDS``); ``Reach`` answers whether a caller has it, and
narrows what a scoped caller (a team-admin, a member) sees to their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..exchange import Identity
from ..store.audit import Actor
from ..store.records import KeyRecord
from ..wire import errors

ADMIN, TEAM_ADMIN, MEMBER, AUDITOR = "admin", "team-admin", "member", "auditor"
ROLES = (ADMIN, TEAM_ADMIN, MEMBER, AUDITOR)

# What a route needs.
READ = "read"  # keys, teams and spend: scoped to a team-admin's teams, a member's own
READ_ALL = "read-all"  # what has no team (named limits, live traffic)
KEYS = "keys"  # mint, change, regenerate and delete keys (scoped likewise)
LIMITS = "limits"  # named limits
TEAMS = "teams"  # teams' upstream routes
TOKENS = "tokens"  # admin API tokens
AUDIT = "audit"  # the audit log
MEMBERS = "members"  # who belongs to a team (a team-admin: its own teams)
NEEDS = (READ, READ_ALL, KEYS, LIMITS, TEAMS, TOKENS, AUDIT, MEMBERS)

_GRANTS = {
    ADMIN: frozenset(NEEDS),
    AUDITOR: frozenset({READ, READ_ALL, AUDIT}),
    TEAM_ADMIN: frozenset({READ, KEYS, MEMBERS}),
    # Self-service: a member's own keys, within their team's policy.
    MEMBER: frozenset({READ, KEYS}),
}


@dataclass(frozen=True, slots=True)
class Reach:
    role: str | None
    teams: frozenset[str] | None = None  # None: every team
    user: str | None = None  # a member's email: their keys only
    home_team: str | None = None  # a member's team: their keys are minted in it
    member_of: frozenset[str] = frozenset()  # a member's teams: the ones they may see

    @property
    def visible_teams(self) -> frozenset[str] | None:
        """The teams whose records and members the caller may see (None: every team)."""
        return self.member_of if self.user is not None else self.teams

    def visible(self, teams: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The team records of ``teams`` the caller may see."""
        within = self.visible_teams
        return teams if within is None else [t for t in teams if t["team_id"] in within]

    def check_team_view(self, team_id: str | None) -> None:
        visible = self.visible_teams
        if visible is not None and team_id not in visible:
            raise errors.access_denied(f"The team {team_id!r} is not one of yours")

    @property
    def scoped(self) -> bool:
        return self.teams is not None or self.user is not None

    def may(self, need: str) -> bool:
        return self.role is not None and need in _GRANTS.get(self.role, ())

    def require(self, need: str) -> None:
        if not self.may(need):
            who = f"The {self.role} role" if self.role else "This caller"
            raise errors.access_denied(f"{who} may not do this ({need})")

    def holds(self, record: KeyRecord) -> bool:
        """Whether a key is within reach (a team-admin's teams, a member's own)."""
        spec = record.spec
        if self.teams is not None and spec.team_id not in self.teams:
            return False
        return self.user is None or spec.user_id == self.user

    def check_key(self, record: KeyRecord | None) -> KeyRecord:
        """The key if within reach; one refusal whether it is out of reach or unknown, so
        a scoped caller cannot probe for another team's keys by id."""
        if record is None or not self.holds(record):
            raise errors.access_denied("No key within your reach has that id")
        return record

    def check_delete(self, record: KeyRecord) -> KeyRecord:
        """A key this caller may delete: a member not one that is blocked (deleting it
        and minting another would undo a team-admin's block)."""
        if self.user is not None and record.spec.blocked:
            raise errors.access_denied("A member may not delete a blocked key: ask a team-admin")
        return record

    def check_team(self, team_id: str | None) -> None:
        if self.teams is not None and team_id not in self.teams:
            raise errors.access_denied(f"The team {team_id!r} is not one of yours")

    def narrow(self, filters: dict[str, str]) -> dict[str, str]:
        """A listing's filters, narrowed to the caller's reach: a team-admin names one of
        their teams (their only one by default), a member sees their own."""
        out = dict(filters)
        if self.teams is not None:
            team = out.get("team_id")
            if team is None:
                if len(self.teams) != 1:
                    raise errors.validation(
                        "Name one of your teams: team_id=" + "|".join(sorted(self.teams))
                    )
                team = next(iter(self.teams))
            self.check_team(team)
            out["team_id"] = team
        if self.user is not None:
            out["user_id"] = self.user
        return out

    def check_key_body(self, body: dict[str, Any], creating: bool) -> dict[str, Any]:
        """A key's fields from a scoped caller: its team one of theirs (theirs by default
        when creating), its user themselves; a member never unblocks."""
        out = dict(body)
        if self.teams is not None:
            if creating and out.get("team_id") is None and len(self.teams) == 1:
                out["team_id"] = next(iter(self.teams))
            if creating or "team_id" in out:
                self.check_team(out.get("team_id"))
        if self.user is not None:
            if not creating and out.get("blocked") is False:
                # A block may be an admin's: its owner does not lift it.
                raise errors.access_denied(
                    "A member may block their own key, not unblock it: ask a team-admin"
                )
            out["user_id"] = self.user
            out.pop("team_id", None)  # a member's key stays in their team
            if creating and self.home_team is not None:
                out["team_id"] = self.home_team  # so the team's policy binds the key
        return out


ANYONE = Reach(None)


def reach_of(identity: Identity) -> Reach:
    if identity.is_master:
        return Reach(ADMIN)
    if identity.kind not in ("token", "user") or identity.role not in ROLES:
        return ANYONE  # a virtual key: only its own info (checked where it is read)
    teams = frozenset(identity.teams) if identity.role == TEAM_ADMIN else None
    if identity.role == MEMBER:
        home = identity.teams[0] if identity.teams else None
        user = identity.email or identity.key_id or ""
        return Reach(MEMBER, None, user, home, frozenset(identity.teams))
    return Reach(identity.role, teams, None)


def actor_of(identity: Identity, source: str | None, request_id: str | None) -> Actor:
    """Who an audit row names for a change this caller makes."""
    kind = {"master": "master", "user": "user", "token": "token"}.get(identity.kind, "key")
    name = identity.key_id or identity.kind
    return Actor(kind, name, identity.email, source, request_id)
