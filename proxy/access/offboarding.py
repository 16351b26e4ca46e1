"""What ends when a user goes, or leaves a team: the keys, machine logins and console
sessions that were theirs by it. Called by the directory (a user deleted; a sign-in or a
login recheck whose groups give no role, or no longer name a team)."""

from __future__ import annotations

from ..store import Store
from ..store.audit import Actor
from .admin_tokens import AdminTokens
from .keyservice import KeyService


class Offboarding:
    def __init__(self, keys: KeyService | None, tokens: AdminTokens, store: Store) -> None:
        self._keys, self._tokens, self._store = keys, tokens, store

    async def user_gone(self, user_id: str, actor: Actor, sessions_only: bool) -> None:
        """Deleted (``sessions_only`` False: every key of theirs), or left with no role
        (the short-lived keys their machines got): their machines' logins and console
        sessions end either way."""
        if self._keys is not None:
            await self._keys.delete_user_keys(user_id, actor, sessions_only)
        await self._tokens.revoke_user(user_id, actor)
        await self._store.sessions.end_user(user_id)

    async def left_team(self, user_id: str, team_id: str, actor: Actor) -> None:
        """Out of a team their groups named: the short-lived keys they hold in it end (a
        key an admin gave them stays the admin's to move or revoke)."""
        if self._keys is not None:
            await self._keys.delete_user_keys(user_id, actor, True, team_id)
