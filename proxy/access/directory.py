"""Teams and users as records, with LiteLLM's field names where LiteLLM has them.

A team: its alias, the models it may use, its own budget and rate limits, its upstream
pool, and its policy for keys (``key_max_budget``, ``key_rpm_limit``, ``key_tpm_limit``,
``key_max_duration``, ``key_operation_groups``, and ``key_allow_lists``, the allow-lists
they stay within) and for its members' spend (``team_member_budget`` per
``team_member_budget_duration``). A user: an email, a role, teams, and their own spend
cap (``max_budget`` per ``budget_duration``), which overrides their team's and the
organisation's default.

The policy binds whoever mints or changes a key of the team (``check_key``): a
team-admin cannot hand out more than it allows, and neither can an admin without first
changing the team. Every change is audited.
"""

from __future__ import annotations

import fnmatch
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from ..exchange import Identity
from ..store import Store
from ..store.audit import Actor, Change
from ..store.records import ALLOW_LIST_FIELDS, DEFAULT_GROUPS, KeySpec
from ..wire import errors
from ..wire.params import parse_duration
from .roles import TEAM_ADMIN

_TEAM_NUMBERS = ("max_budget", "key_max_budget", "team_member_budget")
_TEAM_INTS = ("tpm_limit", "rpm_limit", "key_rpm_limit", "key_tpm_limit")
_TEAM_DURATIONS = (
    "budget_duration",
    "key_max_duration",
    "key_session_duration",
    "team_member_budget_duration",
)
_TEAM_LISTS = ("models", "key_operation_groups")
_TEAM_FIELDS = frozenset(
    {"team_id", "team_alias", "metadata", "blocked", "upstream", "members_with_roles",
     "key_allow_lists", *_TEAM_NUMBERS, *_TEAM_INTS, *_TEAM_DURATIONS, *_TEAM_LISTS}
)  # fmt: skip
_USER_FIELDS = frozenset(
    {"user_id", "user_email", "user_role", "teams", "max_budget", "budget_duration",
     "metadata"}
)  # fmt: skip
MEMBER_ROLES = ("admin", "user")


