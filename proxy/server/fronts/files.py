"""``/bedrock/files``: an S3-compatible endpoint for batch inputs and outputs.

A boto3 ``s3`` client with ``endpoint_url=http://HOST:4000/bedrock/files`` (path-style)
signs with a virtual key's access key pair; the proxy verifies that signature with S3's
rules (no second encoding of the path, the payload hash as declared), checks the key's
bucket and prefix allow-lists, and re-signs for S3 with ``UNSIGNED-PAYLOAD`` so bodies stream
through in both directions without being held in memory. A body declared with a hex
SHA-256 is hashed as it streams and its last chunk is only sent once the hash matches, so
a tampered upload never completes. The proxy's own errors are S3 XML, like S3's.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, unquote
from xml.sax.saxutils import escape

from aiohttp import web

from ...access.auth import Authenticator
from ...exchange import Exchange
from ...metering.service import Metering
from ...wire import errors, h2pool, sigv4
from ...wire.headers import response_headers, sort_request_headers
from ...wire.redact import redact_principals
from ...wire.routing import Operation
from ..gate import Gate
from ..signer import S3_SERVICE
from ..upstream import UpstreamClient
from .bedrock_door import refuse_other_providers
from .files_door import FilesDoor

FILES_PATH = "/bedrock/files"
S3 = S3_SERVICE
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_CHUNK = 256 * 1024
# Our AWS-shaped codes, as S3 names them.
_S3_CODES = {
    "AccessDeniedException": "AccessDenied",
    "UnrecognizedClientException": "InvalidAccessKeyId",
    "InvalidSignatureException": "SignatureDoesNotMatch",
    "IncompleteSignatureException": "AccessDenied",
    "ValidationException": "InvalidRequest",
    "UnknownOperationException": "NotImplemented",
    "ThrottlingException": "SlowDown",
    "ServiceQuotaExceededException": "AccessDenied",
    "ServiceUnavailableException": "ServiceUnavailable",
    "ModelTimeoutException": "RequestTimeout",
    "RequestTimeoutException": "RequestTimeout",
    "InternalServerException": "InternalError",
}
_OPERATIONS: dict[str, Operation] = {}
_LIST_V1_PARAMS = frozenset({"prefix", "delimiter", "marker", "max-keys", "encoding-type"})


def s3_error_response(exc: errors.AwsError, request_id: str, head: bool) -> web.Response:
    code = _S3_CODES.get(exc.code, exc.code)
    headers = {"x-amz-request-id": request_id, "x-bedrock-proxy-request-id": request_id}
    headers.update(exc.headers)
    if head:  # HEAD responses carry no body; SDKs read the status
        return web.Response(status=exc.status, headers=headers)
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(exc.message)}</Message>"
        f"<RequestId>{request_id}</RequestId></Error>"
    )
    return web.Response(
        status=exc.status, body=body.encode(), headers=headers, content_type="application/xml"
    )


def s3_operation(method: str, key: str, query: dict[str, str], headers: dict[str, str]) -> str:
    """The S3 operation a request is, for policy, logs and metrics."""
    if not key:
        if method == "GET" and "uploads" in query:
            return "ListMultipartUploads"
        if method == "GET" and query.get("list-type") == "2":
            return "ListObjectsV2"
        if method == "GET" and query.keys() <= _LIST_V1_PARAMS:
            return "ListObjects"
        if method == "HEAD":
            return "HeadBucket"
        if method == "POST" and "delete" in query:
            return "DeleteObjects"
        return "BucketAdministration"
    if "uploads" in query and method == "POST":
        return "CreateMultipartUpload"
    if "uploadId" in query:
        return {
            "PUT": "UploadPart",
            "POST": "CompleteMultipartUpload",
            "DELETE": "AbortMultipartUpload",
            "GET": "ListParts",
        }.get(method, "Unknown")
    if method == "PUT":
        return "CopyObject" if "x-amz-copy-source" in headers else "PutObject"
    return {"GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(
        method, "Unknown"
    )


def _operation(name: str, method: str) -> Operation:
    op = _OPERATIONS.get(name)
    if op is None:
        op = _OPERATIONS[name] = Operation(S3, name, method, "/{Bucket}/{Key+}", (), False)
    return op


class FilesFront:
    def __init__(
        self,
        upstream: UpstreamClient,
        authenticator: Authenticator,
        metering: Metering,
        max_file_bytes: int,
        gate: Gate,
        body_timeout: float = 120.0,
    ) -> None:
        self._gate = gate
        self.upstream = upstream
        self.auth = authenticator
        self._metering = metering
        self.max_file_bytes = max_file_bytes
        self._body_timeout = body_timeout

    def render(self, exc: errors.AwsError, x: Exchange, request: web.Request) -> web.Response:
        return s3_error_response(exc, x.request_id, request.method == "HEAD")

    async def forward(self, request: web.Request, x: Exchange) -> web.StreamResponse:
        refuse_other_providers(request)
        headers = sort_request_headers(request.headers)
        raw = request.raw_path[len(FILES_PATH) :]
        path, _, query = raw.partition("?")
        raw_bucket, _, raw_key = path.lstrip("/").partition("/")
        bucket, key = unquote(raw_bucket), unquote(raw_key)
        lower = {k.lower(): v for k, v in request.headers.items()}
        pairs = parse_qsl(query, keep_blank_values=True)
        params = dict(pairs)
        if len(params) != len(pairs):
            raise errors.AwsError(400, "InvalidArgument", "A query parameter appears twice")
        name = s3_operation(request.method, key, params, lower) if bucket else "ListBuckets"
        x.operation = op = _operation(name, request.method)
        if bucket and not _BUCKET_RE.fullmatch(bucket):
            raise errors.AwsError(400, "InvalidBucketName", "The specified bucket is not valid.")
        declared = lower.get("x-amz-content-sha256", sigv4.UNSIGNED_PAYLOAD)
        if declared.startswith("STREAMING-AWS4-HMAC-SHA256"):
            raise errors.AwsError(
                501,
                "NotImplemented",
                "Chunk-signed uploads cannot be re-signed; send UNSIGNED-PAYLOAD, a SHA-256, "
                "or STREAMING-UNSIGNED-PAYLOAD-TRAILER",
            )
        door = FilesDoor(self, op, query, declared, bucket, key, params, lower)
        admitted = await self._gate.admit(request, x, door, headers.annotations)
        length = request.content_length
        signed, unsigned = headers.signed, headers.unsigned
        payload_mode = (
            declared
            if declared.startswith("STREAMING-UNSIGNED-PAYLOAD")
            else sigv4.UNSIGNED_PAYLOAD
        )
        signed["x-amz-content-sha256"] = payload_mode
        body = None
        if request.body_exists:
            if length is not None:
                unsigned["content-length"] = str(length)
            # Without a length (aws-chunked from botocore) the body goes on chunked as well.
            body = _stream_body(
                request, length, declared, self.max_file_bytes, self._body_timeout, x
            )
        bucket_path = f"/{raw_bucket}" + (f"/{raw_key}" if raw_key or path.endswith("/") else "")
        try:
            reply = await self.upstream.exchange(
                request.method,
                admitted,
                bucket_path,
                query,
                signed,
                unsigned,
                payload_mode,
                body,
                x,
                S3,
                failover=False,
            )
        except BodyMismatch as mismatch:
            raise mismatch.as_error() from None
        return await self._respond(request, reply, x)

    async def _respond(
        self, request: web.Request, upstream: h2pool.UpstreamResponse, x: Exchange
    ) -> web.StreamResponse:
        completed = False
        try:
            x.upstream_request_id = upstream.headers.get("x-amz-request-id")
            out_headers = response_headers(upstream.headers)
            out_headers["x-bedrock-proxy-request-id"] = x.request_id
            if x.upstream is not None:
                out_headers["x-bedrock-proxy-upstream"] = x.upstream
            if upstream.status >= 400 and request.method != "HEAD":
                # An error names the server's principal: not to the client (small XML).
                data = redact_principals(await self.upstream.read_whole(upstream))
                completed = True
                x.upstream_done = time.perf_counter()
                x.bytes_out = len(data)
                return web.Response(status=upstream.status, body=data, headers=out_headers)
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if request.method == "HEAD" or upstream.status in (204, 304):
                await response.write_eof()
                completed = True
            else:
                completed = await self.upstream.relay(request, upstream, response, x, None)
            x.upstream_done = time.perf_counter()
            return response
        finally:
            upstream.finish(completed)


class BodyMismatch(Exception):
    """The uploaded body is not what the client declared; the argument is the S3 code."""

    def __init__(self, code: str = "XAmzContentSHA256Mismatch") -> None:
        super().__init__(code)
        self.code = code

    def as_error(self) -> errors.AwsError:
        return errors.AwsError(400, self.code, _BODY_ERRORS[self.code])


_BODY_ERRORS = {
    "XAmzContentSHA256Mismatch": (
        "The provided 'x-amz-content-sha256' header does not match the body"
    ),
    "IncompleteBody": (
        "You did not provide the number of bytes specified by the Content-Length header"
    ),
    "EntityTooLarge": "Your proposed upload exceeds the maximum allowed size",
    "RequestTimeout": (
        "Your socket connection to the server was not read from or written to within the "
        "timeout period. Idle connections will be closed."
    ),
}
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


async def _stream_body(
    request: web.Request,
    length: int | None,
    declared: str,
    limit: int,
    idle: float,
    x: Exchange,
) -> AsyncIterator[bytes]:
    """The request body as it arrives. One chunk is always held back until the end is
    known, so a body that does not hash to its declared SHA-256, is shorter than its
    Content-Length, or grows past the limit is never sent whole. A client silent for
    ``idle`` seconds mid-body is ended (S3's RequestTimeout): an upload of gigabytes has
    no total deadline, but a stalled one must not hold its connections."""
    digest = hashlib.sha256() if _HEX_SHA256.fullmatch(declared) else None
    received = 0
    pending: bytes | None = None
    content = request.content
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await content.readany()
        except TimeoutError:
            raise BodyMismatch("RequestTimeout") from None
        if not chunk:
            break
        received += len(chunk)
        x.bytes_in = received
        if received > limit or (length is not None and received > length):
            raise BodyMismatch("EntityTooLarge")
        if digest is not None:
            digest.update(chunk)
        if pending is not None:
            yield pending
        pending = chunk
    if length is not None and received != length:
        raise BodyMismatch("IncompleteBody")
    if digest is not None and digest.hexdigest() != declared:
        raise BodyMismatch("XAmzContentSHA256Mismatch")
    if pending is not None:
        yield pending
