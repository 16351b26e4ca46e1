"""AWS Signature Version 4: signing requests upstream and verifying clients' signatures.

Written for the hot path: derived signing keys are cached per (secret, day, region,
service), and the canonical request is built from exactly the bytes that go on the wire.
For every service but S3 AWS encodes the (already encoded) path once more; S3 does not.
Tests cross-check this module against botocore's ``SigV4Auth`` on random inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_QUERY_SAFE = "-_.~"

_key_cache: dict[tuple[str, str, str, str], bytes] = {}
_KEY_CACHE_MAX = 256
# The final HMAC of each signing key, keyed and ready to copy: ``hmac.digest(key, ...,
# "sha256")`` looks the digest up in OpenSSL (EVP_MD_fetch) on every call, which the
# profile put at ~10 us per signed request under load; a copy skips the lookup.
_mac_cache: dict[bytes, Any] = {}
_keyed_mac: Callable[..., Any] = hmac.new
with contextlib.suppress(ImportError):  # (a Python built without OpenSSL has no _hashlib)
    import _hashlib

    # OpenSSL's HMAC, which ``hmac.HMAC`` wraps: copied, fed and read without the wrapper's
    # three Python methods (callgrind: 3,300 instructions fewer a signature, of 66,000).
    _keyed_mac = _hashlib.hmac_new


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None

    def __repr__(self) -> str:  # never print a secret, even by accident
        return f"Credentials(access_key={self.access_key[:4]}…)"


_last_date: tuple[int, str] = (0, "")


def amz_date(now: datetime | None = None) -> str:
    """The X-Amz-Date for now; formatted once per second, not once per request."""
    global _last_date
    if now is not None:
        return now.strftime("%Y%m%dT%H%M%SZ")
    second = int(time.time())
    if _last_date[0] != second:
        _last_date = (second, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second)))
    return _last_date[1]


def signing_key(secret: str, day: str, region: str, service: str) -> bytes:
    cache_key = (secret, day, region, service)
    key = _key_cache.get(cache_key)
    if key is None:
        key = _hmac(("AWS4" + secret).encode(), day)
        key = _hmac(key, region)
        key = _hmac(key, service)
        key = _hmac(key, "aws4_request")
        if len(_key_cache) >= _KEY_CACHE_MAX:
            _key_cache.clear()
        _key_cache[cache_key] = key
    return key


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.digest(key, msg.encode(), "sha256")


_uri_cache: dict[str, str] = {}
_CACHED_PATH_MAX = 512


def canonical_uri(raw_path: str, double_encode: bool = True) -> str:
    if not raw_path:
        return "/"
    if not double_encode:
        return raw_path
    uri = _uri_cache.get(raw_path)
    if uri is None:
        uri = quote(raw_path, safe="/~")
        if len(raw_path) <= _CACHED_PATH_MAX:  # paths are client input: bound what is kept
            if len(_uri_cache) >= _KEY_CACHE_MAX * 16:
                _uri_cache.clear()
            _uri_cache[raw_path] = uri
    return uri


def canonical_query(raw_query: str) -> str:
    """AWS decodes each key and value, re-encodes them strictly, and sorts the pairs."""
    if not raw_query:
        return ""
    pairs = []
    for part in raw_query.split("&"):
        key, _, value = part.partition("=")
        pairs.append(
            (quote(unquote(key), safe=_QUERY_SAFE), quote(unquote(value), safe=_QUERY_SAFE))
        )
    pairs.sort()
    return "&".join(f"{k}={v}" for k, v in pairs)


def canonical_request(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, str],
    signed_names: list[str],
    payload_hash: str,
    double_encode: bool = True,
) -> str:
    """``headers`` is keyed by lower-case name; ``signed_names`` is sorted and lower-case."""
    lines = [
        method,
        canonical_uri(raw_path, double_encode),
        canonical_query(raw_query),
    ]
    for name in signed_names:
        value = headers[name]
        # Runs of whitespace become one space, and the ends are trimmed: split and join
        # only a value that may have any to change. Every character ``split`` breaks on
        # but the space is unprintable, so a printable value without a leading, trailing
        # or double space is its own canonical form (the common case, ~3x cheaper).
        # (Slices, not startswith/endswith: no argument parsing, on every signed header.)
        if not value.isprintable() or "  " in value or value[:1] == " " or value[-1:] == " ":
            value = " ".join(value.split())
        lines.append(f"{name}:{value}")
    lines.append("")
    lines.append(";".join(signed_names))
    lines.append(payload_hash)
    return "\n".join(lines)


def _string_to_sign(date: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f"{ALGORITHM}\n{date}\n{scope}\n{digest}"


def sign(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: dict[str, str],
    payload_hash: str,
    credentials: Credentials,
    region: str,
    service: str,
    date: str,
    double_encode: bool = True,
) -> str:
    """Add x-amz-date (and the session token) to ``headers`` and return the Authorization value.

    ``headers`` must hold lower-case names and include ``host``; every header in it is signed,
    so the caller puts in it only headers no hop will change.
    """
    headers["x-amz-date"] = date
    if credentials.token:
        headers["x-amz-security-token"] = credentials.token
    names = sorted(headers)
    scope = f"{date[:8]}/{region}/{service}/aws4_request"
    canonical = canonical_request(
        method, raw_path, raw_query, headers, names, payload_hash, double_encode
    )
    key = signing_key(credentials.secret_key, date[:8], region, service)
    mac = _mac_cache.get(key)
    if mac is None:
        if len(_mac_cache) >= _KEY_CACHE_MAX:
            _mac_cache.clear()
        mac = _mac_cache[key] = _keyed_mac(key, digestmod="sha256")
    mac = mac.copy()
    mac.update(_string_to_sign(date, scope, canonical).encode())
    return (
        f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={mac.hexdigest()}"
    )


# ---------------------------------------------------------------- verification

_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+"
    r"Credential=(?P<akid>[^/,\s]+)/(?P<day>\d{8})/(?P<region>[^/,\s]+)/(?P<service>[^/,\s]+)"
    r"/aws4_request\s*,\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+)\s*,\s*"
    r"Signature=(?P<signature>[0-9a-f]{64})\s*"
)


@dataclass(frozen=True, slots=True)
class ParsedAuthorization:
    access_key: str
    day: str
    region: str
    service: str
    signed_headers: list[str]
    signature: str


class SignatureError(Exception):
    """Why a signature was rejected; ``code`` is the AWS error code to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_authorization(value: str) -> ParsedAuthorization | None:
    m = _AUTH_RE.fullmatch(value.strip())
    if m is None:
        return None
    return ParsedAuthorization(
        access_key=m["akid"],
        day=m["day"],
        region=m["region"],
        service=m["service"],
        signed_headers=m["signed"].split(";"),
        signature=m["signature"],
    )


