"""Every way a client proves who it is, reduced to one ``Identity``.

A key may arrive as ``Authorization: Bearer <key>`` (curl, and botocore with
``AWS_BEARER_TOKEN_BEDROCK``) or in one of the headers other gateways' users already send
(``x-api-key``, ``litellm_user_api_key: Bearer <key>``…). A request signed with dummy AWS
credentials that also carries such a header is accepted on the header; its signature is
ignored. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import web

from . import errors
from .sigv4 import ALGORITHM


@dataclass(frozen=True, slots=True)
class Identity:
    kind: str  # "master", "virtual" or "anonymous"
    key_id: str | None = None
    alias: str | None = None

    @property
    def is_master(self) -> bool:
        return self.kind == "master"


MASTER = Identity("master", key_id="master", alias="master")
ANONYMOUS = Identity("anonymous")


class Authenticator:
    """Turns the credentials in a request into an Identity, or an AWS-shaped refusal."""

    def __init__(
        self, master_key: str | None, auth_headers: list[str], allow_unauthenticated: bool
    ) -> None:
        self._master = master_key.encode() if master_key else None
        self._headers = tuple(h.lower() for h in auth_headers)
        self._open = allow_unauthenticated and master_key is None

    def presented_key(self, request: web.BaseRequest) -> str | None:
        """The key the client sent, from Authorization: Bearer or a configured header."""
        headers = request.headers
        authorization = headers.get("Authorization")
        if authorization is not None and authorization[:7].lower() == "bearer ":
            return authorization[7:].strip()
        for name in self._headers:
            value = headers.get(name)
            if value:
                value = value.strip()
                return value[7:].strip() if value[:7].lower() == "bearer " else value
        return None

    async def authenticate(self, request: web.BaseRequest) -> Identity:
        if self._open:
            return ANONYMOUS
        key = self.presented_key(request)
        if key is None:
            authorization = request.headers.get("Authorization", "")
            if authorization.startswith(ALGORITHM):
                raise errors.AwsError(
                    403,
                    "UnrecognizedClientException",
                    "The security token included in the request is invalid.",
                )
            raise errors.access_denied(
                "Missing credentials: send Authorization: Bearer <key> or x-api-key: <key>"
            )
        if self._master is not None and hmac.compare_digest(key.encode(), self._master):
            return MASTER
        raise errors.access_denied("The API key in the request is not valid")
