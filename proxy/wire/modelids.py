"""Model references as Bedrock spells them: bare ids, cross-region profiles, ARNs.

``anthropic.claude-x`` is a foundation model; ``us.anthropic.claude-x`` is the same model
through a cross-region inference profile; an ARN names either of those, or a resource only
a lookup can resolve (an application inference profile, a provisioned or imported model).
"""

from __future__ import annotations

from typing import NamedTuple

# Cross-region inference-profile prefixes: "us.anthropic.x" is a way to call "anthropic.x".
PROFILE_PREFIXES = ("us-gov.", "us.", "eu.", "apac.", "global.", "jp.", "au.", "ca.")
# ARN resource types whose id is itself a model id (or a profile of one).
MODEL_ARN_TYPES = frozenset({"foundation-model", "inference-profile"})


class Arn(NamedTuple):
    partition: str
    service: str
    region: str
    account: str
    resource_type: str  # the part of the resource before the first "/"
    resource: str  # everything after "account:"


def parse_arn(value: str) -> Arn | None:
    """The parts of ``arn:PARTITION:SERVICE:REGION:ACCOUNT:TYPE/ID...``, or None."""
    parts = value.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn":
        return None
    resource = parts[5]
    return Arn(parts[1], parts[2], parts[3], parts[4], resource.partition("/")[0], resource)


def split_profile(model_id: str) -> tuple[str | None, str]:
    """``("us.", "anthropic.x")`` for a cross-region profile id, ``(None, id)`` otherwise."""
    for prefix in PROFILE_PREFIXES:
        if model_id.startswith(prefix):
            return prefix, model_id[len(prefix) :]
    return None, model_id


def arn_model_id(value: str) -> str | None:
    """The model id a foundation-model or inference-profile ARN names; None for other
    ARNs (their model is known only by a lookup) and for values that are not ARNs."""
    arn = parse_arn(value)
    if arn is None or arn.resource_type not in MODEL_ARN_TYPES:
        return None
    resource_id = arn.resource.partition("/")[2]
    return resource_id or None
