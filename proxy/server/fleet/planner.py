"""Which pool serves a request, and in which order its members are tried.

The pool: the key's ``upstream``, else its team's, else the first route that matches
(key, team, user, model), else the default pool. The members: only those where the model
is valid (a ``us.`` profile on US regions, an ARN in its own account and region), the
healthy ones first by priority; within a priority, the conversation's member first
(affinity, so its prompt cache stays warm), the others by weight.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Mapping

from ...exchange import Identity
from ...wire import errors
from ...wire.clock import SYSTEM_CLOCK, Clock
from ...wire.modelids import parse_arn, split_profile
from .config import FleetConfig, Member
from .health import Health

# Where each cross-region profile prefix may run (a region name's start, or exact names).
_GEOGRAPHY: dict[str, tuple[str, ...]] = {
    "us.": ("us-east-", "us-west-"),
    "us-gov.": ("us-gov-",),
    "eu.": ("eu-",),
    "apac.": ("ap-",),
    "jp.": ("ap-northeast-1", "ap-northeast-3"),
    "au.": ("ap-southeast-2", "ap-southeast-4"),
    "ca.": ("ca-",),
}


log = logging.getLogger("bedrock_proxy.upstreams")


def serves(member: Member, model: str | None) -> bool:
    """May ``model`` be sent to this member at all?"""
    if not model:
        return True
    if model.startswith("arn:"):
        arn = parse_arn(model)
        if arn is None:
            return True  # not an ARN Bedrock would take: let it answer so
        if arn.region and arn.region != member.region:
            return False
        known = member.account.account_id
        return not (arn.account and known and arn.account != known)
    prefix, _ = split_profile(model)
    if prefix is None or prefix == "global.":
        return True
    allowed = _GEOGRAPHY.get(prefix, ())
    return any(member.region.startswith(a) for a in allowed)


class Planner:
    def __init__(
        self,
        config: FleetConfig,
        health: Health,
        team_upstreams: Mapping[str, str] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self._health = health
        # team id -> pool, kept current by the admin API (see TeamUpstreams)
        self._teams = team_upstreams if team_upstreams is not None else {}
        self._clock = clock
        self._random = random.Random()

    def pool_for(self, identity: Identity | None, model: str | None) -> str:
        spec = identity.spec if identity is not None else None
        if spec is not None:
            if spec.upstream:
                return spec.upstream
            if spec.team_id:
                team_pool = self._teams.get(spec.team_id)
                if team_pool:
                    return team_pool
        key_id = identity.key_id if identity is not None else None
        alias = identity.alias if identity is not None else None
        team = spec.team_id if spec is not None else None
        user = spec.user_id if spec is not None else None
        for route in self.config.routes:
            if route.matches(key_id, alias, team, user, model):
                return route.pool
        return self.config.default_pool

    def members(self, pool: str, model: str | None) -> list[Member]:
        """The pool's members that can serve ``model``, or an AWS-shaped refusal."""
        members = self.config.pools.get(pool)
        if members is None:
            raise errors.service_unavailable(f"The upstream pool {pool!r} is not configured")
        valid = [m for m in members if serves(m, model)]
        if not valid:
            # The pools, their accounts and regions are the operator's, not the caller's:
            # the log has them (a key could map the routing by probing models).
            log.info(
                "no member of pool %s (regions %s) can serve %s",
                pool,
                ", ".join(sorted({m.region for m in members})),
                model,
            )
            raise errors.validation(f"No upstream this key may use can serve {model!r}")
        return valid

    def order(self, members: list[Member], affinity: bytes | None) -> list[Member]:
        """Healthy members by priority, each priority by affinity or weight; the ones
        cooling down last, soonest back first (tried only if all else fails)."""
        if len(members) == 1:
            return members
        now = self._clock.time()
        healthy = [m for m in members if self._health.available(m.name, now)]
        cooling = sorted(
            (m for m in members if not self._health.available(m.name, now)),
            key=lambda m: self._health.cooling_until(m.name),
        )
        if affinity is not None and self.config.affinity:
            scores = {m.name: _rendezvous(affinity, m) for m in healthy}
        else:
            scores = {m.name: _weighted_draw(self._random.random(), m.weight) for m in healthy}
        healthy.sort(key=lambda m: (m.priority, -scores[m.name]))
        return healthy + cooling


def _rendezvous(affinity: bytes, member: Member) -> float:
    """Weighted rendezvous hashing: each conversation has a stable first choice, and
    removing a member moves only the conversations it held."""
    digest = hashlib.blake2b(affinity + member.name.encode(), digest_size=8).digest()
    uniform = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)
    return _weighted_draw(uniform, member.weight)


def _weighted_draw(uniform: float, weight: float) -> float:
    # -w / ln(u): the largest score wins with probability proportional to its weight.
    return -weight / math.log(uniform) if 0 < uniform < 1 else math.inf
