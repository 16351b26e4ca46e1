"""Creating, reading, changing and revoking virtual keys: one implementation behind both
the admin API and the ``bedrock-proxy keys`` command."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection
from typing import Any

from ..exchange import Identity
from ..store import Store, StoreConflict
from ..store.audit import SYSTEM, Actor, Change
from ..wire import errors
from ..wire.clock import SYSTEM_CLOCK, Clock
from ..wire.params import MAX_PAGE, check_page
from .directory import check_key
from .keycache import KeyCache
from .keys import (
    MIN_GIVEN_TOKEN,
    TOKEN_PREFIX,
    KeyRecord,
    KeySpec,
    hash_token,
    mint_credentials,
    new_key_id,
    parse_spec,
    token_hint,
)
from .secretbox import SecretBox

# The most short-lived keys one user holds live at once (a few machines' worth).
SESSION_KEYS_PER_USER = 20
# How long an expired short-lived key is kept (its info still says it expired).
STALE_SESSION_SECONDS = 86400.0


class KeyService:
    def __init__(
        self,
        store: Store,
        box: SecretBox,
        cache: KeyCache | None = None,
        clock: Clock = SYSTEM_CLOCK,
        pools: Collection[str] = (),
        on_team_upstream: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self._clock = clock  # created_at anchors budget periods: the limits' clock
        self._pools = frozenset(pools)
        self._on_team_upstream = on_team_upstream
        self._store = store
        self._box = box
        self._cache = cache

    def check_upstream(self, pool: str | None) -> None:
        if pool is not None and pool not in self._pools:
            known = ", ".join(sorted(self._pools)) or "none is configured"
            raise errors.validation(f"upstream: {pool!r} is not an upstream pool ({known})")

    async def generate(
        self, body: dict[str, Any], actor: Actor = SYSTEM, owner: str | None = None
    ) -> dict[str, Any]:
        """A new key. ``owner``: a member minting their own (self-service), refused while a
        key of theirs is blocked."""
        now = self._clock.time()
        if owner is not None:
            _refuse_while_blocked(await self._keys_of(owner), now)
        spec = parse_spec(body, now=now)
        self.check_upstream(spec.upstream)
        await self._within_team(spec, now)
        minted = mint_credentials(_given_token(body.get("key")))
        now = self._clock.time()
        record = KeyRecord(
            key_id=new_key_id(),
            token_hash=minted.token_hash,
            token_hint=token_hint(minted.token),
            access_key_id=minted.access_key_id,
            secret_enc=self._box.seal(minted.secret_access_key),
            spec=spec,
            created_at=now,
            updated_at=now,
        )
        change = Change(actor, "key.generate", record.key_id, after=record.public())
        try:
            async with self._store.audit.recording(change):
                await self._store.keys.insert(record)
        except StoreConflict:
            raise errors.validation(f"key_alias {spec.key_alias!r} is already in use") from None
        return {
            "key": minted.token,
            "secret_access_key": minted.secret_access_key,
            **record.public(),
        }

    async def find(self, ref: str) -> KeyRecord:
        """A key by its token, its key_id, its access key id or its alias."""
        if ref.startswith(TOKEN_PREFIX):
            record = await self._store.keys.by("token_hash", hash_token(ref))
        else:
            record = await self._store.keys.by("key_id", ref)
            if record is None:
                record = await self._store.keys.by("access_key_id", ref)
            if record is None:
                record = await self._store.keys.by("key_alias", ref)
        if record is None:
            raise errors.AwsError(404, "ResourceNotFoundException", "No such key")
        return record

    async def info(self, ref: str) -> dict[str, Any]:
        record = await self.find(ref)
        return {"key": record.key_id, "info": record.public()}

    async def update(self, ref: str, body: dict[str, Any], actor: Actor = SYSTEM) -> dict[str, Any]:
        record = await self.find(ref)
        now = self._clock.time()
        spec = parse_spec(body, base=record.spec, now=now)
        self.check_upstream(spec.upstream)
        await self._within_team(spec, now)
        change = Change(actor, "key.update", record.key_id, before=record.public())
        try:
            async with self._store.audit.recording(change):
                updated = await self._store.keys.update(record.key_id, spec=spec)
                change.after = updated.public() if updated is not None else None
        except StoreConflict:
            raise errors.validation(f"key_alias {spec.key_alias!r} is already in use") from None
        self._forget(record)
        assert updated is not None
        return updated.public()

    async def session_key(self, user: Identity, actor: Actor) -> dict[str, Any]:
        """A short-lived key for a signed-in user's machine (``bedrock-proxy token``): in
        their team, for its ``key_session_duration`` (8 h unless the team says), within
        the team's policy like any key; at most ``SESSION_KEYS_PER_USER`` live at once
        (``token`` reuses its key, so a runaway loop is what this stops)."""
        email = user.email or user.key_id
        if not email:
            raise errors.access_denied("A short-lived key is for a signed-in user")
        now = self._clock.time()
        held = await self._keys_of(email)
        _refuse_while_blocked(held, now)
        sessions = [r for r in held if _is_session(r)]
        # Expired a day or more: gone (a machine mints one every few hours, and a year of
        # them would be most of the key table and of every listing of it).
        stale = [r.key_id for r in sessions if _expired(r, now - STALE_SESSION_SECONDS)]
        if stale:
            await self.delete(stale, actor=SYSTEM)
        live = [r for r in sessions if r.refusal(now) is None]
        if len(live) >= SESSION_KEYS_PER_USER:
            raise errors.access_denied(
                f"You hold {len(live)} live short-lived keys, the most one user may: delete "
                "one (the console's Keys page) or wait for one to expire"
            )
        team_id = user.teams[0] if user.teams else None
        team = await self._store.directory.team(team_id) if team_id else None
        lifetime = (team or {}).get("key_session_duration") or "8h"
        body: dict[str, Any] = {
            "user_id": email,
            "key_alias": f"session-{secrets.token_hex(6)}",
            "duration": lifetime,
            "metadata": {"session": True},
        }
        if team_id:
            body["team_id"] = team_id
        return await self.generate(body, actor)

    async def delete_user_keys(
        self, user_id: str, actor: Actor, sessions_only: bool = False, team: str | None = None
    ) -> list[str]:
        """A user's keys, deleted: every one (the user was), or only the short-lived keys
        their machines got (their groups no longer give them a role), or only those in
        ``team`` (the groups no longer name it)."""
        records = await self._keys_of(user_id)
        if sessions_only:
            records = [r for r in records if _is_session(r)]
        if team is not None:
            records = [r for r in records if r.spec.team_id == team]
        return await self.delete([r.key_id for r in records], actor=actor)

    async def _keys_of(self, user_id: str) -> list[KeyRecord]:
        """Every key of a user, page by page (a user may hold more than a page)."""
        records: list[KeyRecord] = []
        while True:
            page, total = await self._store.keys.list({"user_id": user_id}, MAX_PAGE, len(records))
            records += page
            if not page or len(records) >= total:
                return records

    async def _within_team(self, spec: KeySpec, now: float) -> None:
        """The team's policy, whoever mints or changes the key (``directory.check_key``)."""
        if spec.team_id:
            check_key(spec, await self._store.directory.team(spec.team_id), now)

    async def regenerate(self, ref: str, actor: Actor = SYSTEM) -> dict[str, Any]:
        """New bearer token and access key pair; the old ones stop working."""
        record = await self.find(ref)
        minted = mint_credentials()
        change = Change(actor, "key.regenerate", record.key_id, before=record.public())
        async with self._store.audit.recording(change):
            updated = await self._store.keys.update(
                record.key_id,
                credentials=(
                    minted.token_hash,
                    token_hint(minted.token),
                    minted.access_key_id,
                    self._box.seal(minted.secret_access_key),
                ),
            )
            change.after = updated.public() if updated is not None else None
        self._forget(record)
        assert updated is not None
        return {
            "key": minted.token,
            "secret_access_key": minted.secret_access_key,
            **updated.public(),
        }

    async def find_alias(self, alias: str) -> KeyRecord:
        """A key by its alias alone (LiteLLM's ``key_aliases``)."""
        record = await self._store.keys.by("key_alias", alias)
        if record is None:
            raise errors.AwsError(404, "ResourceNotFoundException", f"No key has alias {alias!r}")
        return record

    async def delete(
        self, refs: list[str], aliases: list[str] | None = None, actor: Actor = SYSTEM
    ) -> list[str]:
        """Delete the keys ``refs`` name (token, id, access key id or alias) and those
        ``aliases`` name as aliases only."""
        records = [await self.find(ref) for ref in refs]
        records += [await self.find_alias(alias) for alias in aliases or ()]
        deleted = []
        for record in records:
            change = Change(actor, "key.delete", record.key_id, before=record.public())
            try:
                async with self._store.audit.recording(change):
                    if not await self._store.keys.delete(record.key_id):
                        raise _Unchanged  # deleted meanwhile: no change, no row
            except _Unchanged:
                continue
            self._forget(record)
            deleted.append(record.key_id)
        return deleted

    async def list(
        self, filters: dict[str, str], page: int, size: int, full: bool
    ) -> dict[str, Any]:
        check_page(page, size)
        records, total = await self._store.keys.list(filters, size, (page - 1) * size)
        return {
            "keys": [r.public() if full else r.key_id for r in records],
            "total_count": total,
            "current_page": page,
            "total_pages": (total + size - 1) // size,
        }

    # ------------------------------------------------------------------ teams

    async def set_team(self, body: dict[str, Any], actor: Actor = SYSTEM) -> dict[str, Any]:
        """A team's settings: the upstream pool its keys use when they name none."""
        team_id = body.get("team_id")
        if not isinstance(team_id, str) or not team_id or len(team_id) > 256:
            raise errors.validation("team_id must be a non-empty string")
        unknown = sorted(set(body) - {"team_id", "upstream"})
        if unknown:
            raise errors.validation(f"Unknown field {unknown[0]!r}")
        pool = body.get("upstream")
        if pool is not None and not isinstance(pool, str):
            raise errors.validation("upstream must be a string or null")
        self.check_upstream(pool)
        before = await self._store.teams.get(team_id)
        change = Change(actor, "team.update", team_id, before=before, after={"upstream": pool})
        async with self._store.audit.recording(change):
            await self._store.teams.set_upstream(team_id, pool)
        if self._on_team_upstream is not None:
            self._on_team_upstream(team_id, pool)
        return {"team_id": team_id, "upstream": pool}

    async def team_info(self, team_id: str) -> dict[str, Any]:
        found = await self._store.teams.get(team_id)
        return {"team_id": team_id, "upstream": found["upstream"] if found else None}

    async def teams(self) -> dict[str, Any]:
        return {
            "teams": [
                {"team_id": t["team_id"], "upstream": t["upstream"]}
                for t in await self._store.teams.list()
            ]
        }

    async def reseal_secrets(self) -> int:
        """After a secret_key rotation: seal every SigV4 secret under the current key."""
        count = 0
        page = 1
        while True:
            records, _ = await self._store.keys.list({}, MAX_PAGE, (page - 1) * MAX_PAGE)
            for record in records:
                if self._box.needs_reseal(record.secret_enc):
                    plaintext = self._box.open(record.secret_enc)
                    await self._store.keys.reseal_secret(record.key_id, self._box.seal(plaintext))
                    count += 1
            if len(records) < MAX_PAGE:
                return count
            page += 1

    def _forget(self, record: KeyRecord) -> None:
        if self._cache is not None:
            self._cache.forget(record)


class _Unchanged(Exception):
    """Raised inside an audited block that turned out to change nothing: rolls back."""


def _given_token(value: Any) -> str | None:
    """LiteLLM's ``key``: the new key's own value, when long enough to be a secret."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) < MIN_GIVEN_TOKEN or not value.isprintable():
        raise errors.validation(
            f"key: a key's own value must be at least {MIN_GIVEN_TOKEN} printable characters"
        )
    if value.startswith(("vk_", "BPK", "bpat-")):
        raise errors.validation("key: must not look like a key id, an access key id or a token")
    return value


def _refuse_while_blocked(held: list[KeyRecord], now: float) -> None:
    """A member mints nothing while a key of theirs is blocked: a new key would undo the
    block."""
    if any(r.spec.blocked and not _expired(r, now) for r in held):
        raise errors.access_denied(
            "A key of yours is blocked: ask a team-admin (a new one would undo the block)"
        )


def _expired(record: KeyRecord, now: float) -> bool:
    return record.spec.expires_at is not None and now >= record.spec.expires_at


def _is_session(record: KeyRecord) -> bool:
    """A developer machine's short-lived key (``session_key``)."""
    return (record.spec.metadata or {}).get("session") is True
