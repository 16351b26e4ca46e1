"""The server's authorization of what goes upstream: the upstream Bedrock API key, or a
SigV4 signature with the credentials of the member the call goes to (``fleet``), for the
caller the gate admitted (a key routed to an account of its own signs with that account's
role)."""

from __future__ import annotations

from typing import Any

from ..exchange import Identity
from ..wire import errors, eventsig, sigv4
from ..wire.eventsig import SignatureChain
from ..wire.routing import Service
from .credentials import NoCredentialsError
from .fleet import Fleet, Member, Target
from .fleet.config import DEFAULT_ACCOUNT
from .gate import Admitted

S3_SERVICE = Service(name="s3", endpoint_prefix="s3", signing_name="s3")


class UpstreamSigner:
    def __init__(self, fleet: Fleet, bearer: str | None) -> None:
        self.fleet = fleet
        self._bearer = bearer

    async def _aws_credentials(
        self, member: Member, identity: Identity | None, patient: bool = True
    ) -> sigv4.Credentials:
        try:
            return await self.fleet.credentials_for(member, identity, patient)
        except NoCredentialsError as exc:
            raise errors.service_unavailable(
                "The proxy has no AWS credentials for the upstream"
                + ("" if member.account.name == DEFAULT_ACCOUNT else f" {member.name}")
                + ("" if str(exc).startswith("no AWS") else f": {exc}")
            ) from None

    async def authorize(
        self,
        headers: dict[str, str],
        *,
        method: str,
        raw_path: str,
        raw_query: str,
        payload_hash: str,
        target: Target,
        service: Service,
        identity: Identity | None = None,
        patient: bool = True,
    ) -> None:
        """Add the server's authorization to ``headers`` (which must hold ``host`` and only
        headers no hop changes): the upstream bearer token, or a SigV4 signature with the
        target member's credentials (not ``patient``: another member can take the request,
        so a slow first fetch of credentials is not waited for)."""
        if self._bearer and service is not S3_SERVICE:
            headers["authorization"] = "Bearer " + self._bearer
            return
        headers["authorization"] = sigv4.sign(
            method=method,
            raw_path=raw_path,
            raw_query=raw_query,
            headers=headers,
            payload_hash=payload_hash,
            credentials=await self._aws_credentials(target.member, identity, patient),
            region=target.upstream.region,
            service=service.signing_name,
            date=sigv4.amz_date(),
            double_encode=service is not S3_SERVICE,  # S3 paths are encoded once
        )

    async def authorize_stream(
        self,
        headers: dict[str, str],
        *,
        raw_path: str,
        raw_query: str,
        admitted: Admitted[Any],
        service: Service,
    ) -> SignatureChain:
        """Sign a request whose body is a signed event stream, and return the chain its
        frames are signed on (the server's key, seeded with this signature). Only a call
        the gate admitted is signed: for its first member, and its caller."""
        target, identity = admitted.targets[0], admitted.identity
        if self._bearer:
            raise errors.validation(
                "InvokeModelWithBidirectionalStream needs AWS credentials upstream: its "
                "events are signed with them, and the proxy is configured with a Bedrock API key"
            )
        credentials = await self._aws_credentials(target.member, identity)
        region = target.upstream.region
        headers["x-amz-content-sha256"] = eventsig.STREAMING_EVENTS
        date = sigv4.amz_date()
        authorization = headers["authorization"] = sigv4.sign(
            method="POST",
            raw_path=raw_path,
            raw_query=raw_query,
            headers=headers,
            payload_hash=eventsig.STREAMING_EVENTS,
            credentials=credentials,
            region=region,
            service=service.signing_name,
            date=date,
        )
        signature = authorization.rpartition("Signature=")[2]
        return SignatureChain.for_credentials(
            credentials.secret_key, date[:8], region, service.signing_name, signature
        )
