"""How a files request is read at the gate (``gate.Door``): an S3 signature whose payload
hash is declared (the body streams through once admitted), and the key's bucket and prefix
allow-lists on every name the request carries (the key, a listing's prefix, a copy's
source), with the sub-resources and headers that would change who may read an object
refused outright.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import unquote

from aiohttp import web

from ...access import policy
from ...access.auth import SignedRequest
from ...access.keys import KeySpec
from ...exchange import Exchange, Identity
from ...metering.usage import Meter
from ...wire import errors
from ...wire.routing import Operation
from ..fleet import Target
from ..listen.bodies import RequestBody
from ..signer import S3_SERVICE

if TYPE_CHECKING:
    from .files import FilesFront

# What a virtual key may send to S3 through the proxy, which signs it with the server's S3
# rights: objects, multipart uploads, listings and copies, and the query parameters those
# take. Sub-resources that change who may read a bucket or object, or for how long it is
# kept (acl, policy, retention, legal-hold, restore, website, tagging, cors, lifecycle…),
# are not among them, nor are the headers that do the same on a PUT.
_QUERY_ALLOWED = frozenset(
    {
        "x-id",
        "versionId",
        "partNumber",
        "uploads",
        "uploadId",
        "max-parts",
        "part-number-marker",
        "list-type",
        "prefix",
        "delimiter",
        "continuation-token",
        "max-keys",
        "start-after",
        "fetch-owner",
        "encoding-type",
        "marker",
        "key-marker",
        "upload-id-marker",
        "max-uploads",
        "delete",
        "response-content-type",
        "response-content-language",
        "response-expires",
        "response-cache-control",
        "response-content-disposition",
        "response-content-encoding",
    }
)
_HEADER_PREFIXES_REFUSED = (
    "x-amz-acl",
    "x-amz-grant-",
    "x-amz-object-lock-",
    "x-amz-bypass-governance-retention",
    "x-amz-website-redirect-location",
    "x-amz-tagging",
)


class FilesDoor:
    """How a files request is read at the gate: an S3 signature, whose payload hash is
    declared (the body streams through after), and the key's bucket and prefix lists."""

    __slots__ = ("bucket", "declared", "front", "headers", "key", "op", "params", "query")
    upstream = True

    def __init__(
        self,
        front: FilesFront,
        op: Operation,
        query: str,
        declared: str,
        bucket: str,
        key: str,
        params: dict[str, str],
        headers: dict[str, str],
    ) -> None:
        self.front, self.op, self.query, self.declared = front, op, query, declared
        self.bucket, self.key, self.params, self.headers = bucket, key, params, headers

    async def credential(self, request: web.Request, x: Exchange) -> Identity | None:
        client_path = request.raw_path.partition("?")[0]
        return await self.front.auth.authenticate(
            request,
            SignedRequest(
                request.method,
                client_path,
                self.query,
                self.declared,
                double_encode=False,
                service="s3",
            ),
        )

    async def read(self, request: web.Request, x: Exchange) -> RequestBody | None:
        return None  # streamed to S3 once admitted (``_stream_body``)

    async def verify(self, request: web.Request, x: Exchange, body: RequestBody | None) -> Identity:
        raise AssertionError("an S3 signature is judged from its headers")

    async def authorize(self, request: web.Request, x: Exchange, body: RequestBody | None) -> None:
        identity = x.identity
        assert identity is not None
        self._authorize(
            identity.spec,
            self.op,
            self.bucket,
            self.key,
            self.params,
            self.headers,
            identity.is_master,
        )
        length, limit = request.content_length, self.front.max_file_bytes
        if length is not None and length > limit:
            raise errors.AwsError(
                400, "EntityTooLarge", f"Your proposed upload exceeds the limit of {limit} bytes"
            )
        if (
            request.body_exists
            and length is None
            and "x-amz-decoded-content-length" not in self.headers
        ):
            raise errors.AwsError(
                411, "MissingContentLength", "You must provide the Content-Length HTTP header."
            )

    def _authorize(
        self,
        spec: KeySpec | None,
        op: Operation,
        bucket: str,
        key: str,
        params: dict[str, str],
        headers: dict[str, str],
        is_master: bool,
    ) -> None:
        if is_master or spec is None:
            return
        if "files" not in spec.operation_groups:
            raise errors.access_denied("The API key is not allowed to use files")
        for name in params:
            if name not in _QUERY_ALLOWED:
                raise errors.access_denied(
                    f"The S3 sub-resource or parameter {name!r} is not available to API keys"
                )
        for name in headers:
            if name.startswith(_HEADER_PREFIXES_REFUSED):
                raise errors.access_denied(f"The header {name} is not available to API keys")
        if op.name in ("ListBuckets", "BucketAdministration"):
            raise errors.access_denied(f"{op.name} needs the master key")
        target: str | None
        if op.name in ("ListObjectsV2", "ListObjects", "ListMultipartUploads"):
            target = params.get("prefix", "")
        elif op.name in ("HeadBucket", "DeleteObjects"):
            target = None if op.name == "HeadBucket" or spec.file_prefixes is None else ""
        else:
            target = key
        listing = op.name in ("ListObjectsV2", "ListObjects", "ListMultipartUploads")
        if not policy.file_allowed(spec, bucket, target, listing):
            where = f"{bucket}/{target}" if target else bucket
            raise errors.access_denied(f"The API key is not allowed to use {where!r}")
        source = headers.get("x-amz-copy-source")
        if source is not None:
            src_bucket, _, src_key = unquote(source).lstrip("/").partition("/")
            if not policy.file_allowed(spec, src_bucket, src_key.split("?", 1)[0]):
                raise errors.access_denied(f"The API key is not allowed to read {src_bucket!r}")

    async def route(
        self, request: web.Request, x: Exchange, body: RequestBody | None
    ) -> list[Target]:
        # The bucket lives in one account: the pool's first member (never moved: a write).
        return self.front.upstream.targets(S3_SERVICE, request, x.identity, None)[:1]

    def meter(self, x: Exchange, body: RequestBody | None) -> Meter | None:
        return None  # S3 bills no tokens
