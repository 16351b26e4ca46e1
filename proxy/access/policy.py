"""What a virtual key may do: operation groups, model allow-lists, resource allow-lists.

Every request member that names a resource (a path label, a header, a query parameter, or
a member of the body at any depth) is checked: which members those are comes from the
table ``resources`` derives from botocore's service models, not from a hand list. Bodies are
read, never changed; one the policy must read is parsed strictly or refused, so that AWS's
parser and ours cannot read it two ways.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fnmatch import translate
from functools import cache, lru_cache
from typing import Any
from urllib.parse import parse_qs

from ..wire import compat, errors
from ..wire.modelids import arn_model_id, parse_arn, split_profile
from ..wire.routing import Operation
from ..wire.strictjson import parse_strict
from . import resources
from .keys import KeySpec

# ARN resource types whose id is a model id (or a profile of one).


@dataclass(frozen=True, slots=True)
class OperationFields:
    """Where one operation names resources, compiled from the derived table."""

    labels: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    body: tuple[tuple[tuple[str, ...], str], ...] = ()
    # kind -> the quoted JSON names of the members that hold it, to look for in raw bytes
    body_names: tuple[tuple[str, tuple[bytes, ...]], ...] = ()


_NO_FIELDS = OperationFields()
# The resource type in an ARN -> what it names.
_ARN_KINDS = {
    "foundation-model": resources.MODEL,
    "inference-profile": resources.MODEL,
    "application-inference-profile": resources.MODEL,
    "provisioned-model": resources.MODEL,
    "custom-model": resources.MODEL,
    "custom-model-deployment": resources.MODEL,
    "imported-model": resources.MODEL,
    "prompt-router": resources.MODEL,
    "default-prompt-router": resources.MODEL,
    "guardrail": resources.GUARDRAIL,
    "knowledge-base": resources.KNOWLEDGE_BASE,
    "agent": resources.AGENT,
    "agent-alias": resources.AGENT_ALIAS_ARN,
    "flow": resources.FLOW,
}


@cache
def load_fields() -> dict[str, OperationFields]:
    compiled: dict[str, OperationFields] = {}
    for key, entries in resources.load_table().items():
        by_location: dict[str, list[Any]] = {"uri": [], "header": [], "querystring": [], "body": []}
        for f in entries:
            by_location[f.location].append((f.path if f.location == "body" else f.name, f.kind))
        compiled[key] = OperationFields(
            labels=tuple(by_location["uri"]),
            headers=tuple(by_location["header"]),
            query=tuple(by_location["querystring"]),
            body=tuple(by_location["body"]),
            body_names=_names_by_kind(by_location["body"]),
        )
    return compiled


def _names_by_kind(
    body: list[tuple[tuple[str, ...], str]],
) -> tuple[tuple[str, tuple[bytes, ...]], ...]:
    names: dict[str, set[bytes]] = {}
    for path, kind in body:
        leaf = next(p for p in reversed(path) if p not in ("[]", "{}"))
        names.setdefault(kind, set()).add(b'"' + leaf.encode() + b'"')
    return tuple((kind, tuple(sorted(found))) for kind, found in sorted(names.items()))


# The OpenAI- and Anthropic-compatible operations name their model in the ``modelId``
# label the front fills from the body's ``model`` (or from the path, for a model's page).
_COMPAT_FIELDS = OperationFields(labels=((compat.MODEL_LABEL, resources.MODEL),))


def fields_of(op: Operation) -> OperationFields:
    found = load_fields().get(f"{op.service.name}:{op.name}")
    if found is None:
        return _COMPAT_FIELDS if op.name in compat.ROLES else _NO_FIELDS
    return found


# AgentCore's data plane, by what an operation's name says it touches.
_AGENTCORE_IDENTITY = frozenset(
    {
        "CompleteResourceTokenAuth",
        "GetResourceApiKey",
        "GetResourceOauth2Token",
        "GetResourcePaymentToken",
        "GetWorkloadAccessToken",
        "GetWorkloadAccessTokenForJWT",
        "GetWorkloadAccessTokenForUserId",
    }
)


def _agentcore_group(name: str) -> str:
    if name in _AGENTCORE_IDENTITY:
        return "agentcore-identity"
    if "Payment" in name:
        return "agentcore-payments"
    if any(word in name for word in ("Memory", "Event", "Actor", "Ingest")) or name in (
        "ListSessions",
    ):
        return "agentcore-memory"
    if any(word in name for word in ("CodeInterpreter", "Browser", "Registry")):
        return "agentcore-tools"
    if any(word in name for word in ("Evaluat", "ABTest", "Recommendation")):
        return "agentcore-evaluations"
    return "agentcore-runtime"  # runtimes, their commands and sessions, harnesses


def operation_group(op: Operation) -> str:
    service = op.service.name
    if service == "bedrock-agentcore":
        return _agentcore_group(op.name)
    if service in ("bedrock-runtime", "bedrock-mantle"):
        return "guardrails" if "Guardrail" in op.name else "inference"
    if service == "bedrock-agent-runtime":
        return "agents"
    if "ModelInvocationJob" in op.name:
        return "batch"
    if op.name.startswith(("Get", "List", "Describe")):
        return "control-read"
    return "control-write"


def needs_body(spec: KeySpec, op: Operation) -> bool:
    """Whether checking this key on this operation means reading the body."""
    return bool(plan_for(spec, op).body)


@dataclass(frozen=True, slots=True)
class Plan:
    """What checking one key on one operation takes: the members that name a kind of
    resource its allow-lists restrict (others need no look), or why it is refused."""

    refusal: str | None
    labels: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]
    query: tuple[tuple[str, str], ...]
    body: tuple[tuple[tuple[str, ...], str], ...]
    # The quoted member names whose presence in the raw body means it must be parsed.
    scanned: tuple[bytes, ...]
    models: tuple[str, ...]  # the model allow-list, as ``model_allowed``'s cache key


def plan_for(spec: KeySpec, op: Operation) -> Plan:
    """The plan for a key and an operation, worked out once (a changed key is a new spec;
    the router's operations live as long as the process): every request of a key checks
    the same members, and working them out was most of the policy's time."""
    key = (id(spec), id(op))
    cached = _PLANS.get(key)
    # Both are held here, so neither id can be reused while the entry lives.
    if cached is not None and cached[0] is spec and cached[1] is op:
        return cached[2]
    plan = _plan(spec, op)
    if len(_PLANS) >= 16_384:  # each key-cache reload makes new specs: keep few old ones
        _PLANS.clear()
    _PLANS[key] = (spec, op, plan)
    return plan


def _plan(spec: KeySpec, op: Operation) -> Plan:
    group = operation_group(op)
    refusal = (
        None
        if group in spec.operation_groups
        else f"The API key is not allowed to call {op.name} (operation group {group!r})"
    )
    if (
        refusal is None
        and op.service.name == "bedrock-agentcore-control"
        and any(getattr(spec, name) is not None for name in _AGENTCORE_LISTS.values())
    ):
        # The control plane's members are not classified: a key held to some runtimes or
        # memories would read (or change) the others' there.
        refusal = "The API key's AgentCore allow-lists do not extend to the control plane"
    restricted = _restricted_kinds(spec)
    fields = fields_of(op)
    return Plan(
        refusal,
        tuple(f for f in fields.labels if f[1] in restricted),
        tuple((name.lower(), kind) for name, kind in fields.headers if kind in restricted),
        tuple(f for f in fields.query if f[1] in restricted),
        tuple(f for f in fields.body if f[1] in restricted),
        tuple(name for kind, found in fields.body_names if kind in restricted for name in found),
        tuple(spec.models),
    )


def _restricted_kinds(spec: KeySpec) -> frozenset[str]:
    kinds: set[str] = set()
    if spec.models:
        kinds.add(resources.MODEL)
    if spec.file_buckets is not None or spec.file_prefixes is not None:
        kinds.update((resources.S3_URI, resources.S3_OBJECT, resources.S3_BUCKET))
    if spec.guardrail_ids is not None:
        kinds.add(resources.GUARDRAIL)
    if spec.knowledge_base_ids is not None:
        kinds.add(resources.KNOWLEDGE_BASE)
    if spec.agent_ids is not None:
        kinds.update((resources.AGENT, resources.AGENT_ALIAS_ARN))
    if spec.flow_ids is not None:
        kinds.add(resources.FLOW)
    kinds.update(k for k, name in _AGENTCORE_LISTS.items() if getattr(spec, name) is not None)
    if kinds:
        kinds.add(resources.ARN)  # an ARN names one of the above
    return frozenset(kinds)


def check(
    spec: KeySpec,
    op: Operation,
    labels: Mapping[str, str],
    headers: Mapping[str, str],
    body: bytes | None,
    query: str = "",
    aliases: Mapping[str, str] | None = None,
) -> None:
    """Raise an AWS-shaped AccessDeniedException if the key may not make this call.

    Every member the service model says names a resource is checked: path labels,
    headers, query parameters and, when the key restricts what the body can name, every
    such member of the body at any depth. A body that must be checked and cannot be read
    strictly is refused, never forwarded unchecked.

    ``headers`` are those that go upstream, by lower-case name (``RequestHeaders.signed``):
    what the upstream acts on is what is checked.
    """
    cached = _PLANS.get((id(spec), id(op)))
    plan = (
        cached[2]
        if cached is not None and cached[0] is spec and cached[1] is op
        else plan_for(spec, op)
    )
    if plan.refusal is not None:
        raise errors.access_denied(plan.refusal)
    for label, kind in plan.labels:
        value = labels.get(label)
        if value:
            if kind == resources.MODEL:
                # An application profile or provisioned model is allowed as its ARN or as
                # the model it runs.
                alias = aliases.get(value) if aliases else None
                if alias is not None and _model_allowed(plan.models, alias):
                    continue
                allowed = _ALLOWED.get((plan.models, value))
                if allowed is None:
                    allowed = _model_allowed(plan.models, value)
                if not allowed:
                    raise errors.access_denied(f"The API key is not allowed to use model {value!r}")
                continue
            _check_one(spec, kind, value)
    for name, kind in plan.headers:
        value = headers.get(name)
        if value:
            _check_one(spec, kind, value)
    if plan.query and query:
        params = parse_qs(query, keep_blank_values=True)
        for name, kind in plan.query:
            for value in params.get(name, ()):
                _check_one(spec, kind, value)
    if body is not None and plan.body:
        _check_body(spec, plan, headers, body)


def _check_body(spec: KeySpec, plan: Plan, headers: Mapping[str, str], body: bytes) -> None:
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        # The proxy reads bodies as sent; one it cannot read cannot be checked.
        raise errors.validation(
            f"This API key's restrictions are checked against the request body, which "
            f"cannot be read with Content-Encoding {encoding!r}; send it uncompressed"
        )
    # Most bodies name none of the members the key restricts (a Converse without a
    # guardrail or an S3 document). A member can only be there if its quoted name is in the
    # bytes, or is spelled with \\u escapes: a body with neither has nothing to check, and
    # parsing it (strictly, ~10 us for a small body, more for a large one) would only
    # prove that. (``find``, not ``in``: bytes.__contains__ first tries its argument as
    # an int, and a TypeError is raised and cleared per name, ~2k instructions each.)
    if body.find(b"\\u") < 0:
        for name in plan.scanned:
            if body.find(name) >= 0:
                break
        else:
            return
    document = parse_strict(body)
    for path, kind in plan.body:
        for value in _values(document, path, 0):
            _check_one(spec, kind, value)


def model_allowed(patterns: list[str], model_id: str) -> bool:
    return _model_allowed(tuple(patterns), model_id)


def _model_allowed(patterns: tuple[str, ...], model_id: str) -> bool:
    if not patterns:
        return True
    key = (patterns, model_id)
    allowed = _ALLOWED.get(key)
    if allowed is None:
        matcher = _matcher(key[0])
        allowed = any(matcher(c) is not None for c in model_candidates(model_id))
        if len(_ALLOWED) >= 4096:  # model ids come from authenticated requests
            _ALLOWED.clear()
        _ALLOWED[key] = allowed
    return allowed


# (allow-list, model id) -> allowed: the same few pairs come in request after request.
_ALLOWED: dict[tuple[tuple[str, ...], str], bool] = {}
# Per (spec, operation): (the spec, the operation, its plan).
_PLANS: dict[tuple[int, int], tuple[KeySpec, Operation, Plan]] = {}


@lru_cache(maxsize=1024)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    """One compiled regex for a key's whole allow-list (fnmatch semantics, case-sensitive):
    a per-pattern fnmatchcase was most of the policy's time on the hot path."""
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns)).match


