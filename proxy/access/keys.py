"""Virtual keys: what one is, how it is minted, and how admin input becomes a valid spec.

A key has three credentials: a bearer token (stored only as its SHA-256), and for AWS SDK
clients an access key id with a secret (stored encrypted, see ``secretbox``). Everything
else — owner, allow-lists, limits — is the spec, kept as one JSON document.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

from ..store.records import (
    ALLOW_LIST_FIELDS,
    DEFAULT_GROUPS,
    OPERATION_GROUPS,
    KeyRecord,
    KeySpec,
)
from ..wire import errors
from ..wire.clock import parse_iso
from ..wire.params import number_field, parse_duration

__all__ = ["DEFAULT_GROUPS", "OPERATION_GROUPS", "KeyRecord", "KeySpec"]

TOKEN_PREFIX = "sk-bp-"
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_MAX_TIMESTAMP = 253402300799.0  # 9999-12-31T23:59:59Z


@dataclass(slots=True)
class MintedCredentials:
    token: str
    token_hash: str
    access_key_id: str
    secret_access_key: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# A key's own value given by an admin (LiteLLM's ``{"key": "sk-..."}``, to migrate keys
# without touching their clients): at least this long, or it is no secret.
MIN_GIVEN_TOKEN = 32


def mint_credentials(token: str | None = None) -> MintedCredentials:
    """A new key's credentials: its bearer token (``token`` when an admin gives one) and
    access key pair."""
    token = token or TOKEN_PREFIX + secrets.token_urlsafe(32)
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


def parse_spec(body: dict[str, Any], base: KeySpec | None = None, *, now: float) -> KeySpec:
    """Admin input (LiteLLM field names) → a spec; unknown or wrong fields are a 400.
    ``now``: the time a ``duration`` counts from (the caller's clock)."""
    spec = KeySpec.from_json(base.to_json()) if base else KeySpec()
    for name, value in body.items():
        if name in ("key", "keys"):
            continue
        if name in ("duration", "expires"):
            spec.expires_at = _expiry(name, value, now)
        elif name in ("key_alias", "user_id", "team_id", "budget_duration", "upstream"):
            spec_value = _optional_str(name, value)
            if name == "upstream" and not spec_value:
                spec_value = None  # "" clears it, as null does (the CLI has no null)
            if name == "budget_duration" and spec_value is not None:
                parse_duration(name, spec_value)
            if name == "key_alias" and spec_value is not None and _names_a_key(spec_value):
                # /key/delete and the others find a key by id, token, access key id or
                # alias: an alias shaped like the others would name another key.
                raise errors.validation(
                    "key_alias must not look like a key id (vk_…), a token (sk-bp-…) or an "
                    "access key id (BPK…)"
                )
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
        elif name in ALLOW_LIST_FIELDS:
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


def _expiry(name: str, value: Any, now: float) -> float | None:
    if value is None:
        return None
    if name == "duration":
        return now + parse_duration(name, str(value))
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not 0 <= value <= _MAX_TIMESTAMP:
            raise errors.validation("expires: a Unix time must be between 0 and year 9999")
        return float(value)
    try:
        return parse_iso(str(value))
    except OverflowError:
        raise errors.validation(f"expires: {value!r} is out of range") from None
    except ValueError:
        raise errors.validation(f"expires: {value!r} is not an ISO 8601 time") from None


_ACCESS_KEY_ID = re.compile(r"BPK[A-Z2-7]{17}\Z")


def _names_a_key(alias: str) -> bool:
    return alias.startswith(("vk_", TOKEN_PREFIX)) or _ACCESS_KEY_ID.match(alias) is not None


def _optional_str(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise errors.validation(f"{name} must be a string")


def _str_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise errors.validation(f"{name} must be a list of non-empty strings")
    return list(value)
