"""Named limits: a budget or rate limit that applies to the keys, users and teams it lists.

``user:ID`` and ``team:ID`` limits apply to that user or team by name; any other limit to
the members it lists, and to requests by the master key that name it.
"""

from __future__ import annotations

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


class NamedLimits:
    """The named limits, and who each applies to."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.specs: dict[str, LimitSpec | None] = {}
        self._members: dict[tuple[str, str], list[str]] = {}
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

    def member_of(self, record: KeyRecord) -> list[str]:
        found = list(self._members.get(("key", record.key_id), ()))
        for scope, ident in (("user", record.spec.user_id), ("team", record.spec.team_id)):
            if ident:
                found += [i for i in self._members.get((scope, ident), ()) if i not in found]
        return found


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