class Directory:
    def __init__(
        self,
        store: Store,
        check_upstream: Callable[[str | None], None] | None,
        on_change: Callable[[], None] | None = None,
        on_team_upstream: Callable[[str, str | None], None] | None = None,
        on_user_deleted: Callable[[str, Actor, bool], Awaitable[None]] | None = None,
        on_left_team: Callable[[str, str, Actor], Awaitable[None]] | None = None,
    ) -> None:
        self._on_user_deleted, self._on_left_team = on_user_deleted, on_left_team
        self._store = store
        self._check_upstream = check_upstream or _no_pools
        self._on_change = on_change
        self._on_team_upstream = on_team_upstream

    # ------------------------------------------------------------------ teams

    async def team_new(self, body: dict[str, Any], actor: Actor) -> dict[str, Any]:
        team_id = body.get("team_id") or "team-" + secrets.token_hex(6)
        if await self._store.directory.team(str(team_id)) is not None:
            raise errors.validation(f"team {team_id!r} already exists")
        return await self._put_team({**body, "team_id": team_id}, None, "team.new", actor)

    async def team_update(self, body: dict[str, Any], actor: Actor) -> dict[str, Any]:
        team_id = _id(body, "team_id")
        # (A team that exists only as a key's free-text team_id is made a record here.)
        before = await self._store.directory.team(team_id)
        return await self._put_team(body, before, "team.update", actor)

    async def _put_team(
        self, body: dict[str, Any], before: dict[str, Any] | None, action: str, actor: Actor
    ) -> dict[str, Any]:
        unknown = sorted(set(body) - _TEAM_FIELDS)
        if unknown:
            raise errors.validation(f"Unknown field {unknown[0]!r}")
        team_id = _id(body, "team_id")
        spec = {k: v for k, v in (before or {}).items() if k not in ("team_id", "upstream")}
        upstream = (before or {}).get("upstream")
        members = body.get("members_with_roles") or []
        for name, value in body.items():
            if name in ("team_id", "members_with_roles"):
                continue
            if name == "upstream":
                if value is not None and not isinstance(value, str):
                    raise errors.validation("upstream must be a string or null")
                self._check_upstream(value or None)
                upstream = value or None
                continue
            spec[name] = _team_value(name, value)
        after = {"team_id": team_id, "upstream": upstream, **spec}
        async with self._store.audit.recording(Change(actor, action, team_id, before, after)):
            await self._store.directory.put_team(team_id, spec, upstream)
            for member in _members(members):
                await self._store.directory.add_member(team_id, *member)
        self._changed()
        if self._on_team_upstream is not None and upstream != (before or {}).get("upstream"):
            self._on_team_upstream(team_id, upstream)
        return await self.team_info(team_id)

    async def team_info(self, team_id: str) -> dict[str, Any]:
        team = await self._store.directory.team(team_id)
        info = team or {"team_id": team_id, "upstream": None}
        members = await self._store.directory.members(team_id)
        return {**info, "members_with_roles": [dict(m) for m in members]}

    async def teams(self) -> list[dict[str, Any]]:
        return await self._store.directory.teams()

    async def team_delete(self, team_ids: list[str], actor: Actor) -> list[str]:
        deleted = []
        for team_id in team_ids:
            before = await self._store.directory.team(team_id)
            if before is None:
                raise errors.AwsError(404, "ResourceNotFoundException", f"No team {team_id!r}")
            async with self._store.audit.recording(Change(actor, "team.delete", team_id, before)):
                await self._store.directory.delete_team(team_id)
            deleted.append(team_id)
        self._changed()
        return deleted

    async def member_add(self, body: dict[str, Any], actor: Actor) -> dict[str, Any]:
        team_id = _id(body, "team_id")
        if await self._store.directory.team(team_id) is None:
            raise errors.AwsError(404, "ResourceNotFoundException", f"No team {team_id!r}")
        for user_id, role in _members(body.get("member")):
            change = Change(
                actor, "team.member_add", team_id, after={"user_id": user_id, "role": role}
            )
            async with self._store.audit.recording(change):
                await self._store.directory.add_member(team_id, user_id, role)
                if await self._store.directory.user(user_id) is None:
                    await self._store.directory.put_user(user_id, {"user_email": _email(user_id)})
        self._changed()
        return await self.team_info(team_id)

    async def member_delete(self, body: dict[str, Any], actor: Actor) -> dict[str, Any]:
        team_id = _id(body, "team_id")
        user_id = body.get("user_id") or body.get("user_email")
        if not isinstance(user_id, str) or not user_id:
            raise errors.validation("user_id is required")
        change = Change(actor, "team.member_delete", team_id, before={"user_id": user_id})
        async with self._store.audit.recording(change):
            if not await self._store.directory.remove_member(team_id, user_id):
                raise errors.AwsError(
                    404, "ResourceNotFoundException", f"{user_id!r} is not in {team_id!r}"
                )
        self._changed()
        return await self.team_info(team_id)

    # ------------------------------------------------------------------ users

    async def user_new(self, body: dict[str, Any], actor: Actor) -> dict[str, Any]:
        user_id = body.get("user_id") or body.get("user_email")
        if not isinstance(user_id, str) or not user_id:
            raise errors.validation("user_id (or user_email) is required")
        if await self._store.directory.user(user_id) is not None:
            raise errors.validation(f"user {user_id!r} already exists")
        return await self._put_user({**body, "user_id": user_id}, None, "user.new", actor)

    async def user_update(self, body: dict[str, Any], actor: Actor) -> dict[str, Any]:
        user_id = _id(body, "user_id")
        before = await self._store.directory.user(user_id)
        if before is None:
            raise errors.AwsError(404, "ResourceNotFoundException", f"No user {user_id!r}")
        return await self._put_user(body, before, "user.update", actor)

    async def _put_user(
        self, body: dict[str, Any], before: dict[str, Any] | None, action: str, actor: Actor
    ) -> dict[str, Any]:
        unknown = sorted(set(body) - _USER_FIELDS)
        if unknown:
            raise errors.validation(f"Unknown field {unknown[0]!r}")
        user_id = _id(body, "user_id")
        spec = {k: v for k, v in (before or {}).items() if k not in ("user_id", "created_at")}
        teams = body.get("teams")
        for name, value in body.items():
            if name in ("user_id", "teams"):
                continue
            if name == "max_budget":
                spec[name] = _number(name, value)
            elif name == "budget_duration":
                spec[name] = _duration(name, value)
            elif name == "metadata":
                if not isinstance(value, dict):
                    raise errors.validation("metadata must be an object")
                spec[name] = value
            else:
                if value is not None and not isinstance(value, str):
                    raise errors.validation(f"{name} must be a string")
                spec[name] = value
        spec.setdefault("user_email", _email(user_id))
        after = {"user_id": user_id, **spec}
        async with self._store.audit.recording(Change(actor, action, user_id, before, after)):
            await self._store.directory.put_user(user_id, spec)
            for team_id in _strings("teams", teams or []):
                await self._store.directory.add_member(team_id, user_id, "user")
        self._changed()
        return await self.user_info(user_id)

    async def user_info(self, user_id: str) -> dict[str, Any]:
        user = await self._store.directory.user(user_id)
        if user is None:
            raise errors.AwsError(404, "ResourceNotFoundException", f"No user {user_id!r}")
        teams = await self._store.directory.teams_of(user_id)
        return {**user, "teams": [t["team_id"] for t in teams]}

    async def users(self) -> list[dict[str, Any]]:
        return await self._store.directory.users()

    async def user_delete(self, user_ids: list[str], actor: Actor) -> list[str]:
        """Users deleted, their memberships with them, and their keys and their machines'
        tokens (``on_user_deleted``): a user removed ends their short-lived keys at once."""
        deleted = []
        for user_id in user_ids:
            before = await self._store.directory.user(user_id)
            if before is None:
                raise errors.AwsError(404, "ResourceNotFoundException", f"No user {user_id!r}")
            async with self._store.audit.recording(Change(actor, "user.delete", user_id, before)):
                await self._store.directory.delete_user(user_id)
            if self._on_user_deleted is not None:  # their keys and machines' tokens end
                await self._on_user_deleted(user_id, actor, False)
            deleted.append(user_id)
        self._changed()
        return deleted

    async def sign_in(self, user: Identity, actor: Actor) -> None:
        """A user signed in by the identity provider: their record (made the first time)
        and the teams their groups name, as members (team-admins as team admins); teams
        the groups named before and no longer, left. Teams joined by hand stay. A user
        whose groups no longer give a role loses their machines' tokens and short-lived
        keys (keys an admin gave them stay)."""
        user_id = user.email or user.key_id
        if not user_id:
            return
        if user.role is None:
            # Their groups give them nothing now: what their machines hold ends here.
            if self._on_user_deleted is not None:  # their machines' keys and tokens
                await self._on_user_deleted(user_id, actor, True)
            if await self._sync_teams(user_id, (), "user", actor):
                self._changed()
            return
        changed = False
        if await self._store.directory.user(user_id) is None:
            after = {"user_id": user_id, "user_email": user.email}
            async with self._store.audit.recording(Change(actor, "user.new", user_id, after=after)):
                await self._store.directory.put_user(user_id, {"user_email": user.email})
            changed = True
        role = "admin" if user.role == TEAM_ADMIN else "user"
        if await self._sync_teams(user_id, user.teams, role, actor) or changed:
            self._changed()

    async def _sync_teams(
        self, user_id: str, teams: tuple[str, ...], role: str, actor: Actor
    ) -> bool:
        """The teams the groups name now, joined; the ones they named before and no
        longer, left (memberships added by hand stay). Whether anything changed."""
        current = {t["team_id"]: t for t in await self._store.directory.teams_of(user_id)}
        changed = False
        for team_id in teams:
            held = current.get(team_id)
            if held is not None and held["role"] == role:
                continue
            member = {"user_id": user_id, "role": role}
            change = Change(actor, "team.member_add", team_id, after=member)
            async with self._store.audit.recording(change):
                if held is None:
                    await self._store.directory.add_member(team_id, user_id, role, "groups")
                else:  # by hand or by the groups, as it was; the role the groups give
                    await self._store.directory.set_role(team_id, user_id, role)
            changed = True
        for team_id, held in current.items():
            if held["source"] == "groups" and team_id not in teams:
                before = {"user_id": user_id, "role": held["role"]}
                change = Change(actor, "team.member_delete", team_id, before=before)
                async with self._store.audit.recording(change):
                    await self._store.directory.remove_member(team_id, user_id)
                if self._on_left_team is not None:  # their machines' keys in it end
                    await self._on_left_team(user_id, team_id, actor)
                changed = True
        return changed

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()


