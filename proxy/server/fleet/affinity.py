"""What makes requests "the same conversation", so they go to the member whose prompt
cache already holds their prefix.

Bedrock caches a prompt's prefix (tools, system prompt, then messages up to a cache
point) per account and region. A conversation's requests share that prefix and grow only
at the end, so its stable part is: the key, the tools, the system prompt and the first
message. Hashing those keeps every turn on one member while it is healthy. The trade-off:
conversations, not requests, are spread over members, so one very long conversation stays
on its member (and a pool's load is as even as its conversations are). A client may name
the conversation itself with ``x-bedrock-proxy-affinity``; that header never goes upstream.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

AFFINITY_HEADER = "x-bedrock-proxy-affinity"
# Converse and the Anthropic Messages body name their stable parts differently.
_STABLE_FIELDS = ("system", "toolConfig", "tools", "tool_choice")
_MAX_HEADER = 256


def affinity_key(key_id: str | None, header: str | None, body: bytes | None) -> bytes | None:
    """A digest naming the conversation, or None when the request names none."""
    owner = (key_id or "").encode()
    if header:
        return hashlib.blake2b(
            owner + b"\0h" + header[:_MAX_HEADER].encode(), digest_size=16
        ).digest()
    if not body or body[:1] != b"{":
        return None
    try:
        document: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    messages = document.get("messages")
    first = messages[0] if isinstance(messages, list) and messages else None
    stable = [document.get(name) for name in _STABLE_FIELDS] + [first]
    if not any(stable):
        return None
    return hashlib.blake2b(
        owner + b"\0b" + orjson.dumps(stable, option=orjson.OPT_SORT_KEYS), digest_size=16
    ).digest()