def scope_region(authorization: str) -> str | None:
    """The region in a SigV4 Authorization's credential scope, without verifying anything."""
    parsed = parse_authorization(authorization) if authorization.startswith(ALGORITHM) else None
    return parsed.region if parsed else None


def verify(
    *,
    parsed: ParsedAuthorization,
    secret_key: str,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, str],
    payload_hash: str,
    now: datetime,
    max_skew_seconds: int = 900,
    double_encode: bool = True,
) -> None:
    """Check a client's signature the way AWS does; raise ``SignatureError`` if it is wrong.

    ``headers`` maps lower-case names to values as received.
    """
    date = headers.get("x-amz-date")
    if date is None:
        raise SignatureError("IncompleteSignatureException", "Missing X-Amz-Date header")
    try:
        signed_at = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise SignatureError("IncompleteSignatureException", "Malformed X-Amz-Date") from None
    if abs((now - signed_at).total_seconds()) > max_skew_seconds:
        raise SignatureError(
            "InvalidSignatureException",
            f"Signature expired: {date} is now earlier or later than the allowed "
            f"{max_skew_seconds // 60} minutes of clock skew",
        )
    if date[:8] != parsed.day:
        raise SignatureError("InvalidSignatureException", "Credential scope date does not match")
    names = parsed.signed_headers
    # Over HTTP/2 clients sign the :authority pseudo-header in place of host (the AWS SDK
    # for JavaScript does); the caller maps it to the request's authority.
    if ("host" not in names and ":authority" not in names) or names != sorted(names):
        raise SignatureError("InvalidSignatureException", "SignedHeaders must include host, sorted")
    missing = [n for n in names if n not in headers]
    if missing:
        raise SignatureError(
            "InvalidSignatureException", f"Signed header {missing[0]} is not in the request"
        )
    canonical = canonical_request(
        method, raw_path, raw_query, headers, names, payload_hash, double_encode
    )
    scope = f"{parsed.day}/{parsed.region}/{parsed.service}/aws4_request"
    key = signing_key(secret_key, parsed.day, parsed.region, parsed.service)
    expected = hmac.new(key, _string_to_sign(date, scope, canonical).encode(), hashlib.sha256)
    if not hmac.compare_digest(expected.hexdigest(), parsed.signature):
        raise SignatureError(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided.",
        )