def model_candidates(model_id: str) -> list[str]:
    """The names a model reference answers to: the ARN, its model id, the base model."""
    candidates = [model_id]
    model = model_id
    if model_id.startswith("arn:"):
        named = arn_model_id(model_id)
        if named is None:
            return candidates  # provisioned, imported, application profiles: the ARN only
        candidates.append(named)
        model = named
    prefix, base = split_profile(model)
    if prefix is not None:
        candidates.append(base)
    return candidates


def file_allowed(spec: KeySpec, bucket: str, key: str | None, listing: bool = False) -> bool:
    """A bucket, and a key (or list prefix) in it, within the key's file allow-lists.

    A prefix is a folder: ``team-a`` allows ``team-a`` itself and what is under
    ``team-a/``, never its sibling ``team-ab/``. A listing's prefix must be under the
    folder (a listing of ``team-a`` would show ``team-ab/`` too)."""
    if spec.file_buckets is not None and bucket not in spec.file_buckets:
        return False
    if spec.file_prefixes is not None and key is not None:
        for prefix in spec.file_prefixes:
            folder = prefix.rstrip("/")
            if not folder or key.startswith(folder + "/") or (key == folder and not listing):
                return True
        return False
    return True


def _allow_list(spec: KeySpec, kind: str) -> list[str] | None:
    if kind == resources.GUARDRAIL:
        return spec.guardrail_ids
    if kind == resources.KNOWLEDGE_BASE:
        return spec.knowledge_base_ids
    if kind in (resources.AGENT, resources.AGENT_ALIAS_ARN):
        return spec.agent_ids
    if kind == resources.FLOW:
        return spec.flow_ids
    name = _AGENTCORE_LISTS.get(kind)
    if name is not None:
        allowed: list[str] | None = getattr(spec, name)
        return allowed
    return None


