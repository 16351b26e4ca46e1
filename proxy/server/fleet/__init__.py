"""Upstream routing: many AWS accounts and regions behind one proxy.

``config`` reads the ``upstreams`` setting; ``credentials`` signs for each account (roles
assumed with the caller's session tags); ``planner`` picks a pool and orders its members
(validity, health, priority, affinity); ``health`` keeps the cool-downs, shared through
Redis. ``Fleet`` ties them together for ``upstream.UpstreamClient``, which sends a request
to the first member and moves it to the next one on a throttle or failure, before the
response's first byte only.

Without ``upstreams`` there is one implicit member: the default credentials, in the
configured region or the one the client's SigV4 scope names, as before routing existed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ...exchange import Identity
from ...store import Store
from ...wire.background import stop as stop_task
from ...wire.clock import SYSTEM_CLOCK, Clock
from ...wire.endpoints import Endpoints, Upstream
from ...wire.modelids import parse_arn
from ...wire.routing import UPSTREAM_SERVICES, Service
from ...wire.sigv4 import Credentials
from ..credentials import CredentialProvider
from .config import DEFAULT_ACCOUNT, Account, FleetConfig, Member
from .credentials import FleetCredentials
from .health import Health
from .planner import Planner, serves

__all__ = ["Fleet", "FleetConfig", "Member", "Target"]
log = logging.getLogger("bedrock_proxy.upstreams")


@dataclass(frozen=True, slots=True)
class Target:
    member: Member
    upstream: Upstream


class Fleet:
    def __init__(
        self,
        config: FleetConfig,
        endpoint_overrides: dict[str, str],
        default_region: str,
        default_credentials: CredentialProvider,
        store: Store | None = None,
        clock: Clock = SYSTEM_CLOCK,
        redis_url: str | None = None,
        on_cooldown: Callable[[str], None] | None = None,
        teams_refresh_seconds: float = 5.0,
        redis_prefix: str = "bp",
    ) -> None:
        self.config = config
        self.configured = config.configured
        self._store = store
        self._teams: dict[str, str] = {}
        self._teams_every = max(teams_refresh_seconds, 0.5)
        self._teams_task: asyncio.Task[None] | None = None
        self.health = Health(
            config.cooldown_seconds,
            config.max_cooldown_seconds,
            clock,
            redis_url if config.configured else None,
            config.health_sync_seconds,
            on_cooldown,
            redis_prefix,
        )
        self.planner = Planner(config, self.health, self._teams, clock)
        self.credentials = FleetCredentials(config.accounts, default_credentials)
        self._default_account = Account(DEFAULT_ACCOUNT, (default_region,))
        self._default_endpoints = Endpoints(endpoint_overrides, default_region)
        self._endpoints = {
            name: Endpoints(account.endpoints, account.regions[0])
            for name, account in config.accounts.items()
        }
        self._legacy: dict[tuple[str, str], list[Target]] = {}

    # ------------------------------------------------------------------ where

    def targets(
        self,
        service: Service,
        client_region: str | None,
        identity: Identity | None,
        model: str | None,
        affinity: Callable[[], bytes | None],
        route_model: str | None = None,
    ) -> list[Target]:
        """The members to try, in order (one, without ``upstreams``)."""
        if not self.configured:
            return self._legacy_targets(service, client_region)
        pool = self.planner.pool_for(identity, route_model or model)
        members = self.planner.members(pool, model)
        if len(members) > 1:
            members = self.planner.order(members, affinity())
        return [self.target(m, service) for m in members]

    def holds(self, identity: Identity | None, arn: str) -> bool:
        """Is the resource ``arn`` names in the account and region of a member of the
        pool the key is routed to? Lookups made on a key's behalf stay in its pool."""
        if not self.configured:
            return True
        parsed = parse_arn(arn)
        if parsed is None:
            return False
        pool = self.planner.pool_for(identity, arn)
        return any(
            member.region == parsed.region and serves(member, arn)
            for member in self.config.pools.get(pool, ())
        )

    def member_target(self, service: Service, name: str) -> Target | None:
        """The target of the pool member named ``account/region``, in any pool."""
        for members in self.config.pools.values():
            for member in members:
                if member.name == name:
                    return self.target(member, service)
        return None

    def target(self, member: Member, service: Service) -> Target:
        endpoints = self._endpoints.get(member.account.name, self._default_endpoints)
        return Target(member, endpoints.resolve(service, member.region))

    def _legacy_targets(self, service: Service, region: str | None) -> list[Target]:
        upstream = self._default_endpoints.resolve(service, region)
        slot = (service.name, upstream.region)
        found = self._legacy.get(slot)
        if found is None or found[0].upstream is not upstream:
            found = [Target(Member(self._default_account, upstream.region), upstream)]
            if len(self._legacy) > 256:
                self._legacy.clear()
            self._legacy[slot] = found
        return found

    def simulate(self, url: str) -> None:
        """Send everything to the built-in simulator at ``url`` (``serve --simulate``)."""
        region = self._default_endpoints.default_region
        self._default_endpoints = Endpoints(
            {name: url for name in (*UPSTREAM_SERVICES, "s3")},
            region,
        )
        self._legacy.clear()

    def owner_target(self, service: Service, region: str, arn: str | None) -> Target:
        """Where a resource lives (a job, a profile, a manifest in S3): the first member
        in its region (and account, when the ARN names one) in any pool."""
        if self.configured:
            for members in self.config.pools.values():
                for member in members:
                    if member.region == region and (arn is None or serves(member, arn)):
                        return self.target(member, service)
        return self._legacy_targets(service, region)[0]

    async def credentials_for(
        self, member: Member, identity: Identity | None, patient: bool = True
    ) -> Credentials:
        return await self.credentials.get(member.account, identity, patient)

    # ------------------------------------------------------------------ teams

    def set_team_upstream(self, team_id: str, pool: str | None) -> None:
        if pool:
            self._teams[team_id] = pool
        else:
            self._teams.pop(team_id, None)

    async def _refresh_teams(self) -> None:
        assert self._store is not None
        while True:
            try:
                current = await self._store.teams.upstreams()
                self._teams.clear()
                self._teams.update(current)
            except Exception as exc:
                log.warning("could not read the teams' upstreams: %s", type(exc).__name__)
            await asyncio.sleep(self._teams_every)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if not self.configured:
            return
        await self.credentials.start()
        self.health.start()
        if self._store is not None and self._teams_task is None:
            self._teams_task = asyncio.get_running_loop().create_task(self._refresh_teams())

    async def close(self) -> None:
        await stop_task(self._teams_task)
        await self.health.close()
        await self.credentials.close()