def _no_pools(pool: str | None) -> None:
    if pool is not None:
        raise errors.validation("upstream: no upstream pool is configured")


def check_key(spec: KeySpec, team: dict[str, Any] | None, now: float) -> None:
    """A key's spec within its team's policy; its open fields set to the policy's most.
    Refused (a 403 naming the field) when it asks for more than the team allows."""
    if not team:
        return
    allowed = team.get("models")
    if allowed:
        if not spec.models:
            spec.models = list(allowed)
        for model in spec.models:
            if not any(fnmatch.fnmatchcase(model, pattern) for pattern in allowed):
                raise _beyond("models", f"{model!r} is not among the team's models")
    for field, cap_name in (
        ("max_budget", "key_max_budget"),
        ("rpm_limit", "key_rpm_limit"),
        ("tpm_limit", "key_tpm_limit"),
    ):
        cap = team.get(cap_name)
        if cap is None:
            continue
        value = getattr(spec, field)
        if value is None:
            setattr(spec, field, cap)
        elif value > cap:
            raise _beyond(field, f"{value} is more than the team's {cap_name} of {cap}")
    longest = team.get("key_max_duration")
    if longest:
        until = now + parse_duration("key_max_duration", longest)
        if spec.expires_at is None:
            spec.expires_at = until
        elif spec.expires_at > until + 1:
            raise _beyond("duration", f"the team's keys last at most {longest}")
    for field, allowed in (team.get("key_allow_lists") or {}).items():
        current = getattr(spec, field)
        if current is None:  # open: the team's list
            setattr(spec, field, list(allowed))
            continue
        outside = [v for v in current if not _within(field, v, allowed)]
        if outside:
            raise _beyond(field, f"{outside[0]!r} is not among the team's {field}")
    groups = team.get("key_operation_groups")
    if groups:
        if not spec.operation_groups or spec.operation_groups == list(DEFAULT_GROUPS):
            spec.operation_groups = [g for g in spec.operation_groups if g in groups] or list(
                groups
            )
        extra = sorted(set(spec.operation_groups) - set(groups))
        if extra:
            raise _beyond("operation_groups", f"{extra[0]!r} is not among the team's groups")


