"""Developer machines' logins asked about again: a user removed from the identity
provider, or from the groups that gave them a role, loses their machines' tokens and
short-lived keys within ``oidc.recheck_seconds``, not at their next sign-in.

``bedrock-proxy login`` keeps the provider's refresh token with the machine's token
(sealed with the server's secret). Every ``recheck_seconds`` each live one is used: the
provider answers with a new ID token, whose groups are mapped again as at a sign-in
(``Directory.sign_in``: no role left ends the machines' keys and tokens), or refuses it
(the user or their grant was removed), which ends them too. ``bedrock-proxy token`` asks
first whenever the last answer is older than that. A provider that cannot be asked ends
nothing: the keys already minted live on, and it is asked again next round.

Replicas share the work: each login is claimed (its ``checked_at`` moved on by the one
replica whose conditional update succeeded) before it is asked about.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..access.admin_tokens import AdminTokens
from ..exchange import Identity
from ..store import Store, StoreUnavailable
from ..store.audit import Actor
from ..wire import errors
from ..wire.clock import SYSTEM_CLOCK, Clock
from .sso import GrantRefused, RefreshUnverified, SingleSignOn

log = logging.getLogger("bedrock_proxy")

_RECHECK = Actor("system", "identity-provider-recheck")
# How many logins are asked about at once.
_AT_ONCE = 8


class LoginRecheck:
    def __init__(
        self,
        sso: SingleSignOn,
        store: Store,
        tokens: AdminTokens,
        sign_in: Callable[[Identity, Actor], Awaitable[None]],
        end_user: Callable[[str, Actor, bool], Awaitable[None]],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._sso, self._store, self._tokens, self._clock = sso, store, tokens, clock
        self._sign_in, self._end_user = sign_in, end_user
        self.interval = sso.settings.recheck_seconds
        # Refresh tokens the provider rotated that the store did not take (a blip): the
        # old ones no longer work, so these are used until written.
        self._unwritten: dict[str, str] = {}

    async def run(self) -> None:
        """The background round, every ``interval`` seconds, for as long as it runs."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except StoreUnavailable as exc:
                log.warning("login recheck: the store is unavailable: %s", exc)
            except Exception:  # the next round tries again: the loop itself must live on
                log.exception("login recheck: a round failed")

    async def sweep(self) -> None:
        """Every login not asked about for ``interval``, a few at a time (a slow provider
        answering one login does not hold the others back)."""
        now = self._clock.time()
        rows = await self._store.admin_tokens.due(now - self.interval, now)
        gate = asyncio.Semaphore(_AT_ONCE)

        async def check(row: dict[str, Any]) -> None:
            async with gate:
                await self._check(row)

        for failed in await asyncio.gather(*(check(r) for r in rows), return_exceptions=True):
            if isinstance(failed, Exception):
                log.warning("login recheck: %r", failed)

    async def before_mint(self, token_id: str) -> None:
        """Before a machine's token mints a key: asked about now, if not lately; refused
        (403) if the user no longer has a role here."""
        now = self._clock.time()
        for row in await self._store.admin_tokens.due(now - self.interval, now, token_id):
            if not await self._check(row):
                raise errors.access_denied(
                    "The identity provider no longer gives you a role here: your login "
                    "has ended (run bedrock-proxy login again once it does)"
                )

    async def _check(self, row: dict[str, Any]) -> bool:
        """Whether the login lives on (ended here if the provider says it should not)."""
        now = self._clock.time()
        if not await self._store.admin_tokens.claim(row["token_id"], row["checked_at"], now):
            return True  # another replica is asking
        sealed = self._sso.unseal(row["refresh"], at_rest=True)
        if sealed is None or not isinstance(sealed.get("refresh"), str):
            # Sealed with a secret since dropped from previous_secret_keys: it can no longer
            # be asked about, so it ends (the machine logs in again), not lives unchecked.
            log.warning("login recheck: %s's login cannot be opened; ended", row["email"])
            await self._tokens.revoke(row["token_id"], _RECHECK)
            return False
        # A rotated token this process could not write yet (a store blip) is the one to use.
        sealed["refresh"] = self._unwritten.get(row["token_id"], sealed["refresh"])
        try:
            user, refresh = await self._sso.refresh(sealed["refresh"], str(sealed["sub"]))
        except GrantRefused as exc:  # the user, or their grant, is gone
            log.warning("login recheck: %s's login ended: %s", row["email"], exc.message)
            await self._end_user(row["email"], _RECHECK, True)
            return False
        except RefreshUnverified as exc:  # the user unknown, but the token may have turned
            log.warning("login recheck: %s: %s", row["email"], exc.message)
            await self._keep(row, sealed, exc.following, None, now)
            return True
        except errors.AwsError as exc:  # not the user's doing: ask again next round
            log.warning("login recheck: %s: %s", row["email"], exc.message)
            return True
        await self._keep(row, sealed, refresh, list(user.teams), now)  # first: it may turn
        await self._sign_in(user, _RECHECK)  # no role: the machines' keys end there
        return user.role is not None

    async def _keep(
        self,
        row: dict[str, Any],
        sealed: dict[str, Any],
        refresh: str,
        teams: list[str] | None,
        now: float,
    ) -> None:
        """The refresh token to use next (the provider may rotate it on every use: the
        one just used no longer works), and the teams the groups give now."""
        token_id = row["token_id"]
        if refresh == sealed["refresh"] and teams is None and token_id not in self._unwritten:
            return
        self._unwritten[token_id] = refresh  # until the store has it
        resealed = self._sso.seal(
            {**sealed, "refresh": refresh}, sealed["until"] - now, at_rest=True
        )
        current = [t for t in (row.get("teams") or "").split(",") if t]
        await self._store.admin_tokens.refreshed(
            token_id, resealed, current if teams is None else teams
        )
        del self._unwritten[token_id]
