"""What a virtual key may do on the OpenAI- and Anthropic-compatible APIs.

Read from the request body, strictly (``parse_strict``: the document Bedrock reads, or a
400), once:

- the ``model``, a string, which the key's ``models`` allow-list checks as it checks a
  native call's path (``policy``, through the ``modelId`` label);
- anything that makes Bedrock act beyond the model's tokens, or names a resource the
  proxy does not govern: server-side tools (web search, code execution or interpreters,
  file search over vector stores, remote MCP servers, image generation, web fetch),
  stored files, containers, stored prompts and projects. These need the key's
  ``server-tools`` group. The tool types a client runs itself (functions, custom tools,
  Anthropic's bash, text editor, computer and memory tools) need nothing. Sources: the
  tool types of https://platform.openai.com/docs/api-reference/responses/create and
  https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/overview; on Bedrock,
  server-side tools run on bedrock-mantle only
  (https://docs.aws.amazon.com/bedrock/latest/userguide/inference-responses-api.html);
- stored state: a response (``previous_response_id``) or a conversation (``conversation``)
  another key created is refused, as on every verb of their own paths.

Stored responses and conversations belong to the key that created them, like async jobs:
Bedrock keeps no owner per caller, since every key calls as the server's principal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ..exchange import Identity
from ..store import Store
from ..wire import compat, errors
from ..wire.routing import Operation
from ..wire.strictjson import parse_strict
from . import policy

GRANT = "server-tools"
# Tool types the client runs itself: Bedrock only passes the model's call back.
_CLIENT_TOOLS = frozenset({"function", "custom"})
_CLIENT_TOOL_PREFIXES = ("bash_", "text_editor_", "computer_", "memory_")
# Body members that name stored resources or projects, at any depth.
_RESOURCE_MEMBERS = frozenset(
    {"file_id", "vector_store_ids", "container", "container_id", "mcp_servers", "project"}
)
# Top-level members that make Bedrock act beyond the model's tokens.
_TOP_LEVEL_GRANTS = frozenset({"web_search_options", "prompt"})
# The headers that name a project or an organisation other than the default one.
_PROJECT_HEADERS = ("openai-project", "openai-organization")
# The member names the checks read, as the body's bytes spell them.
_CHECKED = frozenset(
    name.encode()
    for name in (
        *_RESOURCE_MEMBERS,
        *_TOP_LEVEL_GRANTS,
        "model",
        "previous_response_id",
        "conversation",
        "tools",
    )
)
_RESOURCE_TOKENS = frozenset(name.encode() for name in _RESOURCE_MEMBERS)
_MODEL = frozenset({b"model"})
# A byte is looked for as an int: ``bytes in bytes`` first tries its needle as an int and
# formats the TypeError that fails (~1,500 instructions; an int needle takes ~100).
_BACKSLASH = ord("\\")
# The operations whose body names a model (and may name tools and stored state).
_BODY_OPERATIONS = frozenset(
    name for name, role in compat.ROLES.items() if role in ("model", "create")
)


def _strings(body: bytes) -> list[bytes] | None:
    """Every string of a JSON body (its names and string values), as spelled, or None
    when a name could be spelled with an escape (\\u) or a quote escaped (\\"), so
    that quotes would not delimit strings. One split, where a search per name (or a
    regular expression) cost twice the instructions: ~2,000 a call, most of it parsing
    the call's arguments."""
    if body.find(b"\\") >= 0 and (body.find(b"\\u") >= 0 or body.find(b'\\"') >= 0):
        return None
    return body.split(b'"')[1::2]


@dataclass(slots=True)  # (not frozen: a frozen dataclass's __init__ costs ~1,000 instructions)
class Inspected:
    """What a request says, for the rest of the request."""

    model: str | None
    # A stored response or conversation the request continues (must be the key's own).
    continues: tuple[str, ...] = ()
    # Why the request needs the ``server-tools`` group, if it does.
    needs_grant: str | None = None
    # Whether it asks for a stream (``"stream": true``) rather than one answer.
    streams: bool = False


def inspect(op: Operation, body: bytes, headers: Mapping[str, str]) -> Inspected:
    """The model a create call names, the stored state it continues, and whether it needs
    ``server-tools``; a 400 for a body that is not strict JSON, or names its model in a
    way Bedrock could read differently."""
    # (Membership tests, not calls, where the usual request allows: this runs on every
    # call of these APIs, ~9,000 instructions all told.)
    grant = (
        _header_grant(headers)
        if "openai-project" in headers or "openai-organization" in headers
        else None
    )
    if op.name not in _BODY_OPERATIONS:
        return Inspected(None, needs_grant=grant)
    strings = body.split(b'"')[1::2] if _BACKSLASH not in body else _strings(body)
    found = _CHECKED.intersection(strings) if strings is not None else None
    if found == _MODEL and strings is not None and strings.count(b"model") == 1:
        # The only name the checks read is one "model", and no escape can spell another:
        # any parser reads the same value, so orjson (four times fewer instructions than
        # the strict parser) reads it; anything orjson refuses goes to the strict parser,
        # for its error.
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            document = parse_strict(body)
        model = document.get("model") if type(document) is dict else None
        if type(model) is not str or not model:
            model = _model(document)  # (its error)
        return Inspected(model, (), grant, document.get("stream") is True)
    # Strictly (a duplicate name, a lone surrogate, a NaN is a 400): a second copy of a
    # member the checks read could let the proxy read one value and Bedrock another.
    document = parse_strict(body) if body else None
    model = _model(document)
    assert isinstance(document, dict)
    continues: list[str] = []
    previous = document.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            raise errors.validation("previous_response_id must be a string")
        continues.append(response_ref(op, previous))
    conversation = document.get("conversation")
    if conversation is not None:
        named = conversation.get("id") if isinstance(conversation, dict) else conversation
        if not isinstance(named, str):
            raise errors.validation("conversation must be an id or an object with one")
        continues.append(conversation_ref(op, named))
    # A stored resource can only be named below the top level if its name (or an escape
    # that could spell it) is in the body: most have none, and walking one is not free.
    deep = found is None or not found.isdisjoint(_RESOURCE_TOKENS)
    return Inspected(
        model,
        tuple(continues),
        needs_grant(document, headers, deep),
        document.get("stream") is True,
    )


def _model(document: Any) -> str:
    if not isinstance(document, dict):
        raise errors.validation("The request body must be a JSON object")
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise errors.validation("The request body must name its model as a string")
    return model


def check_grant(identity: Identity, inspected: Inspected) -> None:
    """Refuse what needs ``server-tools`` unless the key has it (the master key does)."""
    spec = identity.spec
    reason = inspected.needs_grant
    if reason is None or spec is None or GRANT in spec.operation_groups:
        return
    raise errors.access_denied(
        f"The API key may not use {reason}: it names a server-side tool or a stored "
        f"resource, which needs the operation group {GRANT!r}"
    )


def _header_grant(headers: Mapping[str, str]) -> str | None:
    for name in _PROJECT_HEADERS:
        if headers.get(name):
            return f"the {name} header"
    return None


def needs_grant(document: Any, headers: Mapping[str, str], deep: bool = True) -> str | None:
    """Why a request needs the ``server-tools`` group, or None (``deep``: whether the
    body may name a stored resource below its top level)."""
    reason = _header_grant(headers)
    if reason is not None or not isinstance(document, dict):
        return reason
    for name in _TOP_LEVEL_GRANTS:
        if document.get(name) is not None:
            return f"{name!r}"
    tools = document.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind is None:  # Anthropic's own tools have no type
                continue
            if not isinstance(kind, str):
                raise errors.validation("A tool's type must be a string")
            if kind in _CLIENT_TOOLS or kind.startswith(_CLIENT_TOOL_PREFIXES):
                continue
            return f"the server-side tool {kind!r}"
    found = _resource_member(document, 0) if deep else None
    return f"{found!r}" if found else None


def _resource_member(node: Any, depth: int) -> str | None:
    if depth > 64:  # no API document is this deep: it is not read to the end, so refused
        raise errors.validation("The request body is nested more than 64 levels deep")
    if isinstance(node, dict):
        for name, value in node.items():
            if name in _RESOURCE_MEMBERS and value is not None:
                return str(name)
            found = _resource_member(value, depth + 1)
            if found:
                return found
    elif isinstance(node, list):
        for item in node:
            found = _resource_member(item, depth + 1)
            if found:
                return found
    return None


def response_ref(op: Operation, response_id: str) -> str:
    return f"{op.service.name}/response/{response_id}"


def conversation_ref(op: Operation, conversation_id: str) -> str:
    return f"{op.service.name}/conversation/{conversation_id}"


def stored_refs(op: Operation, labels: Mapping[str, str], inspected: Inspected) -> tuple[str, ...]:
    """The stored responses and conversations a request names, in its path or its body."""
    if "response_id" in labels:
        return (*inspected.continues, response_ref(op, labels["response_id"]))
    if "conversation_id" in labels:
        return (*inspected.continues, conversation_ref(op, labels["conversation_id"]))
    return inspected.continues


class OwnedState:
    """Stored responses and conversations, each recorded for the key that created it."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def check(self, identity: Identity, refs: tuple[str, ...]) -> str | None:
        """Refuse stored state (``stored_refs``) another key created; the pool member
        that holds it, if it was recorded (the request must go there)."""
        # The master key (or an open proxy) is not restricted, but goes where it lives.
        restricted = identity.record is not None and identity.key_id is not None
        location = None
        for ref in refs:
            found = await self._store.owned.holder(ref)
            if found is not None:
                location = location or found[1]
            if restricted and (found is None or found[0] != identity.key_id):
                what = "response" if "/response/" in ref else "conversation"
                raise errors.AwsError(
                    404,
                    "ResourceNotFoundException",
                    f"No {what} with id {ref.rsplit('/', 1)[-1]!r} was found for this API key",
                )
        return location

    async def remember(
        self, identity: Identity, op: Operation, created: str | None, location: str | None
    ) -> None:
        """A response or conversation a call created, recorded for its key and where it
        lives (the pool member that made it)."""
        if identity.key_id is None or not created:
            return
        role = compat.ROLES.get(op.name)
        if role == "create":
            await self._store.owned.claim(response_ref(op, created), identity.key_id, location)
        elif role == "conversation":
            ref = conversation_ref(op, created)
            await self._store.owned.claim(ref, identity.key_id, location)


def created_id(body: bytes) -> str | None:
    """The ``id`` of the response or conversation a JSON answer describes."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    found = document.get("id") if isinstance(document, dict) else None
    return found if isinstance(found, str) else None


def filter_models(spec_models: list[str], body: bytes) -> bytes:
    """A model listing as a key may see it: only the models its allow-list lets it use
    (both APIs list them under ``data``, each with an ``id``)."""
    if not spec_models:
        return body
    try:
        document = orjson.loads(body)
        entries = document["data"]
        kept = [e for e in entries if policy.model_allowed(spec_models, e["id"])]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise errors.service_unavailable("The upstream model listing could not be read") from None
    document["data"] = kept
    if "first_id" in document:  # Anthropic's page bounds
        document["first_id"] = kept[0]["id"] if kept else None
        document["last_id"] = kept[-1]["id"] if kept else None
    return orjson.dumps(document)
