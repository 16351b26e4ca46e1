"""A fake AWS STS that answers AssumeRole as AWS does (the Query protocol, an XML body),
after checking the caller's SigV4 signature with botocore's own signer.

Each session it issues is granted to the fake upstream that stands for the role's
account, so requests signed with anything but that session's keys and token are refused
there. What every call asked for (role, session name, external id, tags) is recorded.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from aiohttp import web

from tests.fake_bedrock import _AUTH_RE
from tests.sigcheck import expected_signature

_SESSIONS = itertools.count(1)


@dataclass
class AssumeRoleCall:
    source_access_key: str
    role_arn: str
    session_name: str
    external_id: str | None
    duration: int
    tags: dict[str, str]
    issued_access_key: str
    issued_token: str


@dataclass
class FakeSts:
    # The identities that may call STS: access key -> (secret, session token).
    callers: dict[str, tuple[str, str | None]]
    # role ARN -> called with each issued (access key, secret, token).
    grant: Callable[[str, str, str, str], None]
    calls: list[AssumeRoleCall] = field(default_factory=list)
    # Role ARNs whose assumption is refused (AccessDenied), and a required external id.
    denied: set[str] = field(default_factory=set)
    external_ids: dict[str, str] = field(default_factory=dict)
    # Sessions that end sooner than asked for, to see them refreshed (None: as asked).
    expires_in: float | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        refusal = self._check_signature(request, body)
        if refusal is not None:
            return refusal
        params = dict(parse_qsl(body.decode(), keep_blank_values=True))
        if params.get("Action") != "AssumeRole":
            return _error(400, "InvalidAction", f"Could not find operation {params.get('Action')}")
        role = params.get("RoleArn", "")
        wanted = self.external_ids.get(role)
        if role in self.denied or (wanted is not None and params.get("ExternalId") != wanted):
            return _error(
                403, "AccessDenied", f"User is not authorized to perform: sts:AssumeRole on {role}"
            )
        tags = {}
        for i in itertools.count(1):
            key = params.get(f"Tags.member.{i}.Key")
            if key is None:
                break
            tags[key] = params.get(f"Tags.member.{i}.Value", "")
        n = next(_SESSIONS)
        akid = f"ASIAFAKESESSION{n:05d}"
        secret = secrets.token_urlsafe(30)
        token = f"session-token-{n}-" + secrets.token_hex(8)
        duration = int(params.get("DurationSeconds", "3600"))
        m = _AUTH_RE.fullmatch(request.headers.get("Authorization", ""))
        assert m is not None
        self.calls.append(
            AssumeRoleCall(
                m.group(1),
                role,
                params.get("RoleSessionName", ""),
                params.get("ExternalId"),
                duration,
                tags,
                akid,
                token,
            )
        )
        self.grant(role, akid, secret, token)
        lifetime = duration if self.expires_in is None else self.expires_in
        expiry = datetime.fromtimestamp(time.time() + lifetime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        account = role.split(":")[4]
        session = params.get("RoleSessionName", "")
        role_name = role.rsplit("/", 1)[-1]
        xml = f"""<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <Credentials>
      <AccessKeyId>{akid}</AccessKeyId>
      <SecretAccessKey>{secret}</SecretAccessKey>
      <SessionToken>{token}</SessionToken>
      <Expiration>{expiry}</Expiration>
    </Credentials>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::{account}:assumed-role/{role_name}/{session}</Arn>
      <AssumedRoleId>AROAFAKE{n:08d}:{session}</AssumedRoleId>
    </AssumedRoleUser>
    <PackedPolicySize>{len(tags)}</PackedPolicySize>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>{secrets.token_hex(16)}</RequestId></ResponseMetadata>
</AssumeRoleResponse>"""
        return web.Response(body=xml.encode(), content_type="text/xml")

    def _check_signature(self, request: web.Request, body: bytes) -> web.Response | None:
        m = _AUTH_RE.fullmatch(request.headers.get("Authorization", ""))
        if m is None:
            return _error(
                403, "MissingAuthenticationToken", "Request is missing Authentication Token"
            )
        akid, _day, region, service, signed, signature = m.groups()
        known = self.callers.get(akid)
        if known is None or service != "sts":
            return _error(
                403,
                "InvalidClientTokenId",
                "The security token included in the request is invalid.",
            )
        secret, token = known
        if request.headers.get("X-Amz-Security-Token") != token:
            return _error(
                403,
                "InvalidClientTokenId",
                "The security token included in the request is invalid.",
            )
        names = signed.split(";")
        date = request.headers.get("X-Amz-Date", "")
        if expected_signature(
            request, body, names, (akid, secret, token), service, region, date
        ) != (signature):
            return _error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        return None


def _error(status: int, code: str, message: str) -> web.Response:
    xml = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        f"<Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        f"<RequestId>{secrets.token_hex(16)}</RequestId></ErrorResponse>"
    )
    return web.Response(status=status, body=xml.encode(), content_type="text/xml")