# AgentCore's kinds, by the key field that allows them.
_AGENTCORE_LISTS = {
    resources.AGENT_RUNTIME: "agent_runtime_arns",
    resources.MEMORY: "memory_ids",
    resources.CODE_INTERPRETER: "code_interpreter_ids",
    resources.BROWSER: "browser_ids",
    resources.EVALUATOR: "evaluator_ids",
    resources.GATEWAY: "gateway_ids",
    resources.REGISTRY: "registry_ids",
}


def _check_one(spec: KeySpec, kind: str, value: Any) -> None:
    if kind == resources.S3_OBJECT:
        if not isinstance(value, dict):
            raise _unreadable()
        bucket, key = value.get("s3BucketName"), value.get("s3ObjectKey")
        if not isinstance(bucket, str) or not isinstance(key, str | None):
            raise _unreadable()
        if not file_allowed(spec, bucket, key or ""):
            raise errors.access_denied(f"The API key is not allowed to use s3://{bucket}/{key}")
        return
    if not isinstance(value, str):
        raise _unreadable()
    if kind == resources.S3_URI:
        bucket, _, key = value.removeprefix("s3://").partition("/")
        if not value.startswith("s3://") or not file_allowed(spec, bucket, key):
            raise errors.access_denied(f"The API key is not allowed to use {value!r}")
        return
    if kind == resources.S3_BUCKET:
        if not file_allowed(spec, value, ""):
            raise errors.access_denied(f"The API key is not allowed to use bucket {value!r}")
        return
    if kind == resources.MODEL:
        if not model_allowed(spec.models, value):
            raise errors.access_denied(f"The API key is not allowed to use model {value!r}")
        return
    if kind == resources.ARN:
        resource_type = _arn_resource_type(value)
        arn_kind = _ARN_KINDS.get(resource_type or "")
        if arn_kind is not None:
            _check_one(spec, arn_kind, value)
        elif resource_type is None:
            raise errors.validation(f"{value!r} is not an ARN")
        return
    allowed = _allow_list(spec, kind)
    if allowed is None:
        return
    if kind in _AGENTCORE_LISTS:
        # An id or an ARN in any form (a runtime's with an endpoint after it, another
        # partition's), on either side: the resource's own id is compared.
        if _agentcore_id(value) not in {_agentcore_id(a) for a in allowed}:
            raise errors.access_denied(f"The API key is not allowed to use {kind} {value!r}")
        return
    short = _resource_id(value, kind)
    if value not in allowed and short not in allowed:
        raise errors.access_denied(f"The API key is not allowed to use {kind} {value!r}")


