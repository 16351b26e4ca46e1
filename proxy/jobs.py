"""Batch jobs belong to the key that created them: the job ARN is read from the create
response (never rewritten) and remembered, and a virtual key may get or stop only its own."""

from __future__ import annotations

import orjson

from . import errors
from .auth import Identity
from .routing import Operation
from .store import Store

_OWNED = frozenset({"GetModelInvocationJob", "StopModelInvocationJob"})
CREATE = "CreateModelInvocationJob"


class JobRegistry:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def check(self, identity: Identity, op: Operation, labels: dict[str, str]) -> None:
        if op.name not in _OWNED or identity.record is None:
            return
        identifier = labels.get("jobIdentifier", "")
        owner = await self._store.job_owner(identifier)
        if owner != identity.key_id:
            raise errors.access_denied(
                "The API key may only read or stop batch jobs it created; "
                f"{identifier!r} is not one"
            )

    async def remember(self, identity: Identity, model: str | None, body: bytes) -> None:
        if identity.record is None or identity.key_id is None:
            return
        try:
            arn = orjson.loads(body).get("jobArn")
        except (orjson.JSONDecodeError, AttributeError):
            return
        if isinstance(arn, str) and arn:
            await self._store.record_job(arn, identity.key_id, model)
