"""Server-held AWS credentials through aiobotocore's chain (env, profile, web identity,
container and instance metadata, assume-role), refreshed off the request path.

Requests read a frozen copy. When expiry comes near a background task refreshes it, so
no request waits; only credentials already past their mandatory refresh time block.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiobotocore.session import AioSession

from ..wire.background import stop as stop_task
from ..wire.sigv4 import Credentials

log = logging.getLogger("bedrock_proxy.credentials")

# Same windows botocore uses: refresh in the background 15 minutes before expiry,
# and block only when 10 minutes or less remain.
_ADVISORY_SECONDS = 15 * 60
_MANDATORY_SECONDS = 10 * 60
_CHECK_EVERY = 1.0
_RETRY_MISSING_EVERY = 30.0
# The longest one fetch of credentials may take (an STS that accepts connections and
# never answers held startup for ~3 minutes with botocore's timeouts and retries).
FETCH_TIMEOUT = 10.0
# What an STS client may take per attempt, and its attempts (within FETCH_TIMEOUT).
STS_TIMEOUT = 4.0
# How long a request waits for a first fetch before it moves to another member.
FIRST_WAIT = 1.0


class NoCredentialsError(Exception):
    """The chain found no AWS credentials."""


# Finds aiobotocore's credentials object (refreshable or not), or None when there are none.
SourceLoader = Callable[[], Awaitable[Any]]


class CredentialProvider:
    def __init__(
        self,
        profile: str | None = None,
        load: SourceLoader | None = None,
        name: str = "default",
        advisory_seconds: float = _ADVISORY_SECONDS,
        mandatory_seconds: float = _MANDATORY_SECONDS,
        first_wait: float = FIRST_WAIT,
    ) -> None:
        self._profile = profile
        self._advisory = advisory_seconds
        self._mandatory = mandatory_seconds
        self._load_source = load or self._chain
        self.name = name
        self._source: Any = None  # aiobotocore's credentials object (untyped)
        self._frozen: Credentials | None = None
        self._next_check = 0.0
        self._refresh_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._fetching: asyncio.Task[Credentials] | None = None
        self._first_wait = first_wait
        self._last_lookup = -_RETRY_MISSING_EVERY
        self._why = "no AWS credentials available to the proxy"

    async def start(self) -> None:
        """Resolve once at startup (within FETCH_TIMEOUT); missing credentials are logged,
        not fatal."""
        try:
            if self._frozen is None:
                self._fetching = fetch = asyncio.get_running_loop().create_task(self._fetch())
                fetch.add_done_callback(self._fetched)
                await fetch
        except NoCredentialsError:
            log.warning("no AWS credentials found; requests will be refused until some appear")

    async def get(self, patient: bool = True) -> Credentials:
        """The credentials; a first fetch is waited for (within FETCH_TIMEOUT), or, when
        not ``patient`` (another member can take the request), at most FIRST_WAIT."""
        frozen = self._frozen
        now = time.monotonic()
        if frozen is not None and now < self._next_check:
            return frozen
        if frozen is None:
            return await self._load(patient)
        self._next_check = now + _CHECK_EVERY
        source = self._source
        if getattr(source, "refresh_needed", None) is None:
            return frozen
        if source.refresh_needed(self._mandatory):
            return await self._refresh()
        if source.refresh_needed(self._advisory) and self._refresh_task is None:
            self._refresh_task = asyncio.create_task(self._background_refresh())
        return frozen

    async def _load(self, patient: bool) -> Credentials:
        """The first credentials: one fetch at a time, bounded by FETCH_TIMEOUT. A request
        that another member can take waits at most ``first_wait`` (a healthy STS answers
        in well under a second), then moves on while the fetch goes on."""
        fetch = self._fetching
        if fetch is None:
            if time.monotonic() - self._last_lookup < _RETRY_MISSING_EVERY and self._source is None:
                raise NoCredentialsError(self._why)
            fetch = self._fetching = asyncio.get_running_loop().create_task(self._fetch())
            fetch.add_done_callback(self._fetched)
        elif not patient:  # begun by another request and not back yet: move on at once
            raise NoCredentialsError(f"AWS credentials for {self.name} are still being fetched")
        if patient:
            return await asyncio.shield(fetch)
        try:
            return await asyncio.wait_for(asyncio.shield(fetch), self._first_wait)
        except TimeoutError:
            raise NoCredentialsError(
                f"AWS credentials for {self.name} are still being fetched"
            ) from None

    def _fetched(self, fetch: asyncio.Task[Credentials]) -> None:
        self._fetching = None
        if not fetch.cancelled():
            fetch.exception()  # read here: the request that began it may have moved on

    async def _fetch(self) -> Credentials:
        self._last_lookup = time.monotonic()
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                source = await self._load_source()
                if source is None:
                    raise NoCredentialsError("no AWS credentials available to the proxy")
                self._source = source
                return await self._freeze()
        except NoCredentialsError as exc:
            self._why = str(exc)
            raise
        except Exception as exc:  # STS refused or silent, a profile is broken: retried later
            self._source = None
            self._why = f"AWS credentials for {self.name} could not be obtained"
            log.warning("%s: %s: %s", self._why, type(exc).__name__, exc)
            raise NoCredentialsError(self._why) from None

    async def _chain(self) -> Any:
        return await AioSession(profile=self._profile).get_credentials()

    async def _refresh(self) -> Credentials:
        async with self._lock:
            try:
                async with asyncio.timeout(FETCH_TIMEOUT):
                    return await self._freeze()
            except Exception as exc:
                log.warning("refreshing AWS credentials for %s failed: %s", self.name, exc)
                raise NoCredentialsError(
                    f"AWS credentials for {self.name} could not be refreshed"
                ) from None

    async def _freeze(self) -> Credentials:
        frozen = await self._source.get_frozen_credentials()
        self._frozen = Credentials(frozen.access_key, frozen.secret_key, frozen.token)
        self._next_check = time.monotonic() + _CHECK_EVERY
        return self._frozen

    async def _background_refresh(self) -> None:
        try:
            await self._refresh()
        except Exception as exc:  # keep serving with the current credentials
            log.warning(
                "background credential refresh failed for %s: %s", self.name, type(exc).__name__
            )
        finally:
            self._refresh_task = None

    async def close(self) -> None:
        await stop_task(self._refresh_task)
