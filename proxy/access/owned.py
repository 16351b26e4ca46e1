"""AgentCore sessions belong to the key that started them, as jobs do.

AWS keeps no owner per caller: every key of the proxy calls as the server's principal, so
without this any key could invoke, stop, read or list another key's code interpreter or
browser session, continue its runtime session, or read its memory session's events. A
session is recorded for its key when it is started (the start's answer names it) or,
where AWS lets the caller name it (a runtime session id, a memory's actor and session),
claimed by the first key that uses it. Afterwards only that key may use it, and listings
show a key only its own. The master key is not restricted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs

import orjson

from ..exchange import Identity
from ..store import Store
from ..wire import errors
from ..wire.routing import Operation
from ..wire.strictjson import parse_strict

RUNTIME_SESSION_HEADER = "x-amzn-bedrock-agentcore-runtime-session-id"
CODE_INTERPRETER_SESSION_HEADER = "x-amzn-code-interpreter-session-id"
BROWSER_SESSION_HEADER = "x-amzn-browser-session-id"

# Operations on one code interpreter or browser session, and where the session id is.
_TOOL_SESSIONS = {
    "InvokeCodeInterpreter": ("ci", "codeInterpreterIdentifier", "header"),
    "GetCodeInterpreterSession": ("ci", "codeInterpreterIdentifier", "query"),
    "StopCodeInterpreterSession": ("ci", "codeInterpreterIdentifier", "query"),
    "InvokeBrowser": ("browser", "browserIdentifier", "header"),
    "GetBrowserSession": ("browser", "browserIdentifier", "query"),
    "StopBrowserSession": ("browser", "browserIdentifier", "query"),
    "UpdateBrowserStream": ("browser", "browserIdentifier", "query"),
    "SaveBrowserSessionProfile": ("browser", "browserIdentifier", "body"),
}
# Starts whose answer names the new session.
_STARTS = {
    "StartCodeInterpreterSession": ("ci", "codeInterpreterIdentifier"),
    "StartBrowserSession": ("browser", "browserIdentifier"),
}
# Runtime operations whose session the caller may name (claimed at first use); a harness
# is named in the query.
_RUNTIME = frozenset(
    {
        "InvokeAgentRuntime",
        "InvokeAgentRuntimeCommand",
        "StopRuntimeSession",
        "GetAgentCard",
        "InvokeHarness",
    }
)
# Memory operations on one actor's session, named in the path or the body.
_MEMORY_EVENTS = frozenset({"ListEvents", "GetEvent", "DeleteEvent"})
# Operations whose body names the session (or its tool): the front reads it for them.
OWNED_BODIES = frozenset({"CreateEvent", "SaveBrowserSessionProfile"})
# Listings filtered to a key's own sessions: the list member, and how an entry names one.
_LISTINGS = {
    "ListCodeInterpreterSessions": ("items", "sessionId", "ci", "codeInterpreterIdentifier"),
    "ListBrowserSessions": ("items", "sessionId", "browser", "browserIdentifier"),
    "ListSessions": ("sessionSummaries", "sessionId", "mem", ""),
}


@dataclass(frozen=True, slots=True)
class Claim:
    """A session to record for the key once the call succeeds (the answer names it)."""

    # Where the answer names it, when the request did not (a runtime session AWS made).
    from_header: str | None = None
    prefix: str = ""
    # A listing, to filter to the key's own sessions under ``prefix``.
    listing: bool = False


def _id(value: str) -> str:
    """A resource's own id, from an id or an ARN: sessions are keyed by it, so that naming
    a memory or a tool by ARN in one call and by id in the next is the same session."""
    if not value.startswith("arn:"):
        return value
    segments = value.split(":", 5)[-1].split("/")
    return segments[1] if len(segments) > 1 else segments[0]


class OwnedSessions:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def check(
        self,
        identity: Identity,
        op: Operation,
        labels: Mapping[str, str],
        headers: Mapping[str, str],
        query: str,
        body: bytes | None,
    ) -> Claim | None:
        """Refuse a session of another key; what to record once the call succeeds."""
        key_id = identity.key_id
        if op.service.name != "bedrock-agentcore" or identity.record is None or not key_id:
            return None
        name = op.name
        if name in _TOOL_SESSIONS:
            kind, label, where = _TOOL_SESSIONS[name]
            session = _session_id(where, headers, query, body, kind)
            tool = labels.get(label) or _json(body).get(label)
            if not session or not isinstance(tool, str):
                raise errors.validation(
                    f"{name} needs the session's id: an API key uses only sessions it started"
                )
            await self._must_own(key_id, f"{kind}/{_id(tool)}/{session}", "session")
            return None
        if name in _STARTS:
            kind, label = _STARTS[name]
            return Claim(prefix=f"{kind}/{_id(labels[label])}/")
        if name in _RUNTIME:
            named_runtime = labels.get("agentRuntimeArn") or _query_value(query, "harnessArn")
            runtime = _id(named_runtime)
            session = headers.get(RUNTIME_SESSION_HEADER, "")
            if session:
                await self._claim_or_refuse(key_id, f"runtime/{runtime}/{session}")
                return None
            return Claim(from_header=RUNTIME_SESSION_HEADER, prefix=f"runtime/{runtime}/")
        if name == "CreateEvent":
            fields = _json(body)
            actor, named = fields.get("actorId"), fields.get("sessionId")
            if isinstance(actor, str) and isinstance(named, str):
                ref = f"mem/{_id(labels.get('memoryId', ''))}/{actor}/{named}"
                await self._claim_or_refuse(key_id, ref)
            return None
        if name in _MEMORY_EVENTS:
            memory = _id(labels["memoryId"])
            ref = f"mem/{memory}/{labels['actorId']}/{labels['sessionId']}"
            await self._must_own(key_id, ref, "memory session")
        if name in _LISTINGS:
            _, _, kind, label = _LISTINGS[name]
            scope = (
                f"mem/{_id(labels.get('memoryId', ''))}/{labels.get('actorId', '')}/"
                if kind == "mem"
                else f"{kind}/{_id(labels.get(label, ''))}/"
            )
            return Claim(prefix=scope, listing=True)
        return None

    async def remember(
        self,
        identity: Identity,
        claim: Claim,
        response_headers: Mapping[str, str],
        body: bytes | None,
    ) -> None:
        """A started session, or one AWS named for the caller, recorded for its key."""
        if identity.key_id is None:
            return
        session: object = None
        if claim.listing:
            return
        if claim.from_header is not None:
            session = response_headers.get(claim.from_header)
        elif body is not None:
            session = _json(body).get("sessionId")
        if isinstance(session, str) and session:
            await self._store.owned.claim(claim.prefix + session, identity.key_id)

    async def filter_listing(
        self, identity: Identity, op: Operation, claim: Claim, body: bytes
    ) -> bytes:
        """A session listing as this key may see it: only its own sessions."""
        if identity.key_id is None or op.name not in _LISTINGS:
            return body
        member, id_member, _, _ = _LISTINGS[op.name]
        try:
            document = orjson.loads(body)
            entries = document[member]
            refs = [f"{claim.prefix}{entry[id_member]}" for entry in entries]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise errors.service_unavailable("The upstream listing could not be read") from None
        owned = await self._store.owned.owned(identity.key_id, refs)
        document[member] = [e for e, ref in zip(entries, refs, strict=True) if ref in owned]
        return orjson.dumps(document)

    async def _must_own(self, key_id: str, ref: str, what: str) -> None:
        if await self._store.owned.owner(ref) != key_id:
            raise errors.access_denied(
                f"The API key may only use {what}s it started; this one is not one of them"
            )

    async def _claim_or_refuse(self, key_id: str, ref: str) -> None:
        if await self._store.owned.claim(ref, key_id) != key_id:
            raise errors.access_denied(
                "The API key may only use sessions it started; this one is another key's"
            )


def _session_id(
    where: str, headers: Mapping[str, str], query: str, body: bytes | None, kind: str
) -> str:
    if where == "header":
        header = CODE_INTERPRETER_SESSION_HEADER if kind == "ci" else BROWSER_SESSION_HEADER
        return headers.get(header, "")
    if where == "query":
        return _query_value(query, "sessionId")
    value = _json(body).get("sessionId")
    return value if isinstance(value, str) else ""


def _query_value(query: str, name: str) -> str:
    values = parse_qs(query).get(name, [])
    if len(values) > 1:  # one for the check, another for AWS: refused
        raise errors.validation(f"{name} appears more than once")
    return values[0] if values else ""


def _json(body: bytes | None) -> dict[str, object]:
    """A request body read strictly (a duplicate member is refused): AWS must act on the
    session the check read, not on another copy of the member."""
    if not body:
        return {}
    document = parse_strict(body)
    return document if isinstance(document, dict) else {}
