"""Virtual keys: what one is, how it is minted, and how admin input becomes a valid spec.

A key has three credentials: a bearer token (stored only as its SHA-256), and for AWS SDK
clients an access key id with a secret (stored encrypted, see ``secretbox``). Everything
else — owner, allow-lists, limits — is the spec, kept as one JSON document.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import errors

TOKEN_PREFIX = "sk-bp-"
OPERATION_GROUPS = (
    "inference",
    "agents",
    "guardrails",
    "batch",
    "control-read",
    "control-write",
    "files",
)
# Everything but changing the account's Bedrock resources.
DEFAULT_GROUPS = ("inference", "agents", "guardrails", "batch", "control-read", "files")
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_DURATION_RE = re.compile(r"(\d+)\s*(s|m|h|d|w)")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Admin numbers are range-checked: past these nothing means anything, and stores, Redis and
# datetime all have limits of their own that would otherwise surface as a 500.
MAX_DURATION_SECONDS = 100 * 366 * 86400
MAX_LIMIT = 10**12
_MAX_TIMESTAMP = 253402300799.0  # 9999-12-31T23:59:59Z


@dataclass(slots=True)
class KeySpec:
    key_alias: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # Exact IDs, ARNs or glob patterns; empty means every model.
    models: list[str] = field(default_factory=list)
    operation_groups: list[str] = field(default_factory=lambda: list(DEFAULT_GROUPS))
    # None means no restriction; a list (even empty) is an allow-list.
    guardrail_ids: list[str] | None = None
    knowledge_base_ids: list[str] | None = None
    agent_ids: list[str] | None = None
    flow_ids: list[str] | None = None
    # Files (S3) and batch-job S3 URIs: allowed buckets, and key prefixes within them.
    file_buckets: list[str] | None = None
    file_prefixes: list[str] | None = None
    expires_at: float | None = None
    blocked: bool = False
    max_budget: float | None = None
    budget_duration: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeySpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(slots=True)
class KeyRecord:
    key_id: str
    token_hash: str
    token_hint: str
    access_key_id: str
    secret_enc: str
    spec: KeySpec
    created_at: float
    updated_at: float

    def refusal(self, now: float) -> str | None:
        """Why this key may not be used right now, or None."""
        if self.spec.blocked:
            return "The API key is blocked"
        if self.spec.expires_at is not None and now >= self.spec.expires_at:
            return "The API key has expired"
        return None

    def public(self) -> dict[str, Any]:
        """What the admin API shows: never the token hash or the sealed secret."""
        out = self.spec.to_json()
        out["expires"] = _iso(self.spec.expires_at)
        del out["expires_at"]
        out.update(
            key_id=self.key_id,
            token=self.key_id,
            key_name=self.token_hint,
            access_key_id=self.access_key_id,
            created_at=_iso(self.created_at),
            updated_at=_iso(self.updated_at),
        )
        return out


@dataclass(slots=True)
class MintedCredentials:
    token: str
    token_hash: str
    access_key_id: str
    secret_access_key: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def mint_credentials() -> MintedCredentials:
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return MintedCredentials(
        token=token,
        token_hash=hash_token(token),
        access_key_id="BPK" + "".join(secrets.choice(_BASE32) for _ in range(17)),
        secret_access_key=secrets.token_urlsafe(30),
    )


def new_key_id() -> str:
    return "vk_" + secrets.token_hex(8)


def token_hint(token: str) -> str:
    """Enough of a token to recognise it in a list, not enough to use it."""
    return f"{token[:9]}…{token[-4:]}"


def parse_spec(body: dict[str, Any], base: KeySpec | None = None) -> KeySpec:
    """Admin input (LiteLLM field names) → a spec; unknown or wrong fields are a 400."""
    spec = KeySpec.from_json(base.to_json()) if base else KeySpec()
    for name, value in body.items():
        if name in ("key", "keys"):
            continue
        if name in ("duration", "expires"):
            spec.expires_at = _expiry(name, value)
        elif name in ("key_alias", "user_id", "team_id", "budget_duration"):
            spec_value = _optional_str(name, value)
            if name == "budget_duration" and spec_value is not None:
                parse_duration(name, spec_value)
            setattr(spec, name, spec_value)
        elif name == "metadata":
            if not isinstance(value, dict):
                raise errors.validation("metadata must be an object")
            spec.metadata = value
        elif name == "models":
            spec.models = _str_list(name, value)
        elif name in ("operation_groups", "allowed_operations"):
            groups = _str_list(name, value)
            unknown = sorted(set(groups) - set(OPERATION_GROUPS))
            if unknown:
                raise errors.validation(
                    f"{name}: unknown group {unknown[0]!r} (one of {', '.join(OPERATION_GROUPS)})"
                )
            spec.operation_groups = groups
        elif name in (
            "guardrail_ids",
            "knowledge_base_ids",
            "agent_ids",
            "flow_ids",
            "file_buckets",
            "file_prefixes",
        ):
            setattr(spec, name, None if value is None else _str_list(name, value))
        elif name == "blocked":
            if not isinstance(value, bool):
                raise errors.validation("blocked must be true or false")
            spec.blocked = value
        elif name == "max_budget":
            spec.max_budget = number_field(name, value, float)
        elif name in ("rpm_limit", "tpm_limit", "max_parallel_requests"):
            setattr(spec, name, number_field(name, value, int))
        else:
            raise errors.validation(f"Unknown field {name!r}")
    return spec


def parse_duration(name: str, text: str) -> int:
    """'30s', '15m', '12h', '30d', '2w' (or combinations like '1d12h') → seconds."""
    text = text.strip().lower()
    total, pos = 0, 0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or total <= 0:
        raise errors.validation(f"{name}: {text!r} is not a duration like 30d, 12h or 15m")
    if total > MAX_DURATION_SECONDS:
        raise errors.validation(f"{name}: {text!r} is longer than 100 years")
    return total


def _expiry(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if name == "duration":
        return time.time() + parse_duration(name, str(value))
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not 0 <= value <= _MAX_TIMESTAMP:
            raise errors.validation("expires: a Unix time must be between 0 and year 9999")
        return float(value)
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise errors.validation(f"expires: {value!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return when.timestamp()
    except (OverflowError, ValueError):
        raise errors.validation(f"expires: {value!r} is out of range") from None


def _optional_str(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise errors.validation(f"{name} must be a string")


def _str_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise errors.validation(f"{name} must be a list of non-empty strings")
    return list(value)


def number_field(name: str, value: Any, kind: type) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise errors.validation(f"{name} must be a non-negative number")
    if not value <= MAX_LIMIT:  # also false for NaN
        raise errors.validation(f"{name} must be at most {MAX_LIMIT}")
    if kind is int and int(value) != value:
        raise errors.validation(f"{name} must be a whole number")
    return kind(value)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
