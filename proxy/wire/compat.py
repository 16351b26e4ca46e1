"""Bedrock's OpenAI- and Anthropic-compatible APIs: their routes, and errors in their shapes.

Amazon Bedrock serves these APIs itself, so the proxy passes them through byte for byte,
as it does the native ones:

- bedrock-runtime serves the OpenAI Chat Completions and Responses APIs under
  ``/openai/v1`` and the Anthropic Messages API under ``/anthropic/v1``, signed for the
  ``bedrock`` service like its native operations
  (https://docs.aws.amazon.com/bedrock/latest/userguide/inference-chat-completions.html,
  https://docs.aws.amazon.com/bedrock/latest/userguide/inference-responses-api.html);
- bedrock-mantle, ``https://bedrock-mantle.{region}.api.aws``, serves ``/v1/...`` (some
  models under ``/openai/v1/...``) and ``/anthropic/v1/messages``; it is its own IAM
  namespace, ``bedrock-mantle``, and SigV4 scope
  (https://docs.aws.amazon.com/bedrock/latest/userguide/bedrock-mantle.html).

Each path is one operation here, with a name of its own (``OpenAIChatCompletions``), so that
policy, limits, metering and the ledger treat it as they treat ``Converse``. A path that
is not one of them is refused: a call the proxy cannot name, it cannot govern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

import orjson

from . import errors
from .routing import Operation, RouteMatch, Service

# bedrock-runtime's compatible APIs sign as its native operations do.
RUNTIME = Service("bedrock-runtime", "bedrock-runtime", "bedrock")
# bedrock-mantle: its own host (on api.aws, see ``endpoints``) and signing name.
MANTLE = Service("bedrock-mantle", "bedrock-mantle", "bedrock-mantle")

OPENAI = "openai"
ANTHROPIC = "anthropic"

# The label that holds a body's or a path's model, as for the native operations.
MODEL_LABEL = "modelId"


@dataclass(frozen=True, slots=True)
class _Spec:
    method: str
    pattern: str  # relative to the API's root (``/openai/v1``), {label} for one segment
    name: str
    # What the operation does with the proxy's bookkeeping (see access.compat).
    role: str = ""


# https://platform.openai.com/docs/api-reference and https://docs.anthropic.com/en/api:
# the operations Bedrock documents, and the stored state around the Responses API.
_OPENAI = (
    _Spec("GET", "models", "OpenAIListModels", "models"),
    _Spec("GET", "models/{modelId}", "OpenAIGetModel"),
    _Spec("POST", "chat/completions", "OpenAIChatCompletions", "model"),
    _Spec("POST", "responses", "OpenAICreateResponse", "create"),
    _Spec("GET", "responses/{response_id}", "OpenAIGetResponse", "owned"),
    _Spec("DELETE", "responses/{response_id}", "OpenAIDeleteResponse", "owned"),
    _Spec("POST", "responses/{response_id}/cancel", "OpenAICancelResponse", "owned"),
    _Spec("GET", "responses/{response_id}/input_items", "OpenAIListInputItems", "owned"),
    _Spec("POST", "conversations", "OpenAICreateConversation", "conversation"),
    _Spec("GET", "conversations/{conversation_id}", "OpenAIGetConversation", "owned"),
    _Spec("POST", "conversations/{conversation_id}", "OpenAIUpdateConversation", "owned"),
    _Spec("DELETE", "conversations/{conversation_id}", "OpenAIDeleteConversation", "owned"),
    _Spec("GET", "conversations/{conversation_id}/items", "OpenAIListItems", "owned"),
    _Spec("POST", "conversations/{conversation_id}/items", "OpenAICreateItems", "owned"),
    _Spec("GET", "conversations/{conversation_id}/items/{item_id}", "OpenAIGetItem", "owned"),
    _Spec("DELETE", "conversations/{conversation_id}/items/{item_id}", "OpenAIDeleteItem", "owned"),
)
_ANTHROPIC = (
    _Spec("POST", "messages", "AnthropicMessages", "model"),
    _Spec("POST", "messages/count_tokens", "AnthropicCountTokens", "model"),
    _Spec("GET", "models", "AnthropicListModels", "models"),
    _Spec("GET", "models/{modelId}", "AnthropicGetModel"),
)
# Operation name -> its role, for the access and metering layers.
ROLES = {spec.name: spec.role for spec in (*_OPENAI, *_ANTHROPIC)}
STREAMING = frozenset({"OpenAIChatCompletions", "OpenAICreateResponse", "AnthropicMessages"})
_LABEL = re.compile(r"\{([^}]+)\}")


_DIALECTS = {spec.name: ANTHROPIC for spec in _ANTHROPIC}


def dialect_of(op: Operation) -> str:
    return _DIALECTS.get(op.name, OPENAI)


@dataclass(frozen=True, slots=True)
class _Compiled:
    op: Operation
    regex: re.Pattern[str]
    labels: tuple[str, ...]


class CompatRouter:
    """(method, raw path after the front's base) -> the operation and its upstream path.

    ``roots`` are the path prefixes an API lives under on this endpoint (bedrock-runtime:
    ``/openai/v1``, ``/anthropic/v1``; bedrock-mantle: ``/v1`` and ``/openai/v1`` for
    OpenAI, ``/anthropic/v1``). The upstream path is the client's, unchanged.
    """

    def __init__(self, service: Service, roots: dict[str, str]) -> None:
        self.service = service
        self._routes: list[tuple[str, _Compiled]] = []
        for root, api in roots.items():
            for spec in _OPENAI if api == OPENAI else _ANTHROPIC:
                template = f"{root}/{spec.pattern}"
                op = Operation(
                    service=service,
                    name=spec.name,
                    method=spec.method,
                    template=template,
                    labels=tuple(_LABEL.findall(template)),
                    streaming_output=spec.name in STREAMING,
                )
                regex = re.compile(
                    "".join(
                        "([^/]+)" if i % 2 else re.escape(piece)
                        for i, piece in enumerate(_LABEL.split(template))
                    )
                )
                self._routes.append((spec.method, _Compiled(op, regex, op.labels)))
        self.operations = [compiled.op for _, compiled in self._routes]
        # Path -> (route, labels): clients call the same few paths (bounded: paths are
        # client input, matched before authentication).
        self._cache: dict[tuple[str, str], tuple[_Compiled, dict[str, str]] | None] = {}

    def match(self, method: str, raw_path: str) -> RouteMatch | None:
        key = (method, raw_path)
        found = self._cache.get(key)
        if found is None:
            found = self._match(method, raw_path)
            if found is None:
                return None
            if len(self._cache) >= 1024:
                self._cache.clear()
            self._cache[key] = found
        route, labels = found
        # A fresh labels dict per request: the front adds the body's model to it.
        return RouteMatch(route.op, dict(labels), raw_path)

    def _match(self, method: str, raw_path: str) -> tuple[_Compiled, dict[str, str]] | None:
        for route_method, route in self._routes:
            if route_method != method:
                continue
            m = route.regex.fullmatch(raw_path)
            if m is not None:
                labels: dict[str, str] = {}
                for name, raw in zip(route.labels, m.groups(), strict=True):
                    value = unquote(raw)
                    if value in (".", "..") or "/" in value:
                        raise errors.validation(f"Invalid value for path parameter {name}")
                    labels[name] = value
                return route, labels
        return None


# ---------------------------------------------------------------------------- errors

# An AWS error code -> (OpenAI type, OpenAI code, Anthropic type). The status is kept:
# the SDKs pick their exception class from it (403 PermissionDeniedError, 429
# RateLimitError, ...), and the type from the body.
_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("not_found_error", "not_found_error"),
    408: ("timeout_error", "timeout_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_error"),
    503: ("service_unavailable", "overloaded_error"),
}


def _types(status: int) -> tuple[str, str]:
    found = _TYPES.get(status)
    if found is not None:
        return found
    return (
        ("invalid_request_error", "invalid_request_error")
        if status < 500
        else (
            "api_error",
            "api_error",
        )
    )


def error_body(dialect: str, exc: errors.AwsError) -> bytes:
    """The refusal as the API's own error document: OpenAI's ``{"error": {...}}`` or
    Anthropic's ``{"type": "error", "error": {...}}``."""
    openai_type, anthropic_type = _types(exc.status)
    if dialect == ANTHROPIC:
        return orjson.dumps(
            {"type": "error", "error": {"type": anthropic_type, "message": exc.message}}
        )
    return orjson.dumps(
        {
            "error": {
                "message": exc.message,
                "type": openai_type,
                "code": _snake(exc.code),
                "param": None,
            }
        }
    )


def stream_error(dialect: str, exc: errors.AwsError) -> bytes:
    """A failure after a stream began, as the API's own error event: Anthropic's
    ``event: error``, OpenAI's ``data: {"error": ...}`` (the SDKs raise on both)."""
    body = error_body(dialect, exc)
    if dialect == ANTHROPIC:
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"


def _snake(code: str) -> str:
    """``ThrottlingException`` -> ``throttling``: the AWS code, in OpenAI's style."""
    name = code.removesuffix("Exception")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# ---------------------------------------------------------------------------- streams

# One server-sent event bigger than this is not relayed: the meter and the splitter hold
# at most one event.
MAX_EVENT_BYTES = 4 * 1024 * 1024


class SseError(ValueError):
    """The upstream's bytes are not server-sent events the proxy can relay."""


class SseSplitter:
    """Cuts a text/event-stream at event boundaries (a blank line), so that an error
    event the proxy adds never lands in the middle of one. Like ``FrameSplitter``: what is
    complete passes at once, uncopied when a read holds whole events."""

    __slots__ = ("_buf", "broken")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.broken: SseError | None = None

    @property
    def pending(self) -> bool:
        return bool(self._buf)

    def feed(self, data: bytes) -> bytes:
        buf = self._buf
        if not buf:
            end = _boundary(data)
            if end == len(data):
                return data
            buf += memoryview(data)[end:]
            out = data[:end]
        else:
            buf += data
            end = _boundary(buf)
            out = bytes(buf[:end])
            del buf[:end]
        if len(buf) > MAX_EVENT_BYTES:
            raise SseError(f"an event is larger than {MAX_EVENT_BYTES} bytes")
        return out


def _boundary(data: bytes | bytearray) -> int:
    """The end of the last complete event in ``data`` (after its blank line), or 0."""
    end = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    if crlf >= 0 and crlf + 4 > end + 2:
        return crlf + 4
    return end + 2 if end >= 0 else 0


def sse_events(data: bytes) -> list[tuple[str, bytes]]:
    """The (event name, data) of each complete event in ``data`` (which the splitter
    cut at event boundaries). Multi-line data is joined with newlines, as the spec says."""
    found: list[tuple[str, bytes]] = []
    for block in re.split(rb"\r?\n\r?\n", data):
        if not block:
            continue
        name = ""
        lines: list[bytes] = []
        for line in block.splitlines():
            if line.startswith(b"data:"):
                lines.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line.startswith(b"event:"):
                name = line[6:].strip().decode("ascii", "replace")
        if lines:
            found.append((name, b"\n".join(lines)))
    return found
