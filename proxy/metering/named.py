"""Named limits: a budget or rate limit that applies to the keys, users and teams it lists.

``user:ID`` and ``team:ID`` limits apply to that user or team by name; any other limit to
the members it lists, and to requests by the master key that name it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..store import Store
from ..store.audit import SYSTEM, Actor, Change
from ..store.records import KeyRecord
from ..wire import errors
from ..wire.params import LIMIT_FIELDS, number_field, parse_duration
from .limits import LimitSpec

# Who a named limit applies to (besides user:ID and team:ID limits, which apply to their
# user or team by name).
MEMBER_FIELDS = ("key_ids", "user_ids", "team_ids")


# Budget periods of users' caps start at a Monday, 00:00 UTC: a "1d" cap resets at
# midnight UTC, a "7d" cap on Mondays.
CALENDAR_ANCHOR = 4 * 86400.0


@dataclass(frozen=True, slots=True)
class Directory:
    """What teams and users as records add to the limits: a team's own budget and rates
    (``team:ID``), and each user's spend cap (``user:ID``): theirs, else their team's
    member default, else the organisation's."""

    teams: dict[str, dict[str, Any]] = field(default_factory=dict)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    member_of: dict[str, list[str]] = field(default_factory=dict)  # user -> teams
    org_cap: dict[str, Any] = field(default_factory=dict)  # max_budget, budget_duration

    def cap(self, user_id: str, team_id: str | None) -> tuple[float, str | None] | None:
        """(budget, period) of a user's spend cap, or None."""
        user = self.users.get(user_id) or {}
        if user.get("max_budget") is not None:
            return float(user["max_budget"]), user.get("budget_duration")
        for team in (team_id, *self.member_of.get(user_id, ())):
            found = self.teams.get(team or "") or {}
            if found.get("team_member_budget") is not None:
                return float(found["team_member_budget"]), found.get("team_member_budget_duration")
        if self.org_cap.get("max_budget") is not None:
            return float(self.org_cap["max_budget"]), self.org_cap.get("budget_duration")
        return None


class NamedLimits:
    """The named limits, and who each applies to."""

    def __init__(self, rows: list[dict[str, Any]], directory: Directory | None = None) -> None:
        self.specs: dict[str, LimitSpec | None] = {}
        self._members: dict[tuple[str, str], list[str]] = {}
        self.directory = directory or Directory()
        for row in rows:
            limit_id = row["limit_id"]
            scope, _, ident = limit_id.partition(":")
            if scope in ("user", "team") and ident:
                self.specs[limit_id] = limit_spec(scope, ident, row, row["created_at"])
                self._members.setdefault((scope, ident), []).append(limit_id)
            else:
                self.specs[limit_id] = limit_spec("limit", limit_id, row, row["created_at"])
            for scope, field_name in (
                ("key", "key_ids"),
                ("user", "user_ids"),
                ("team", "team_ids"),
            ):
                for member in row.get(field_name) or ():
                    self._members.setdefault((scope, member), []).append(limit_id)

        for team_id, team in self.directory.teams.items():
            limit_id = f"team:{team_id}"
            if limit_id not in self.specs:  # a named team:ID limit is the operator's word
                spec = limit_spec("team", team_id, team, CALENDAR_ANCHOR)
                if spec is not None:
                    self.specs[limit_id] = spec
                    self._members.setdefault(("team", team_id), []).append(limit_id)

    def member_of(self, record: KeyRecord) -> list[str]:
        found = list(self._members.get(("key", record.key_id), ()))
        for scope, ident in (("user", record.spec.user_id), ("team", record.spec.team_id)):
            if ident:
                found += [i for i in self._members.get((scope, ident), ()) if i not in found]
        user_id = record.spec.user_id
        if user_id and f"user:{user_id}" not in found:
            cap = self.user_cap(user_id, record.spec.team_id)
            if cap is not None:
                found.append(f"user:{user_id}")
        return found

    def user_cap(self, user_id: str, team_id: str | None) -> LimitSpec | None:
        """A user's spend cap across all their keys, as a ``user:ID`` limit."""
        limit_id = f"user:{user_id}"
        if limit_id in self.specs:
            return self.specs[limit_id]
        found = self.directory.cap(user_id, team_id)
        if found is None:
            return None
        budget, period = found
        spec = limit_spec(
            "user",
            user_id,
            {"max_budget": budget, "budget_duration": period},
            CALENDAR_ANCHOR,
        )
        self.specs[limit_id] = spec
        return spec


