"""Every way a client proves who it is, reduced to one ``Identity``.

1. ``Authorization: Bearer <key>``: curl, scripts, and botocore with ``AWS_BEARER_TOKEN_BEDROCK``.
2. A header other gateways' users already send (``x-api-key``, ``litellm_user_api_key:
   Bearer <key>``…); a request signed with dummy AWS credentials that carries one is
   accepted on the header and its signature ignored.
3. SigV4 signed with a virtual key's access key id and secret, verified the way AWS does.

Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from multidict import CIMultiDictProxy

from ..exchange import ANONYMOUS, MASTER, Identity
from ..wire import errors, sigv4
from ..wire.clock import SYSTEM_CLOCK, Clock
from ..wire.eventsig import SignatureChain
from ..wire.headers import forwarded_amz
from .keycache import KeyCache
from .keys import KeyRecord, hash_token

# AWS access key ids are 16-128 upper-case letters and digits; nothing else is looked up.
_ACCESS_KEY_ID = re.compile(r"[A-Z0-9]{16,128}")
# No key of ours is longer; a longer one is refused before it is hashed or looked up.
_MAX_KEY_LENGTH = 1024


class _Version(Protocol):
    @property
    def major(self) -> int: ...


class ClientRequest(Protocol):
    """What authentication reads of a request: its headers and its HTTP version (the
    server's request type has both; this layer does not depend on the framework)."""

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def version(self) -> _Version: ...


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """What a SigV4 check needs beyond the headers: the exact bytes that were signed."""

    method: str
    raw_path: str
    raw_query: str
    payload_sha256: str
    double_encode: bool = True
    # The service the credential scope must name: bedrock, or s3 for the files endpoint.
    service: str = "bedrock"


class Authenticator:
    """Turns the credentials in a request into an Identity, or an AWS-shaped refusal."""

    def __init__(
        self,
        master_key: str | None,
        auth_headers: list[str],
        allow_unauthenticated: bool,
        keys: KeyCache | None = None,
        max_skew_seconds: int = 900,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        # The time a key's expiry and a SigV4 signature's age are judged by (a test's
        # clock moves them).
        self._clock = clock
        self._master = master_key.encode() if master_key else None
        self._headers = tuple(h.lower() for h in auth_headers)
        self.open = allow_unauthenticated and master_key is None
        self._keys = keys
        self._identities: dict[str, Identity] = {}
        self._max_skew = max_skew_seconds

    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        """The key the client sent, from Authorization: Bearer or a configured header."""
        authorization = headers.get("Authorization")
        if authorization is not None and authorization[:7].lower() == "bearer ":
            return authorization[7:].strip()
        for name in self._headers:
            value = headers.get(name)
            if value:
                value = value.strip()
                return value[7:].strip() if value[:7].lower() == "bearer " else value
        return None

    def precheck(self, request: ClientRequest) -> None:
        """Refuse a request with no credentials at all before its body is read."""
        if self.open or self.presented_key(request.headers) is not None:
            return
        if request.headers.get("Authorization", "").startswith(sigv4.ALGORITHM):
            return
        raise errors.access_denied(
            "Missing credentials: send Authorization: Bearer <key>, x-api-key: <key>, "
            "or sign the request with a virtual key's access key"
        )

    async def identify(self, request: ClientRequest) -> Identity | None:
        """Everything that can be judged from the headers, before any body is read: a
        bearer key is checked in full; a SigV4 key id must exist (its signature covers the
        body, so it is verified by ``authenticate`` once the body is in). None means the
        request is signed by a known key and waits for its body."""
        if self.open:
            return ANONYMOUS
        key = self.presented_key(request.headers)
        if key is not None:
            return await self._bearer(key)
        authorization = request.headers.get("Authorization", "")
        if not authorization.startswith(sigv4.ALGORITHM):
            self.precheck(request)
            raise errors.access_denied("Missing credentials")
        await self._signing_key(authorization)
        return None

    async def authenticate(
        self, request: ClientRequest, signed: SignedRequest | None = None
    ) -> Identity:
        if self.open:
            return ANONYMOUS
        key = self.presented_key(request.headers)
        if key is not None:
            return await self._bearer(key)
        authorization = request.headers.get("Authorization", "")
        if authorization.startswith(sigv4.ALGORITHM) and signed is not None:
            return await self._sigv4(request, authorization, signed)
        self.precheck(request)
        raise errors.access_denied("Missing credentials")

    async def event_chain(self, request: ClientRequest) -> SignatureChain:
        """The chain a SigV4 client signs its event frames on (after ``authenticate``):
        the virtual key's signing key, seeded with the request's own signature."""
        parsed, record = await self._signing_key(request.headers.get("Authorization", ""))
        assert self._keys is not None  # a record came from it
        return SignatureChain.for_credentials(
            self._keys.secret(record), parsed.day, parsed.region, parsed.service, parsed.signature
        )

    async def still_valid(self, identity: Identity, now: float) -> str | None:
        """Why a key that opened a long request (a stream, a session) may no longer use
        it, or None: deleted, blocked, expired or regenerated since, on any replica
        (seen within ``key_cache_ttl``)."""
        record = identity.record
        if record is None or self._keys is None:
            return None  # the master key, or no key store: nothing to revoke
        try:
            current = await self._keys.get("key_id", record.key_id)
        except errors.AwsError:  # the store is away: an outage revokes nothing
            return None
        if current is None:
            return "The API key was deleted"
        if current.token_hash != record.token_hash:
            return "The API key was regenerated"
        return current.refusal(now)

    async def master_only(self, request: ClientRequest) -> None:
        key = self.presented_key(request.headers)
        if key is None or self._master is None or not self.is_master_key(key):
            raise errors.access_denied("This route requires the master key")

    def is_master_key(self, key: str) -> bool:
        return self._master is not None and hmac.compare_digest(key.encode(), self._master)

    async def identify_key(self, key: str) -> Identity:
        """Who a bearer key is (the console's sign-in); refused like any request's key."""
        return await self._bearer(key)

    async def _bearer(self, key: str) -> Identity:
        if self.is_master_key(key):
            return MASTER
        if len(key) > _MAX_KEY_LENGTH:
            raise errors.access_denied("The API key in the request is not valid")
        record = await self._keys.get("token_hash", hash_token(key)) if self._keys else None
        if record is None:
            raise errors.access_denied("The API key in the request is not valid")
        return self._usable(record)

    async def _sigv4(
        self, request: ClientRequest, authorization: str, signed: SignedRequest
    ) -> Identity:
        parsed, record = await self._signing_key(authorization)
        if parsed.service != signed.service:
            raise errors.AwsError(
                403,
                "InvalidSignatureException",
                f"Credential should be scoped to correct service: '{signed.service}'.",
            )
        headers = _lower_headers(request.headers)
        if request.version.major == 2 and "host" in headers:
            # The HTTP/2 front made Host from :authority; a client may have signed either.
            headers[":authority"] = headers["host"]
        declared = headers.get("x-amz-content-sha256")
        payload_hash = signed.payload_sha256
        if declared is not None and declared != payload_hash:
            if declared != sigv4.UNSIGNED_PAYLOAD or signed.double_encode:
                raise errors.AwsError(
                    403,
                    "InvalidSignatureException",
                    "The provided x-amz-content-sha256 header does not match the body",
                )
            payload_hash = declared
        assert self._keys is not None  # a record came from it
        try:
            secret = self._keys.secret(record)
            sigv4.verify(
                parsed=parsed,
                secret_key=secret,
                method=signed.method,
                raw_path=signed.raw_path,
                raw_query=signed.raw_query,
                headers=headers,
                payload_hash=payload_hash,
                now=datetime.fromtimestamp(self._clock.time(), UTC),
                max_skew_seconds=self._max_skew,
                double_encode=signed.double_encode,
            )
        except sigv4.SignatureError as exc:
            raise errors.AwsError(403, exc.code, exc.message) from None
        signed_names = set(parsed.signed_headers)
        for name in headers:
            if forwarded_amz(name) and name not in signed_names:
                # The proxy signs what it forwards with the server's rights: a header the
                # client did not sign is one its key never vouched for.
                raise errors.AwsError(
                    403,
                    "InvalidSignatureException",
                    f"The request includes header {name}, which is not signed",
                )
        return self._usable(record)

    def _usable(self, record: KeyRecord) -> Identity:
        refusal = record.refusal(self._clock.time())
        if refusal is not None:
            raise errors.access_denied(refusal)
        # One Identity per cached record (a changed key is a new record), not per request.
        identity = self._identities.get(record.key_id)
        if identity is None or identity.record is not record:
            if len(self._identities) > 100_000:  # bounded like the key cache it mirrors
                self._identities.clear()
            identity = self._identities[record.key_id] = Identity(
                "virtual", key_id=record.key_id, alias=record.spec.key_alias, record=record
            )
        return identity

    async def _signing_key(self, authorization: str) -> tuple[sigv4.ParsedAuthorization, KeyRecord]:
        """The parsed Authorization and the key it names, or the refusal AWS gives."""
        parsed = sigv4.parse_authorization(authorization)
        if parsed is None:
            raise errors.AwsError(
                403, "IncompleteSignatureException", "The Authorization header is malformed"
            )
        record = None
        if self._keys is not None and _ACCESS_KEY_ID.fullmatch(parsed.access_key):
            record = await self._keys.get("access_key_id", parsed.access_key)
        if record is None:
            raise errors.AwsError(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        return parsed, record


def _lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers.items():
        lname = name.lower()
        out[lname] = f"{out[lname]},{value}" if lname in out else value
    return out
