"""Jobs belong to the key that started them: batch jobs (CreateModelInvocationJob) and
async invocations (StartAsyncInvoke). The ARN is read from the start response (never
rewritten) and remembered; a virtual key may then read or stop only its own jobs, and its
listings show only its own.

Filtering a listing means rewriting that JSON response: the one documented exception to
"bytes untouched", and only for control-plane listings, never for model output. Paging
still works: the upstream's ``nextToken`` passes through, so a page may hold fewer entries
than asked for (even none) while more pages follow, as AWS's own filtered listings do.
"""

from __future__ import annotations

import orjson

from ..exchange import Identity
from ..store import Store
from ..wire import errors
from ..wire.routing import Operation

# Operations that name one job, by the label that names it.
JOB_LABELS = _OWNED = {
    "GetModelInvocationJob": "jobIdentifier",
    "StopModelInvocationJob": "jobIdentifier",
    "GetAsyncInvoke": "invocationArn",
}
# Operations that start a job, by the response member that holds its ARN.
STARTS = {"CreateModelInvocationJob": "jobArn", "StartAsyncInvoke": "invocationArn"}
# Listings, by (the list member, the ARN member of each entry).
LISTINGS = {
    "ListModelInvocationJobs": ("invocationJobSummaries", "jobArn"),
    "ListAsyncInvokes": ("asyncInvokeSummaries", "invocationArn"),
}


class JobRegistry:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def check(self, identity: Identity, op: Operation, labels: dict[str, str]) -> None:
        label = _OWNED.get(op.name)
        if label is None or identity.record is None:
            return
        identifier = labels.get(label, "")
        owner = await self._store.jobs.owner(identifier)
        if owner != identity.key_id:
            raise errors.access_denied(
                f"The API key may only read or stop jobs it created; {identifier!r} is not one"
            )

    async def arn(self, identifier: str) -> str | None:
        """A job's ARN (which names its account and region), from its id if need be."""
        if not identifier or identifier.startswith("arn:"):
            return identifier or None
        return await self._store.jobs.arn(identifier)

    async def remember(
        self,
        identity: Identity,
        op: Operation,
        model: str | None,
        body: bytes,
        request_body: bytes = b"",
        region: str | None = None,
    ) -> None:
        """Record a started job for its key; a batch job with where its output goes, so
        its tokens can be charged once it completes (see ``batches``)."""
        member = STARTS.get(op.name)
        if member is None or identity.record is None or identity.key_id is None:
            return
        try:
            arn = orjson.loads(body).get(member)
        except (orjson.JSONDecodeError, AttributeError):
            return
        if not isinstance(arn, str) or not arn:
            return
        output_uri = None
        if op.name == "CreateModelInvocationJob":
            try:
                config = orjson.loads(request_body)["outputDataConfig"]["s3OutputDataConfig"]
                output_uri = config["s3Uri"] if isinstance(config["s3Uri"], str) else None
            except (orjson.JSONDecodeError, KeyError, TypeError):
                output_uri = None
        await self._store.jobs.record(arn, identity.key_id, model, output_uri, region)

    async def filter_listing(self, identity: Identity, op: Operation, body: bytes) -> bytes:
        """A listing as this key may see it: only the jobs it started."""
        members = LISTINGS.get(op.name)
        if members is None or identity.record is None or identity.key_id is None:
            return body
        list_member, arn_member = members
        try:
            document = orjson.loads(body)
            entries = document[list_member]
            arns = [entry[arn_member] for entry in entries]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            # Not the listing AWS documents: show nothing rather than someone else's jobs.
            raise errors.service_unavailable("The upstream listing could not be read") from None
        owned = await self._store.jobs.owned(
            identity.key_id, [a for a in arns if isinstance(a, str)]
        )
        document[list_member] = [e for e, arn in zip(entries, arns, strict=True) if arn in owned]
        return orjson.dumps(document)