class NamedLimitAdmin:
    """Create, change, read and delete named limits (the admin API's ``/limit/*``)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def upsert_limit(
        self, body: dict[str, Any], create: bool, actor: Actor = SYSTEM
    ) -> dict[str, Any]:
        limit_id = body.get("limit_id")
        if not isinstance(limit_id, str) or not limit_id or len(limit_id) > 200:
            raise errors.validation("limit_id is required (e.g. project-x, user:alice, team:ml)")
        existing = await self._store.limits.get(limit_id)
        if create and existing is not None:
            raise errors.validation(f"limit {limit_id!r} already exists")
        if not create and existing is None:
            raise errors.AwsError(404, "ResourceNotFoundException", f"No limit {limit_id!r}")
        fields = (*LIMIT_FIELDS, *MEMBER_FIELDS)
        spec = {k: existing[k] for k in fields if existing and k in existing}
        for name, value in body.items():
            if name == "limit_id":
                continue
            if name in MEMBER_FIELDS:
                if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                    raise errors.validation(f"{name} must be a list of ids")
                spec[name] = value
                continue
            if name not in LIMIT_FIELDS:
                raise errors.validation(f"Unknown field {name!r}")
            spec[name] = _limit_value(name, value)
        action = "limit.new" if create else "limit.update"
        change = Change(actor, action, limit_id, before=existing)
        async with self._store.audit.recording(change):
            await self._store.limits.upsert(limit_id, spec)
            change.after = await self._store.limits.get(limit_id)
        return change.after or {}

    async def limit_info(self, limit_id: str) -> dict[str, Any]:
        found = await self._store.limits.get(limit_id)
        if found is None:
            raise errors.AwsError(404, "ResourceNotFoundException", f"No limit {limit_id!r}")
        return found

    async def list_limits(self) -> dict[str, Any]:
        return {"limits": await self._store.limits.list()}

    async def delete_limit(self, limit_id: str, actor: Actor = SYSTEM) -> dict[str, Any]:
        existing = await self._store.limits.get(limit_id)
        missing = errors.AwsError(404, "ResourceNotFoundException", f"No limit {limit_id!r}")
        if existing is None:
            raise missing
        # A limit deleted meanwhile: the refusal rolls the audit row back with it.
        async with self._store.audit.recording(Change(actor, "limit.delete", limit_id, existing)):
            if not await self._store.limits.delete(limit_id):
                raise missing
        return {"deleted_limits": [limit_id]}


def limit_spec(scope: str, ident: str, fields: dict[str, Any], anchor: float) -> LimitSpec | None:
    values = {name: fields.get(name) for name in LIMIT_FIELDS}
    if all(v is None for v in values.values()):
        return None
    duration = values["budget_duration"]
    return LimitSpec(
        scope=scope,
        id=ident,
        rpm=values["rpm_limit"],
        tpm=values["tpm_limit"],
        max_parallel=values["max_parallel_requests"],
        max_budget=values["max_budget"],
        budget_seconds=parse_duration("budget_duration", duration) if duration else None,
        anchor=anchor,
    )


def _limit_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "budget_duration":
        if not isinstance(value, str):
            raise errors.validation("budget_duration must be a string like 30d")
        parse_duration(name, value)
        return value
    return number_field(name, value, float if name == "max_budget" else int)
