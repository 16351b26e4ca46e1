"""The signer and verifier, cross-checked against botocore's SigV4Auth on random inputs."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire import sigv4

segment = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/"), min_size=1, max_size=12
).filter(lambda s: s not in (".", ".."))
header_value = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)
query_item = st.tuples(
    st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=8),
    st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=8),
)


def _botocore_signature(method, url, headers, body, date, creds, region, service):
    request = AWSRequest(method=method, url=url, data=body, headers=headers)
    request.context["timestamp"] = date
    signer = SigV4Auth(BotoCredentials(*creds), service, region)
    canonical = signer.canonical_request(request)
    return signer.signature(signer.string_to_sign(request, canonical), request)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    segments=st.lists(segment, min_size=1, max_size=4),
    query=st.lists(query_item, max_size=4),
    extra=st.dictionaries(
        st.sampled_from(["content-type", "x-amzn-bedrock-trace", "x-amz-meta-a", "accept"]),
        header_value,
        max_size=3,
    ),
    body=st.binary(max_size=64),
    region=st.sampled_from(["us-east-1", "eu-west-3", "ap-southeast-2"]),
    token=st.one_of(
        st.none(),
        st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=30),
    ),
)
def test_signature_matches_botocore(method, segments, query, extra, body, region, token):
    raw_path = "/" + "/".join(quote(s, safe="-_.~") for s in segments)
    raw_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in query)
    date = "20261122T010203Z"
    creds = sigv4.Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    headers = {"host": "bedrock-runtime.example.com", **extra}
    payload_hash = hashlib.sha256(body).hexdigest()
    ours = sigv4.sign(
        method=method,
        raw_path=raw_path,
        raw_query=raw_query,
        headers=headers,
        payload_hash=payload_hash,
        credentials=creds,
        region=region,
        service="bedrock",
        date=date,
    )
    url = f"https://bedrock-runtime.example.com{raw_path}" + (f"?{raw_query}" if raw_query else "")
    theirs = _botocore_signature(
        method,
        url,
        dict(headers),
        body,
        date,
        (creds.access_key, creds.secret_key, token),
        region,
        "bedrock",
    )
    assert ours.endswith(f"Signature={theirs}")
    # And our verifier accepts what botocore signed.
    parsed = sigv4.parse_authorization(ours)
    assert parsed is not None
    sigv4.verify(
        parsed=parsed,
        secret_key=creds.secret_key,
        method=method,
        raw_path=raw_path,
        raw_query=raw_query,
        headers=headers,
        payload_hash=payload_hash,
        now=datetime(2026, 11, 22, 1, 2, 3, tzinfo=UTC),
    )


def _signed_example():
    headers = {"host": "h", "content-type": "application/json"}
    auth = sigv4.sign(
        method="POST",
        raw_path="/model/m%3A0/converse",
        raw_query="",
        headers=headers,
        payload_hash=sigv4.EMPTY_SHA256,
        credentials=sigv4.Credentials("AKID", "secret"),
        region="us-east-1",
        service="bedrock",
        date="20261122T010203Z",
    )
    return sigv4.parse_authorization(auth), headers


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"secret_key": "other"}, "InvalidSignatureException"),
        ({"payload_hash": hashlib.sha256(b"tampered").hexdigest()}, "InvalidSignatureException"),
        ({"raw_path": "/model/m%3A1/converse"}, "InvalidSignatureException"),
        (
            {"now": datetime(2026, 11, 22, 1, 2, 3, tzinfo=UTC) + timedelta(minutes=16)},
            "InvalidSignatureException",
        ),
    ],
)
def test_verify_rejects(change, code):
    parsed, headers = _signed_example()
    args = dict(
        parsed=parsed,
        secret_key="secret",
        method="POST",
        raw_path="/model/m%3A0/converse",
        raw_query="",
        headers=headers,
        payload_hash=sigv4.EMPTY_SHA256,
        now=datetime(2026, 11, 22, 1, 2, 3, tzinfo=UTC),
    )
    sigv4.verify(**args)  # the unchanged request verifies
    args.update(change)
    with pytest.raises(sigv4.SignatureError) as info:
        sigv4.verify(**args)
    assert info.value.code == code


def test_credentials_repr_hides_secret():
    creds = sigv4.Credentials("AKIDEXAMPLE", "super-secret", "token")
    assert "super-secret" not in repr(creds) and "token" not in repr(creds)


_WHITESPACE = [chr(c) for c in range(0x3001) if chr(c).isspace()]


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.sampled_from([" ", "a", "-", "\u00e9", *_WHITESPACE]), max_size=10))
def test_canonical_header_values_are_trimmed_as_split_and_join_would(value):
    """The fast path that skips split/join must give the same canonical line for every
    value: each whitespace character ``str.split`` breaks on, at the ends and in runs."""
    canonical = sigv4.canonical_request("GET", "/", "", {"x-h": value}, ["x-h"], "0")
    assert canonical.split("\n")[3] == "x-h:" + " ".join(value.split())
