"""Raw request path → (service, operation, labels), generated from botocore's service models.

Every operation of bedrock-runtime, bedrock-agent-runtime and bedrock is routed without
per-operation code. Matching runs on the raw (still percent-encoded) path, so an encoded
``%2F`` inside a model ARN is never mistaken for a separator. Some SDKs send ARN labels
decoded, with literal ``:`` and ``/``; a second, relaxed pass lets a label span segments and
the label is re-encoded the way botocore encodes it, so the upstream sees one canonical form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from botocore.loaders import Loader, create_loader

from . import errors

SERVICE_NAMES = ("bedrock-runtime", "bedrock-agent-runtime", "bedrock")
# Bedrock AgentCore's data plane, under a base path of its own (its paths are its own).
AGENTCORE = "bedrock-agentcore"
AGENTCORE_CONTROL = "bedrock-agentcore-control"
# Bedrock's OpenAI- and Anthropic-compatible endpoint (``compat``), not a botocore model.
MANTLE = "bedrock-mantle"
# Every service whose upstream an endpoint setting (or AWS_ENDPOINT_URL_*) may name.
UPSTREAM_SERVICES = (*SERVICE_NAMES, AGENTCORE, AGENTCORE_CONTROL, MANTLE)
_LABEL_RE = re.compile(r"\{([^}]+)\}")
# botocore's percent_encode: RFC 3986 unreserved characters stay, everything else is encoded.
_LABEL_SAFE = "-_.~"
_GREEDY_SAFE = "/-_.~"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    endpoint_prefix: str
    signing_name: str


@dataclass(frozen=True, slots=True)
class Operation:
    service: Service
    name: str
    method: str
    template: str
    # Names of path labels; a trailing '+' marks a greedy label.
    labels: tuple[str, ...]
    streaming_output: bool


@dataclass(frozen=True, slots=True)
class RouteMatch:
    operation: Operation
    # Decoded label values, keyed by label name without '+'.
    labels: dict[str, str]
    # The upstream path, labels canonically encoded, literals as in the template.
    path: str


@dataclass(frozen=True, slots=True)
class _Route:
    operation: Operation
    strict: re.Pattern[str]
    relaxed: re.Pattern[str]
    literal_len: int
    parts: tuple[str, ...]  # literal, label, literal, label, ..., literal


_CACHE_MAX = 4096
_CACHED_PATH_MAX = 512


class Router:
    """Matches (method, raw path) against every operation of the configured services.

    Clients call the same few paths over and over, so answers are cached (bounded).
    """

    def __init__(self, operations: list[Operation]) -> None:
        self._cache: dict[tuple[str, str], RouteMatch | None] = {}
        self._table: dict[tuple[str, str], list[_Route]] = {}
        self.operations = operations
        for op in operations:
            route = _compile(op)
            first = op.template.split("?", 1)[0].lstrip("/").split("/", 1)[0]
            self._table.setdefault((op.method, first), []).append(route)
        for routes in self._table.values():
            # The most specific template wins when several relaxed patterns match.
            routes.sort(key=lambda r: -r.literal_len)

    def service(self, name: str) -> Service:
        return next(op.service for op in self.operations if op.service.name == name)

    def match(self, method: str, raw_path: str) -> RouteMatch | None:
        """Match a raw path (no query string) relative to the /bedrock base."""
        key = (method, raw_path)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = self._match(method, raw_path)  # raises on invalid labels: never cached
        # Paths are client input, matched before authentication: only answers worth
        # keeping, of a bounded size, are kept (a miss is cheap to recompute).
        if found is not None and len(raw_path) <= _CACHED_PATH_MAX:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = found
        return found

    def _match(self, method: str, raw_path: str) -> RouteMatch | None:
        first = raw_path.lstrip("/").split("/", 1)[0]
        routes = self._table.get((method, first))
        if not routes:
            return None
        for route in routes:
            m = route.strict.fullmatch(raw_path)
            if m is not None:
                return _build(route, m)
        for route in routes:
            m = route.relaxed.fullmatch(raw_path)
            if m is not None:
                return _build(route, m)
        return None


def _compile(op: Operation) -> _Route:
    template = op.template.split("?", 1)[0]
    pieces = _LABEL_RE.split(template)
    strict: list[str] = []
    relaxed: list[str] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            strict.append(re.escape(piece))
            relaxed.append(re.escape(piece))
        else:
            group = f"(?P<g{i // 2}>"
            greedy = piece.endswith("+")
            strict.append(group + (".+)" if greedy else "[^/]+)"))
            relaxed.append(group + ".+)")
    literal_len = sum(len(p) for p in pieces[::2])
    return _Route(
        operation=op,
        strict=re.compile("".join(strict)),
        relaxed=re.compile("".join(relaxed)),
        literal_len=literal_len,
        parts=tuple(pieces),
    )


def _build(route: _Route, m: re.Match[str]) -> RouteMatch:
    labels: dict[str, str] = {}
    out: list[str] = []
    parts = route.parts
    for i, piece in enumerate(parts):
        if i % 2 == 0:
            out.append(piece)
            continue
        raw = m.group(f"g{i // 2}")
        value = unquote(raw)
        greedy = piece.endswith("+")
        name = piece[:-1] if greedy else piece
        if value in (".", "..") or (greedy and any(s in (".", "..") for s in value.split("/"))):
            raise errors.validation(f"Invalid value for path parameter {name}")
        labels[name] = value
        out.append(quote(value, safe=_GREEDY_SAFE if greedy else _LABEL_SAFE))
    return RouteMatch(route.operation, labels, "".join(out))


def load_operations(
    service_names: tuple[str, ...] = SERVICE_NAMES, loader: Loader | None = None
) -> list[Operation]:
    """Every operation of the given services, read from the models botocore ships."""
    loader = loader or create_loader()
    operations: list[Operation] = []
    for name in service_names:
        model = loader.load_service_model(name, "service-2")
        meta = model["metadata"]
        service = Service(
            name=name,
            endpoint_prefix=meta["endpointPrefix"],
            signing_name=meta.get("signingName", meta["endpointPrefix"]),
        )
        shapes = model["shapes"]
        for op_name, op in model["operations"].items():
            http = op["http"]
            template = http["requestUri"]
            operations.append(
                Operation(
                    service=service,
                    name=op_name,
                    method=http["method"],
                    template=template,
                    labels=tuple(_LABEL_RE.findall(template.split("?", 1)[0])),
                    streaming_output=_has_event_stream_output(op, shapes),
                )
            )
    return operations


def _has_event_stream_output(op: dict[str, Any], shapes: dict[str, Any]) -> bool:
    output = op.get("output")
    if not output:
        return False
    shape = shapes[output["shape"]]
    payload = shape.get("payload")
    if not payload:
        return False
    target = shapes[shape["members"][payload]["shape"]]
    return bool(target.get("eventstream"))
