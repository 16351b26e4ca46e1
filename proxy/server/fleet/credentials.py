"""Credentials per upstream account: the default chain, a profile, or a role assumed
through STS (aiobotocore's own fetcher), with session tags taken from the calling key.

Each distinct (account, tags) pair has its own provider, so a team's requests are signed
with its own role session and land in the Cost and Usage Report under its tags. Providers
refresh in the background before expiry (``CredentialProvider``); only the first request
of a new tag set waits for STS.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.credentials import (
    AioAssumeRoleCredentialFetcher,
    AioDeferredRefreshableCredentials,
)
from aiobotocore.session import AioSession

from ...exchange import Identity
from ...wire.sigv4 import Credentials
from ..credentials import STS_TIMEOUT, CredentialProvider
from .config import Account, AssumeRole

# Tag sets kept at once (each a role session); keys are authenticated, so this bounds
# only a very large fleet of teams, which then re-assume on the next use.
_MAX_TAGGED = 1024
# What STS accepts in a session tag value; anything else becomes "_".
_TAG_VALUE_UNSAFE = re.compile(r"[^\w .:/=+@-]")


class FleetCredentials:
    def __init__(self, accounts: dict[str, Account], default: CredentialProvider) -> None:
        self._default = default
        self._accounts = accounts
        self._untagged: dict[str, CredentialProvider] = {}
        self._starting: list[asyncio.Task[None]] = []
        self._tagged: OrderedDict[tuple[str, tuple[tuple[str, str], ...]], CredentialProvider] = (
            OrderedDict()
        )
        for account in accounts.values():
            if account.assume_role is not None and not account.assume_role.session_tags:
                self._untagged[account.name] = _assumed(account, ())
            elif account.assume_role is None and account.profile is not None:
                self._untagged[account.name] = CredentialProvider(
                    account.profile, name=f"account {account.name}"
                )

    def provider(self, account: Account, identity: Identity | None) -> CredentialProvider:
        untagged = self._untagged.get(account.name)
        if untagged is not None:
            return untagged
        role = account.assume_role
        if role is None:
            return self._default
        tags = session_tags(role, identity)
        slot = (account.name, tags)
        provider = self._tagged.get(slot)
        if provider is None:
            provider = self._tagged[slot] = _assumed(account, tags)
            if len(self._tagged) > _MAX_TAGGED:
                self._tagged.popitem(last=False)
        else:
            self._tagged.move_to_end(slot)
        return provider

    async def get(
        self, account: Account, identity: Identity | None, patient: bool = True
    ) -> Credentials:
        return await self.provider(account, identity).get(patient)

    async def start(self) -> None:
        """Fetch each account's credentials in the background: the proxy listens at once,
        and a member whose account has none yet is moved past until it has."""
        loop = asyncio.get_running_loop()
        self._starting = [loop.create_task(p.start()) for p in self._untagged.values()]

    async def close(self) -> None:
        for task in self._starting:
            task.cancel()
        for provider in (*self._untagged.values(), *self._tagged.values()):
            await provider.close()


def session_tags(role: AssumeRole, identity: Identity | None) -> tuple[tuple[str, str], ...]:
    """The role session's tags for this caller: only the fields the key has."""
    spec = identity.spec if identity is not None else None
    values = {
        "key_id": identity.key_id if identity is not None else None,
        "key_alias": spec.key_alias if spec is not None else None,
        "team_id": spec.team_id if spec is not None else None,
        "user_id": spec.user_id if spec is not None else None,
    }
    tags = []
    for tag, source in role.session_tags:
        value = values.get(source)
        if value:
            tags.append((tag, _TAG_VALUE_UNSAFE.sub("_", value)[:256]))
    return tuple(tags)


def _assumed(account: Account, tags: tuple[tuple[str, str], ...]) -> CredentialProvider:
    role = account.assume_role
    assert role is not None
    region = account.regions[0]
    sts_endpoint = account.endpoints.get("sts")
    extra: dict[str, Any] = {
        "RoleSessionName": role.session_name,
        "DurationSeconds": role.duration_seconds,
    }
    if role.external_id is not None:
        extra["ExternalId"] = role.external_id
    if tags:
        extra["Tags"] = [{"Key": k, "Value": v} for k, v in tags]
    # Refresh in the background in the session's last quarter (15 minutes at most), and
    # block a request only in its last tenth (10 minutes at most).
    advisory = min(15 * 60, role.duration_seconds // 4)
    mandatory = min(10 * 60, role.duration_seconds // 10)

    async def load() -> Any:
        session = AioSession(profile=role.source_profile)
        source = await session.get_credentials()
        if source is None:
            return None

        def client_creator(service: str, **kwargs: Any) -> Any:
            bounded = AioConfig(
                connect_timeout=STS_TIMEOUT,
                read_timeout=STS_TIMEOUT,
                retries={"total_max_attempts": 2, "mode": "standard"},
            )
            return session.create_client(
                service, region_name=region, endpoint_url=sts_endpoint, config=bounded, **kwargs
            )

        fetcher = AioAssumeRoleCredentialFetcher(
            client_creator, source, role.role_arn, extra_args=extra, expiry_window_seconds=advisory
        )
        credentials = AioDeferredRefreshableCredentials(
            refresh_using=fetcher.fetch_credentials, method="assume-role"
        )
        # botocore's own windows (15 and 10 minutes) would refresh a 15-minute session on
        # every use: scale them to the session's length.
        credentials._advisory_refresh_timeout = advisory
        credentials._mandatory_refresh_timeout = mandatory
        return credentials

    shown = ",".join(f"{k}={v}" for k, v in tags)
    return CredentialProvider(
        load=load,
        name=f"account {account.name}" + (f" [{shown}]" if shown else ""),
        advisory_seconds=advisory,
        mandatory_seconds=mandatory,
    )
