"""The ``upstreams`` setting: named AWS accounts, pools of (account, region) members, and
the routes that pick a pool. Checked once at startup, so a mistake is one clear line.

Without it the proxy has one account (the default credential chain, ``aws_profile``) and
one region (``region``, or the client's SigV4 scope): exactly as before routing existed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from ...wire.endpoints import valid_region
from ...wire.routing import UPSTREAM_SERVICES

DEFAULT_ACCOUNT = "default"
DEFAULT_POOL = "default"
# IAM's own shape for a role ARN (a path is allowed: role/team/reader).
ROLE_ARN_RE = re.compile(r"arn:aws(?:-[a-z]+)*:iam::(\d{12}):role/[\w+=,.@/-]{1,512}")
ACCOUNT_ID_RE = re.compile(r"\d{12}")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Where a session tag's value comes from: the calling key's fields.
TAG_SOURCES = ("key_id", "key_alias", "team_id", "user_id")
ENDPOINT_SERVICES = (*UPSTREAM_SERVICES, "s3", "sts")


class FleetConfigError(ValueError):
    """One line naming the setting that is wrong."""


@dataclass(frozen=True, slots=True)
class AssumeRole:
    role_arn: str
    session_name: str = "bedrock-proxy"
    external_id: str | None = None
    duration_seconds: int = 3600
    # Tag name -> the key field its value comes from (TAG_SOURCES).
    session_tags: tuple[tuple[str, str], ...] = ()
    # Where the source credentials come from, to call STS with.
    source_profile: str | None = None


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    regions: tuple[str, ...]
    profile: str | None = None
    assume_role: AssumeRole | None = None
    endpoints: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    account_id: str | None = None


@dataclass(frozen=True, slots=True)
class Member:
    """One place a request can go: an account in a region."""

    account: Account
    region: str
    priority: int = 0
    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.account.name}/{self.region}"


@dataclass(frozen=True, slots=True)
class Route:
    pool: str
    key: str | None = None  # a key's id or alias
    team: str | None = None
    user: str | None = None
    model: str | None = None  # a glob

    def matches(
        self,
        key_id: str | None,
        alias: str | None,
        team: str | None,
        user: str | None,
        model: str | None,
    ) -> bool:
        if self.key is not None and self.key not in (key_id, alias):
            return False
        if self.team is not None and self.team != team:
            return False
        if self.user is not None and self.user != user:
            return False
        return self.model is None or (model is not None and fnmatchcase(model, self.model))


@dataclass(frozen=True, slots=True)
class FleetConfig:
    accounts: dict[str, Account]
    pools: dict[str, tuple[Member, ...]]
    routes: tuple[Route, ...]
    default_pool: str
    # Cool-down after a throttle or failure: base * 2**(failures - 1), at most max.
    cooldown_seconds: float = 1.0
    max_cooldown_seconds: float = 60.0
    # How often replicas read each other's health from Redis.
    health_sync_seconds: float = 1.0
    affinity: bool = True

    @property
    def configured(self) -> bool:
        """False for the implicit single upstream of a config without ``upstreams``."""
        return bool(self.pools)


def parse_fleet(raw: dict[str, Any]) -> FleetConfig:
    """The ``upstreams`` mapping → a checked config; an empty mapping is the single upstream."""
    if not raw:
        return FleetConfig({}, {}, (), DEFAULT_POOL)
    _only(
        raw,
        "upstreams",
        {
            "accounts",
            "pools",
            "routes",
            "default_pool",
            "cooldown_seconds",
            "max_cooldown_seconds",
            "health_sync_seconds",
            "affinity",
        },
    )
    accounts_raw = _mapping(raw.get("accounts"), "upstreams.accounts")
    if not accounts_raw:
        raise FleetConfigError("upstreams.accounts: name at least one account")
    accounts = {name: _account(name, value) for name, value in accounts_raw.items()}
    pools_raw = _mapping(raw.get("pools"), "upstreams.pools")
    if not pools_raw:
        raise FleetConfigError("upstreams.pools: name at least one pool")
    pools = {name: _pool(name, value, accounts) for name, value in pools_raw.items()}
    default_pool = raw.get("default_pool", DEFAULT_POOL if DEFAULT_POOL in pools else None)
    if default_pool is None and len(pools) == 1:
        default_pool = next(iter(pools))
    if default_pool not in pools:
        raise FleetConfigError(
            f"upstreams.default_pool: {default_pool!r} is not a pool "
            f"(one of {', '.join(sorted(pools))})"
        )
    routes_raw = raw.get("routes") or []
    if not isinstance(routes_raw, list):
        raise FleetConfigError("upstreams.routes: must be a list")
    routes = tuple(_route(i, value, pools, accounts) for i, value in enumerate(routes_raw))
    numbers = {}
    for name, default in (
        ("cooldown_seconds", 1.0),
        ("max_cooldown_seconds", 60.0),
        ("health_sync_seconds", 1.0),
    ):
        value = raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
            raise FleetConfigError(f"upstreams.{name}: must be a number of seconds above 0")
        numbers[name] = float(value)
    affinity = raw.get("affinity", True)
    if not isinstance(affinity, bool):
        raise FleetConfigError("upstreams.affinity: must be true or false")
    return FleetConfig(accounts, pools, routes, str(default_pool), affinity=affinity, **numbers)


def _account(name: str, raw: Any) -> Account:
    where = f"upstreams.accounts.{name}"
    if not _NAME_RE.fullmatch(name):
        raise FleetConfigError(f"{where}: an account name is letters, digits, '_', '.', '-'")
    raw = _mapping(raw, where)
    _only(raw, where, {"regions", "profile", "assume_role", "endpoints", "account_id"})
    regions = raw.get("regions")
    if not isinstance(regions, list) or not regions or not all(isinstance(r, str) for r in regions):
        raise FleetConfigError(f"{where}.regions: must be a list of AWS region names")
    for region in regions:
        if not valid_region(region):
            raise FleetConfigError(f"{where}.regions: {region!r} is not an AWS region name")
    profile = raw.get("profile")
    if profile is not None and not isinstance(profile, str):
        raise FleetConfigError(f"{where}.profile: must be a profile name")
    role = (
        _assume_role(where + ".assume_role", raw["assume_role"]) if "assume_role" in raw else None
    )
    if role is not None and profile is not None:
        raise FleetConfigError(
            f"{where}: profile and assume_role together; the role's source is "
            "assume_role.source_profile"
        )
    endpoints = _mapping(raw.get("endpoints"), where + ".endpoints")
    for service, url in endpoints.items():
        if service not in ENDPOINT_SERVICES:
            raise FleetConfigError(
                f"{where}.endpoints: unknown service {service!r} "
                f"(one of {', '.join(ENDPOINT_SERVICES)})"
            )
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise FleetConfigError(f"{where}.endpoints.{service}: must be an http(s):// URL")
    account_id = raw.get("account_id")
    if account_id is not None:
        account_id = str(account_id)
        if not ACCOUNT_ID_RE.fullmatch(account_id):
            raise FleetConfigError(f"{where}.account_id: must be 12 digits")
    elif role is not None:
        match = ROLE_ARN_RE.fullmatch(role.role_arn)
        account_id = match.group(1) if match else None
    return Account(
        name, tuple(regions), profile, role, {k: str(v) for k, v in endpoints.items()}, account_id
    )


def _assume_role(where: str, raw: Any) -> AssumeRole:
    raw = _mapping(raw, where)
    _only(
        raw,
        where,
        {
            "role_arn",
            "session_name",
            "external_id",
            "duration_seconds",
            "session_tags",
            "source_profile",
        },
    )
    role_arn = raw.get("role_arn")
    if not isinstance(role_arn, str) or not ROLE_ARN_RE.fullmatch(role_arn):
        raise FleetConfigError(
            f"{where}.role_arn: {role_arn!r} is not an IAM role ARN "
            "(arn:aws:iam::123456789012:role/NAME)"
        )
    session_name = raw.get("session_name", "bedrock-proxy")
    if not isinstance(session_name, str) or not re.fullmatch(r"[\w+=,.@-]{2,64}", session_name):
        raise FleetConfigError(f"{where}.session_name: 2-64 of letters, digits and +=,.@_-")
    external_id = raw.get("external_id")
    if external_id is not None and (
        not isinstance(external_id, str) or not re.fullmatch(r"[\w+=,.@:/-]{2,1224}", external_id)
    ):
        raise FleetConfigError(f"{where}.external_id: 2-1224 of letters, digits and +=,.@:/_-")
    duration = raw.get("duration_seconds", 3600)
    if isinstance(duration, bool) or not isinstance(duration, int) or not 900 <= duration <= 43200:
        raise FleetConfigError(f"{where}.duration_seconds: must be 900 to 43200")
    tags_raw = _mapping(raw.get("session_tags"), where + ".session_tags")
    tags = []
    for tag, source in tags_raw.items():
        if not re.fullmatch(r"[\w.:/=+@-]{1,128}", tag) or tag.lower().startswith("aws:"):
            raise FleetConfigError(f"{where}.session_tags: {tag!r} is not a valid tag key")
        if source not in TAG_SOURCES:
            raise FleetConfigError(
                f"{where}.session_tags.{tag}: {source!r} is not one of {', '.join(TAG_SOURCES)}"
            )
        tags.append((tag, source))
    source_profile = raw.get("source_profile")
    if source_profile is not None and not isinstance(source_profile, str):
        raise FleetConfigError(f"{where}.source_profile: must be a profile name")
    return AssumeRole(role_arn, session_name, external_id, duration, tuple(tags), source_profile)


def _pool(name: str, raw: Any, accounts: dict[str, Account]) -> tuple[Member, ...]:
    where = f"upstreams.{name}" if name.startswith("routes[") else f"upstreams.pools.{name}"
    if not _NAME_RE.fullmatch(name) and not name.startswith("routes["):
        raise FleetConfigError(f"{where}: a pool name is letters, digits, '_', '.', '-'")
    if not isinstance(raw, list) or not raw:
        raise FleetConfigError(f"{where}: must be a list of members")
    members = []
    seen = set()
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        item = _mapping(item, at)
        _only(item, at, {"account", "region", "priority", "weight"})
        account = accounts.get(item.get("account"))  # type: ignore[arg-type]
        if account is None:
            raise FleetConfigError(
                f"{at}: unknown account {item.get('account')!r} (one of {', '.join(accounts)})"
            )
        region = item.get("region", account.regions[0])
        if not isinstance(region, str) or not valid_region(region):
            raise FleetConfigError(f"{at}.region: {region!r} is not an AWS region name")
        if region not in account.regions:
            raise FleetConfigError(
                f"{at}.region: {region!r} is not one of account {account.name}'s regions"
            )
        priority = item.get("priority", 0)
        weight = item.get("weight", 1)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise FleetConfigError(f"{at}.priority: must be an integer (lower is tried first)")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= 1e6:
            raise FleetConfigError(f"{at}.weight: must be a number above 0")
        member = Member(account, region, priority, float(weight))
        if member.name in seen:
            raise FleetConfigError(f"{at}: {member.name} is listed twice")
        seen.add(member.name)
        members.append(member)
    return tuple(members)


def _route(
    i: int, raw: Any, pools: dict[str, tuple[Member, ...]], accounts: dict[str, Account]
) -> Route:
    """A route names a pool, or one account (and region) as a pool of one."""
    at = f"upstreams.routes[{i}]"
    raw = _mapping(raw, at)
    _only(raw, at, {"pool", "account", "region", "key", "team", "user", "model"})
    pool = raw.get("pool")
    if ("account" in raw) == (pool is not None):
        raise FleetConfigError(f"{at}: name either a pool or an account")
    if "account" in raw:
        member = _pool(
            f"routes[{i}]",
            [{"account": raw["account"], **({"region": raw["region"]} if "region" in raw else {})}],
            accounts,
        )[0]
        pool = member.name
        pools.setdefault(pool, (member,))
    elif "region" in raw:
        raise FleetConfigError(f"{at}.region: only with an account")
    elif pool not in pools:
        raise FleetConfigError(f"{at}.pool: unknown pool {pool!r} (one of {', '.join(pools)})")
    values = {}
    for name in ("key", "team", "user", "model"):
        value = raw.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise FleetConfigError(f"{at}.{name}: must be a non-empty string")
        values[name] = value
    if not any(values.values()):
        raise FleetConfigError(f"{at}: match on at least one of key, team, user, model")
    return Route(str(pool), **values)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise FleetConfigError(f"{where}: must be a mapping")
    return value


def _only(raw: dict[str, Any], where: str, allowed: set[str]) -> None:
    for name in raw:
        if name not in allowed:
            raise FleetConfigError(f"{where}: unknown setting {name!r}")
