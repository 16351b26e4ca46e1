"""What an opaque model ARN stands for: application inference profiles and provisioned
throughput, resolved to the foundation model they run.

Teams allocate cost on AWS with application inference profiles, so their requests name an
ARN (``arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123``) that
says nothing about the model. The proxy asks the control plane once (GetInferenceProfile,
GetProvisionedModelThroughput), signed with the server's credentials, and keeps the
answer for ``ttl`` seconds: price, policy and reports then use the model, and the ledger
keeps the ARN beside it. Only authenticated requests get here, the cache is bounded, and a
failed lookup is remembered briefly too, so no client can make the proxy call AWS in a loop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import orjson

from ..wire.clock import SYSTEM_CLOCK, Clock
from ..wire.endpoints import valid_region
from ..wire.modelids import arn_model_id, parse_arn

log = logging.getLogger("bedrock_proxy.modelrefs")

# ARN resource type -> (control-plane path, how to read the model from the answer).
_LOOKUPS = {
    "application-inference-profile": "/inference-profiles/",
    "provisioned-model": "/provisioned-model-throughput/",
}
_MAX_ENTRIES = 4096
_FAILURE_TTL = 30.0
# Lookups a key may cause in a minute (fewer when its own rpm_limit is lower).
LOOKUPS_PER_MINUTE = 10

# (region, path, the ARN whose account answers) -> (status, body): a signed control-plane GET.
ControlGet = Callable[[str, str, str], Awaitable[tuple[int, bytes]]]


def resolvable(model: str) -> bool:
    if model[:4] != "arn:":  # (a slice: cheaper than startswith, on every call)
        return False
    arn = parse_arn(model)
    return arn is not None and arn.resource_type in _LOOKUPS


class ModelRefs:
    def __init__(
        self, control_get: ControlGet, ttl: float = 3600.0, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._clock = clock
        self._get = control_get
        self._ttl = ttl
        self._cache: dict[str, tuple[float, str | None]] = {}
        # Lookups each caller has caused this minute: (minute, count).
        self._lookups: dict[str, tuple[int, int]] = {}

    async def resolve(
        self, arn: str, caller: str | None = None, per_minute: int = LOOKUPS_PER_MINUTE
    ) -> str | None:
        """The foundation model id an ARN runs, or None when it cannot be told. A lookup
        is a signed call to AWS on ``caller``'s behalf: each caller may cause at most
        ``per_minute`` of them (made-up ARNs would spend the account's control-plane quota
        for every tenant); past that, the ARN stays unresolved."""
        now = self._clock.monotonic()
        cached = self._cache.get(arn)
        if cached is not None and cached[0] > now:
            return cached[1]
        if caller is not None and not self._may_look_up(caller, int(now // 60), per_minute):
            log.info(
                "lookups for %s are over %d a minute: %s left unresolved", caller, per_minute, arn
            )
            return None
        model = await self._lookup(arn)
        if len(self._cache) >= _MAX_ENTRIES:
            self._cache.clear()
        self._cache[arn] = (now + (self._ttl if model else _FAILURE_TTL), model)
        return model

    def _may_look_up(self, caller: str, minute: int, per_minute: int) -> bool:
        seen = self._lookups.get(caller)
        count = seen[1] if seen is not None and seen[0] == minute else 0
        if count >= per_minute:
            return False
        if len(self._lookups) >= _MAX_ENTRIES:
            self._lookups.clear()
        self._lookups[caller] = (minute, count + 1)
        return True

    async def _lookup(self, arn: str) -> str | None:
        parsed = parse_arn(arn)
        if parsed is None:
            return None
        region, kind = parsed.region, parsed.resource_type
        if not valid_region(region):
            return None
        try:
            status, body = await self._get(region, _LOOKUPS[kind] + quote(arn, safe=""), arn)
        except Exception as exc:  # the request goes on, priced as unknown
            log.warning("could not resolve %s: %s", arn, type(exc).__name__)
            return None
        if status != 200:
            log.warning("could not resolve %s: the control plane answered %d", arn, status)
            return None
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(answer, dict):
            return None
        if kind == "application-inference-profile":
            models = answer.get("models") or []
            model_arn = (
                models[0].get("modelArn") if models and isinstance(models[0], dict) else None
            )
        else:
            model_arn = answer.get("foundationModelArn") or answer.get("modelArn")
        if not isinstance(model_arn, str):
            return None
        # arn:aws:bedrock:REGION::foundation-model/MODEL -> MODEL
        return arn_model_id(model_arn) or model_arn