def _within(field: str, value: str, allowed: list[str]) -> bool:
    """A key's allow-list entry within the team's: the same id, or for ``file_prefixes``
    a folder under one of the team's."""
    if field == "file_prefixes":
        return any(
            not (folder := a.rstrip("/")) or value.rstrip("/") == folder
            or value.startswith(folder + "/")
            for a in allowed
        )  # fmt: skip
    return value in allowed


def _allow_lists(value: Any) -> dict[str, list[str]] | None:
    """``key_allow_lists``: the allow-lists a team's keys stay within, by key field."""
    if value is None:
        return None
    if not isinstance(value, dict) or not set(value) <= set(ALLOW_LIST_FIELDS):
        raise errors.validation(
            "key_allow_lists: a map of " + ", ".join(ALLOW_LIST_FIELDS) + " to lists of ids"
        )
    return {k: _strings(f"key_allow_lists.{k}", v) for k, v in value.items() if v is not None}


def _beyond(field: str, why: str) -> errors.AwsError:
    return errors.access_denied(f"{field}: {why} (the team's policy)")


def _team_value(name: str, value: Any) -> Any:
    if name in _TEAM_NUMBERS:
        return _number(name, value)
    if name in _TEAM_INTS:
        number = _number(name, value)
        return None if number is None else int(number)
    if name in _TEAM_DURATIONS:
        return _duration(name, value)
    if name in _TEAM_LISTS:
        return None if value is None else _strings(name, value)
    if name == "key_allow_lists":
        return _allow_lists(value)
    if name == "blocked":
        if not isinstance(value, bool):
            raise errors.validation("blocked must be true or false")
        return value
    if name == "metadata":
        if not isinstance(value, dict):
            raise errors.validation("metadata must be an object")
        return value
    if value is not None and not isinstance(value, str):
        raise errors.validation(f"{name} must be a string")
    return value


def _number(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise errors.validation(f"{name} must be a number, at least 0")
    return float(value)


def _duration(name: str, value: Any) -> str | None:
    if value is None:
        return None
    parse_duration(name, str(value))
    return str(value)


def _strings(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise errors.validation(f"{name} must be a list of strings")
    return list(value)


def _id(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise errors.validation(f"{name} is required")
    return value


def _email(user_id: str) -> str | None:
    return user_id if "@" in user_id else None


def _members(value: Any) -> list[tuple[str, str]]:
    """LiteLLM's member (one, or a list): {user_id or user_email, role admin|user}."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    members = []
    for item in items:
        if not isinstance(item, dict):
            raise errors.validation("a member is {user_id, role}")
        user_id = item.get("user_id") or item.get("user_email")
        role = item.get("role", "user")
        if not isinstance(user_id, str) or not user_id or role not in MEMBER_ROLES:
            raise errors.validation("a member is {user_id (or user_email), role: admin|user}")
        members.append((user_id, role))
    return members
