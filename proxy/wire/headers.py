"""Which headers cross the proxy, in each direction.

Requests: an allow-list. Only what AWS reads goes upstream, so no client credential, no
other gateway's key header, no ``x-forwarded-*`` and none of our own headers can leak.
Responses: everything but hop-by-hop headers, so upstream errors pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from . import errors

# Forwarded and signed: no hop changes them.
_SIGNED_EXACT = frozenset(
    {
        "content-type",
        "accept",
        "content-encoding",
        "content-md5",
        # AgentCore's own request headers (its service model's header members): the tool
        # session a call is for, and an MCP server's session and call.
        "x-amzn-code-interpreter-session-id",
        "x-amzn-browser-session-id",
        "mcp-session-id",
        "mcp-protocol-version",
        "mcp-method",
        "mcp-name",
    }
)
# Forwarded, not signed. Not Accept-Encoding: usage is read from the response as it passes,
# so a compressed response would go unmetered (and a budget unenforced).
_UNSIGNED_EXACT = frozenset(
    {
        "user-agent",
        "range",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "cache-control",
        "content-disposition",
        "content-language",
        "expires",
        "amz-sdk-invocation-id",
        "amz-sdk-request",
        # Tracing context AgentCore carries into an agent's own spans.
        "x-amzn-trace-id",
        "traceparent",
        "tracestate",
        "baggage",
    }
)
_SIGNED_PREFIXES = ("x-amz-", "x-amzn-bedrock-")
# Client credentials and values the proxy sets itself.
_NEVER = frozenset(
    {
        "x-amz-date",
        "x-amz-security-token",
        "x-amz-content-sha256",
        "x-amz-user-agent",
    }
)
# The commonest headers that are never forwarded (the proxy sets its own, or they are the
# client's credentials): known at once, not tested against each prefix in turn.
_DROPPED = frozenset(
    {"host", "content-length", "authorization", "x-api-key", "accept-encoding", "connection"}
)

# Headers that may legitimately appear more than once (list-valued, added by hops on the
# way) and that the proxy neither reads nor forwards. Any other header is single-valued:
# the policy would read one copy and the upstream another.
_REPEATABLE = frozenset(
    {
        "accept-encoding",
        "accept-language",
        "cookie",
        "via",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "connection",
        "te",
    }
)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


# Spend annotations (``metering.annotations``): read by the proxy, never sent upstream.
ANNOTATION_PREFIXES = ("xproxy-", "x-bedrock-proxy-")


@dataclass(slots=True)
class RequestHeaders:
    """A request's headers, sorted once: what is signed and sent, what is sent unsigned
    (lower-case names), and the annotation headers, for metering."""

    signed: dict[str, str]
    unsigned: dict[str, str]
    annotations: list[tuple[str, str]]  # (lower-case name, value)


def sort_request_headers(
    headers: CIMultiDictProxy[str],
    signed_prefixes: tuple[str, ...] = (),
    unsigned_prefixes: tuple[str, ...] = (),
) -> RequestHeaders:
    """Check a request's headers and sort them, in one pass (every request's headers
    were walked three times, lower-casing each name every time). A front may forward
    more: headers under ``signed_prefixes`` signed, under ``unsigned_prefixes`` not.

    The checks, a 400 otherwise: one value per header that matters, and only ASCII. A
    second copy of a header would let the policy check one value while the upstream acts
    on the other; a byte outside ASCII cannot be signed the way AWS reads it.
    """
    seen: set[str] = set()
    signed: dict[str, str] = {}
    unsigned: dict[str, str] = {}
    annotations: list[tuple[str, str]] = []
    connection_listed = _connection_tokens(headers)
    for name, value in headers.items():
        lname = name.lower()
        if lname in seen and lname not in _REPEATABLE:
            raise errors.validation(f"The header {name} must appear only once")
        seen.add(lname)
        if not value.isascii():
            raise errors.validation(f"The header {name} has a value that is not ASCII")
        # Exact names first: the usual request's headers are all known by a set lookup,
        # with no prefix test (``startswith`` parses its arguments: ~500 instructions).
        if lname in _DROPPED:
            continue
        if lname in connection_listed:  # hop-by-hop, unless addressed to the proxy itself
            if lname.startswith(ANNOTATION_PREFIXES):
                annotations.append((lname, value))
        elif lname in _SIGNED_EXACT:
            signed[lname] = value
        elif lname in _UNSIGNED_EXACT:
            unsigned[lname] = value
        elif lname.startswith(ANNOTATION_PREFIXES):
            annotations.append((lname, value))
        elif lname.startswith(_SIGNED_PREFIXES):
            if lname not in _NEVER:
                signed[lname] = value
        elif signed_prefixes and lname not in _NEVER:
            if lname.startswith(signed_prefixes):
                signed[lname] = value
            elif lname.startswith(unsigned_prefixes):
                unsigned[lname] = value
    return RequestHeaders(signed, unsigned, annotations)


def forwarded_amz(lname: str) -> bool:
    """An ``x-amz-*``/``x-amzn-bedrock-*`` header that goes upstream, signed by the proxy:
    for a SigV4 client it must have been signed by the client too."""
    return lname.startswith(_SIGNED_PREFIXES) and lname not in _NEVER


def response_headers(headers: MultiMapping[str]) -> CIMultiDict[str]:
    """Upstream response headers minus hop-by-hop ones (and those Connection names)."""
    out: CIMultiDict[str] = CIMultiDict()
    connection_listed = _connection_tokens(headers)
    for name, value in headers.items():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in connection_listed or lname == "content-length":
            continue
        out.add(name, value)
    return out


def _connection_tokens(headers: MultiMapping[str]) -> frozenset[str]:
    connection = headers.get("Connection")
    if not connection:
        return frozenset()
    tokens = _TOKENS.get(connection)
    if tokens is None:
        tokens = frozenset(t.strip().lower() for t in connection.split(",") if t.strip())
        if len(_TOKENS) < 64:  # nearly always "keep-alive" or "close"; bounded all the same
            _TOKENS[connection] = tokens
    return tokens


_TOKENS: dict[str, frozenset[str]] = {}
