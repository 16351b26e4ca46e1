"""A fake S3 for the files tests: path-style buckets on one loopback port.

It verifies SigV4 as S3 does (canonical URI not double-encoded, ``x-amz-content-sha256``
required and, when a hex digest, checked against the body), answers in S3's XML, and keeps
objects in memory: put/get (Range)/head (If-Match, If-None-Match)/delete, ListObjectsV2 with
prefix and continuation, and multipart uploads.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import MISSING, dataclass, field, fields
from urllib.parse import parse_qsl, unquote
from xml.sax.saxutils import escape

from aiohttp import web

from tests.fake_bedrock import UPSTREAM_ACCESS_KEY, UPSTREAM_SECRET_KEY
from tests.sigcheck import expected_signature

_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
    r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})"
)
_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


@dataclass
class Obj:
    data: bytes
    etag: str
    content_type: str


@dataclass
class FakeS3:
    buckets: dict[str, dict[str, Obj]] = field(default_factory=dict)
    uploads: dict[str, dict[int, Obj]] = field(default_factory=dict)
    upload_keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    max_body_seen: int = 0
    chunked_uploads: int = 0
    # Another account's S3 (upstream routing): the access key and secret it takes instead.
    account_key: tuple[str, str] | None = None

    def reset(self) -> None:
        """Every field back to its default between tests, so no test sees another's
        settings or records."""
        for spec in fields(self):
            if spec.default_factory is not MISSING:
                setattr(self, spec.name, spec.default_factory())
            else:
                setattr(self, spec.name, spec.default)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2 * 1024**3)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.max_body_seen = max(self.max_body_seen, len(body))
        self.requests.append((request.method, request.raw_path, dict(request.headers)))
        denied = self._check(request, body)
        if denied is not None:
            return denied
        path, _, raw_query = request.raw_path.partition("?")
        query = dict(parse_qsl(raw_query, keep_blank_values=True))
        parts = path.lstrip("/").split("/", 1)
        bucket = unquote(parts[0])
        key = unquote(parts[1]) if len(parts) > 1 else ""
        objects = self.buckets.setdefault(bucket, {})
        method = request.method
        if not key:
            if method == "GET" and query.get("list-type") == "2":
                return self._list(bucket, objects, query)
            return s3_error(400, "InvalidRequest", "unsupported bucket operation")
        if method == "POST" and "uploads" in query:
            upload_id = f"upload-{len(self.upload_keys) + 1}"
            self.uploads[upload_id] = {}
            self.upload_keys[upload_id] = (bucket, key)
            return xml(
                f'<InitiateMultipartUploadResult xmlns="{_NS}"><Bucket>{escape(bucket)}</Bucket>'
                f"<Key>{escape(key)}</Key><UploadId>{upload_id}</UploadId></InitiateMultipartUploadResult>"
            )
        if "uploadId" in query:
            return self._multipart(request, query, bucket, key, objects, body)
        if method == "PUT":
            if "aws-chunked" in request.headers.get("Content-Encoding", ""):
                decoded = decode_aws_chunked(body, request.headers)
                if decoded is None:
                    return s3_error(
                        400,
                        "BadDigest",
                        "The CRC32 you specified did not match the calculated checksum.",
                    )
                body = decoded
                self.chunked_uploads += 1
            etag = f'"{hashlib.md5(body).hexdigest()}"'
            objects[key] = Obj(
                body, etag, request.headers.get("Content-Type", "binary/octet-stream")
            )
            return web.Response(headers={"ETag": etag})
        obj = objects.get(key)
        if method == "DELETE":
            objects.pop(key, None)
            return web.Response(status=204)
        if obj is None:
            return s3_error(
                404, "NoSuchKey", "The specified key does not exist.", head=method == "HEAD"
            )
        if method in ("GET", "HEAD"):
            if_match = request.headers.get("If-Match")
            if if_match is not None and if_match != obj.etag:
                return s3_error(
                    412,
                    "PreconditionFailed",
                    "At least one of the pre-conditions you specified did not hold",
                    head=method == "HEAD",
                )
            if request.headers.get("If-None-Match") == obj.etag:
                return web.Response(status=304, headers={"ETag": obj.etag})
            headers = {"ETag": obj.etag, "Content-Type": obj.content_type, "Accept-Ranges": "bytes"}
            data = obj.data
            status = 200
            rng = request.headers.get("Range")
            if rng:
                start, _, end = rng.removeprefix("bytes=").partition("-")
                first, last = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                data = data[first : last + 1]
                status = 206
            if method == "HEAD":
                headers["Content-Length"] = str(len(data))
                return web.Response(status=status, headers=headers)
            return web.Response(status=status, body=data, headers=headers)
        return s3_error(405, "MethodNotAllowed", "method not allowed")

    def _multipart(self, request, query, bucket, key, objects, body):
        upload_id = query["uploadId"]
        parts = self.uploads.get(upload_id)
        if parts is None:
            return s3_error(404, "NoSuchUpload", "The specified upload does not exist.")
        if request.method == "PUT":
            etag = f'"{hashlib.md5(body).hexdigest()}"'
            parts[int(query["partNumber"])] = Obj(body, etag, "")
            return web.Response(headers={"ETag": etag})
        if request.method == "DELETE":
            del self.uploads[upload_id]
            return web.Response(status=204)
        if request.method == "GET":
            items = "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(p.etag)}</ETag><Size>{len(p.data)}</Size></Part>"
                for n, p in sorted(parts.items())
            )
            return xml(
                f'<ListPartsResult xmlns="{_NS}"><Bucket>{escape(bucket)}</Bucket><Key>{escape(key)}</Key>'
                f"<UploadId>{upload_id}</UploadId>{items}</ListPartsResult>"
            )
        # POST: complete
        data = b"".join(parts[n].data for n in sorted(parts))
        digest = hashlib.md5(
            b"".join(bytes.fromhex(parts[n].etag.strip('"')) for n in sorted(parts))
        ).hexdigest()
        etag = f'"{digest}-{len(parts)}"'
        objects[key] = Obj(data, etag, "binary/octet-stream")
        del self.uploads[upload_id]
        return xml(
            f'<CompleteMultipartUploadResult xmlns="{_NS}"><Bucket>{escape(bucket)}</Bucket>'
            f"<Key>{escape(key)}</Key><ETag>{escape(etag)}</ETag></CompleteMultipartUploadResult>"
        )

    def _list(self, bucket, objects, query):
        prefix = query.get("prefix", "")
        limit = int(query.get("max-keys", "1000"))
        keys = sorted(k for k in objects if k.startswith(prefix))
        after = query.get("continuation-token") or query.get("start-after") or ""
        keys = [k for k in keys if k > after]
        page, more = keys[:limit], len(keys) > limit
        contents = "".join(
            f"<Contents><Key>{escape(k)}</Key><ETag>{escape(objects[k].etag)}</ETag><Size>{len(objects[k].data)}</Size>"
            f"<LastModified>2026-11-22T00:00:00.000Z</LastModified><StorageClass>STANDARD</StorageClass></Contents>"
            for k in page
        )
        token = f"<NextContinuationToken>{escape(page[-1])}</NextContinuationToken>" if more else ""
        return xml(
            f'<ListBucketResult xmlns="{_NS}"><Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>'
            f"<KeyCount>{len(page)}</KeyCount><MaxKeys>{limit}</MaxKeys><IsTruncated>{'true' if more else 'false'}</IsTruncated>"
            f"{contents}{token}</ListBucketResult>"
        )

    def _check(self, request: web.Request, body: bytes) -> web.Response | None:
        m = _AUTH_RE.fullmatch(request.headers.get("Authorization", ""))
        head = request.method == "HEAD"
        if m is None:
            return s3_error(403, "AccessDenied", "Access Denied", head=head)
        akid, _day, region, service, signed, signature = m.groups()
        expected, secret = self.account_key or (UPSTREAM_ACCESS_KEY, UPSTREAM_SECRET_KEY)
        if akid != expected or service != "s3":
            return s3_error(
                403,
                "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records.",
                head=head,
            )
        date = request.headers.get("X-Amz-Date", "")
        if (
            abs(time.time() - time.mktime(time.strptime(date, "%Y%m%dT%H%M%SZ")) + time.timezone)
            > 900
        ):
            return s3_error(403, "RequestTimeTooSkewed", "skewed", head=head)
        declared = request.headers.get("X-Amz-Content-SHA256")
        if declared is None:
            return s3_error(
                400,
                "InvalidRequest",
                "Missing required header for this request: x-amz-content-sha256",
                head=head,
            )
        if (
            not declared.startswith(("UNSIGNED-PAYLOAD", "STREAMING-"))
            and declared != hashlib.sha256(body).hexdigest()
        ):
            return s3_error(
                400,
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
                head=head,
            )
        names = signed.split(";")
        for name in request.headers:
            if name.lower().startswith("x-amz-") and name.lower() not in names:
                return s3_error(403, "AccessDenied", f"{name} must be signed", head=head)
        expected = expected_signature(
            request,
            body,
            names,
            (akid, secret, request.headers.get("X-Amz-Security-Token")),
            "s3",
            region,
            date,
        )
        if expected != signature:
            return s3_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
                head=head,
            )
        return None


def decode_aws_chunked(body: bytes, headers) -> bytes | None:
    """aws-chunked: "<hex size>\\r\\n<data>\\r\\n" ..., a zero chunk, then trailers. The
    data must match x-amz-decoded-content-length and the CRC32 trailer, if any."""
    import base64
    import zlib

    data, pos = b"", 0
    while True:
        line_end = body.index(b"\r\n", pos)
        size = int(body[pos:line_end].split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            break
        data += body[pos : pos + size]
        pos += size + 2
    trailers = dict(line.split(":", 1) for line in body[pos:].decode().split("\r\n") if ":" in line)
    if int(headers.get("x-amz-decoded-content-length", len(data))) != len(data):
        return None
    crc = trailers.get("x-amz-checksum-crc32")
    if (
        crc is not None
        and base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode() != crc.strip()
    ):
        return None
    return data


def xml(body: str, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=('<?xml version="1.0" encoding="UTF-8"?>\n' + body).encode(),
        content_type="application/xml",
    )


def s3_error(status: int, code: str, message: str, head: bool = False) -> web.Response:
    if head:
        return web.Response(status=status)
    return xml(
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message><RequestId>fake-s3</RequestId></Error>",
        status,
    )
