"""What a virtual key may do: operation groups, model allow-lists, resource allow-lists.

Models and resources are read from the path labels (already decoded, ARN-aware) and, for the
few operations that carry them in the body, from the body — read, never changed. A body that
names the same field twice is refused: AWS's parser and ours might pick different ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

from . import errors
from .keys import KeySpec
from .routing import Operation

# Cross-region inference-profile prefixes: "us.anthropic.x" is a way to call "anthropic.x".
PROFILE_PREFIXES = ("us-gov.", "us.", "eu.", "apac.", "global.", "jp.", "au.", "ca.")
# ARN resource types whose id is a model id (or a profile of one).
_MODEL_ARN_TYPES = ("foundation-model", "inference-profile")

# Fields in request bodies, as paths, per operation: (path, what it names).
_BODY_FIELDS: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "Converse": [(("guardrailConfig", "guardrailIdentifier"), "guardrail")],
    "ConverseStream": [(("guardrailConfig", "guardrailIdentifier"), "guardrail")],
    "StartAsyncInvoke": [(("modelId",), "model")],
    "CreateModelInvocationJob": [
        (("modelId",), "model"),
        (("inputDataConfig", "s3InputDataConfig", "s3Uri"), "s3"),
        (("outputDataConfig", "s3OutputDataConfig", "s3Uri"), "s3"),
    ],
    "InvokeInlineAgent": [(("foundationModel",), "model")],
    "RetrieveAndGenerate": [
        (("retrieveAndGenerateConfiguration", "knowledgeBaseConfiguration", "modelArn"), "model"),
        (
            ("retrieveAndGenerateConfiguration", "knowledgeBaseConfiguration", "knowledgeBaseId"),
            "knowledge base",
        ),
        (("retrieveAndGenerateConfiguration", "externalSourcesConfiguration", "modelArn"), "model"),
    ],
    "Rerank": [
        (
            (
                "rerankingConfiguration",
                "bedrockRerankingConfiguration",
                "modelConfiguration",
                "modelArn",
            ),
            "model",
        ),
    ],
}
_BODY_FIELDS["RetrieveAndGenerateStream"] = _BODY_FIELDS["RetrieveAndGenerate"]

_LABEL_KINDS = {
    "modelId": "model",
    "guardrailIdentifier": "guardrail",
    "knowledgeBaseId": "knowledge base",
    "agentId": "agent",
}
_GUARDRAIL_HEADER = "X-Amzn-Bedrock-GuardrailIdentifier"


def operation_group(op: Operation) -> str:
    service = op.service.name
    if service == "bedrock-runtime":
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
    fields = _BODY_FIELDS.get(op.name)
    if not fields:
        return False
    return any(_restricted(spec, kind) for _, kind in fields)


def check(
    spec: KeySpec,
    op: Operation,
    labels: Mapping[str, str],
    headers: Mapping[str, str],
    body: bytes | None,
) -> None:
    """Raise an AWS-shaped AccessDeniedException if the key may not make this call."""
    group = operation_group(op)
    if group not in spec.operation_groups:
        raise errors.access_denied(
            f"The API key is not allowed to call {op.name} (operation group {group!r})"
        )
    for label, value in labels.items():
        kind = _LABEL_KINDS.get(label)
        if kind is not None:
            _check_one(spec, kind, value)
    guardrail = headers.get(_GUARDRAIL_HEADER)
    if guardrail:
        _check_one(spec, "guardrail", guardrail)
    if body is not None and needs_body(spec, op):
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            # The proxy reads bodies as sent; one it cannot read cannot be checked.
            raise errors.validation(
                f"This API key's restrictions are checked against the request body, which "
                f"cannot be read with Content-Encoding {encoding!r}; send it uncompressed"
            )
        document = _parse_strict(body)
        for path, kind in _BODY_FIELDS[op.name]:
            value = _dig(document, path)
            if isinstance(value, str):
                _check_one(spec, kind, value)


def model_allowed(patterns: list[str], model_id: str) -> bool:
    if not patterns:
        return True
    candidates = model_candidates(model_id)
    return any(fnmatchcase(c, p) for p in patterns for c in candidates)


def model_candidates(model_id: str) -> list[str]:
    """The names a model reference answers to: the ARN, its model id, the base model."""
    candidates = [model_id]
    model = model_id
    if model_id.startswith("arn:"):
        resource = model_id.split(":", 5)[-1]
        kind, _, resource_id = resource.partition("/")
        if kind not in _MODEL_ARN_TYPES or not resource_id:
            return candidates  # provisioned, imported, application profiles: the ARN only
        candidates.append(resource_id)
        model = resource_id
    for prefix in PROFILE_PREFIXES:
        if model.startswith(prefix):
            candidates.append(model[len(prefix) :])
            break
    return candidates


def _restricted(spec: KeySpec, kind: str) -> bool:
    if kind == "model":
        return bool(spec.models)
    if kind == "s3":
        return spec.file_buckets is not None or spec.file_prefixes is not None
    return _allow_list(spec, kind) is not None


def file_allowed(spec: KeySpec, bucket: str, key: str | None) -> bool:
    """A bucket, and a key (or list prefix) in it, within the key's file allow-lists."""
    if spec.file_buckets is not None and bucket not in spec.file_buckets:
        return False
    if spec.file_prefixes is not None and key is not None:
        return any(key.startswith(prefix) for prefix in spec.file_prefixes)
    return True


def _allow_list(spec: KeySpec, kind: str) -> list[str] | None:
    return {
        "guardrail": spec.guardrail_ids,
        "knowledge base": spec.knowledge_base_ids,
        "agent": spec.agent_ids,
    }[kind]


def _check_one(spec: KeySpec, kind: str, value: str) -> None:
    if kind == "s3":
        bucket, _, key = value.removeprefix("s3://").partition("/")
        if not value.startswith("s3://") or not file_allowed(spec, bucket, key):
            raise errors.access_denied(f"The API key is not allowed to use {value!r}")
        return
    if kind == "model":
        if not model_allowed(spec.models, value):
            raise errors.access_denied(f"The API key is not allowed to use model {value!r}")
        return
    allowed = _allow_list(spec, kind)
    if allowed is None:
        return
    short = value.rsplit("/", 1)[-1] if value.startswith("arn:") else value
    if value not in allowed and short not in allowed:
        raise errors.access_denied(f"The API key is not allowed to use {kind} {value!r}")


def _parse_strict(body: bytes) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise errors.validation("The request body names the same field more than once")
        return dict(pairs)

    try:
        return json.loads(body, object_pairs_hook=no_duplicates)
    except (ValueError, UnicodeDecodeError):
        return None  # not JSON: AWS will refuse it, nothing to check


def _dig(document: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(document, dict):
            return None
        document = document.get(part)
    return document


def body_model(op: Operation, body: bytes) -> str | None:
    """The model an operation names in its body (for metering), or None."""
    fields = [path for path, kind in _BODY_FIELDS.get(op.name, ()) if kind == "model"]
    if not fields:
        return None
    document = _parse_strict(body)
    for path in fields:
        value = _dig(document, path)
        if isinstance(value, str):
            return value
    return None