def _arn_resource_type(value: str) -> str | None:
    arn = parse_arn(value)
    return arn.resource_type if arn is not None else None


def _resource_id(value: str, kind: str) -> str:
    """The id an allow-list names, from an id or an ARN of the resource."""
    if not value.startswith("arn:"):
        return value
    resource = value.split(":", 5)[-1]
    segments = resource.split("/")
    if kind == resources.AGENT_ALIAS_ARN:
        # arn:...:agent-alias/AGENT_ID/ALIAS_ID: the agent is what the allow-list names
        return segments[1] if len(segments) > 2 else resource
    return segments[-1] if len(segments) > 1 else resource


def _agentcore_id(value: str) -> str:
    """``arn:aws:bedrock-agentcore:REGION:ACCOUNT:runtime/ID[/runtime-endpoint/NAME]`` →
    ``ID``; an id stays as it is."""
    if not value.startswith("arn:"):
        return value
    resource = value.split(":", 5)[-1]
    segments = resource.split("/")
    return segments[1] if len(segments) > 1 else resource


def _unreadable() -> errors.AwsError:
    return errors.validation(
        "A field that names a resource has a value of the wrong type; this API key's "
        "restrictions cannot be checked against it"
    )


def _values(node: Any, path: tuple[str, ...], depth: int) -> Iterator[Any]:
    """Every value at ``path`` ("[]" steps into list items, "{}" into map values)."""
    if node is None:
        return
    if depth == len(path):
        yield node
        return
    step = path[depth]
    if step == "[]":
        if not isinstance(node, list):
            raise _unreadable()
        for item in node:
            yield from _values(item, path, depth + 1)
    elif step == "{}":
        if not isinstance(node, dict):
            raise _unreadable()
        for item in node.values():
            yield from _values(item, path, depth + 1)
    else:
        if not isinstance(node, dict):
            raise _unreadable()
        yield from _values(node.get(step), path, depth + 1)


def _dig(document: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(document, dict):
            return None
        document = document.get(part)
    return document


def body_model(op: Operation, body: bytes) -> str | None:
    """The model an operation names at the top of its body (for metering), or None."""
    for path, kind in fields_of(op).body:
        if kind == resources.MODEL and len(path) == 1:
            try:
                value = _dig(parse_strict(body), path)
            except errors.AwsError:
                return None
            return value if isinstance(value, str) else None
    return None
