"""SigV4 as AWS computes it, with botocore's own signer (never the proxy's): the fakes
(Bedrock, S3, STS) check every signature they receive against this."""

from __future__ import annotations

from aiohttp import web
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def expected_signature(
    request: web.Request,
    body: bytes,
    signed_headers: list[str],
    credentials: tuple[str, str, str | None],
    service: str,
    region: str,
    date: str,
) -> str:
    """The signature for these signed headers, body and credentials (S3's rules for s3)."""
    aws_request = AWSRequest(
        method=request.method,
        url=f"http://{request.headers['Host']}{request.raw_path}",
        data=body,
        headers={n: request.headers[n] for n in signed_headers if n in request.headers},
    )
    aws_request.context["timestamp"] = date
    signer_class = S3SigV4Auth if service == "s3" else SigV4Auth
    signer = signer_class(Credentials(*credentials), service, region)
    canonical = signer.canonical_request(aws_request)
    return signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)
