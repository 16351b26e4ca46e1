"""Settings from a YAML file and ``BEDROCK_PROXY_*`` variables (the environment wins),
checked once at startup so a mistake is one clear line naming the setting."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import yaml

from ..access.oidc import OidcConfigError, OidcSettings
from .config_checks import ConfigError as ConfigError  # (where it has always been imported from)
from .config_checks import validate
from .fleet.config import FleetConfig, parse_fleet

ENV_PREFIX = "BEDROCK_PROXY_"
DEFAULT_AUTH_HEADERS = ("x-api-key", "litellm_user_api_key", "x-litellm-api-key", "x-bf-vk")


@dataclass(frozen=True, slots=True)
class Settings:
    # Listen address (--host).
    host: str = "0.0.0.0"
    # Listen port (--port).
    port: int = 4000
    # The admin key: signs into the console, calls the admin API, mints keys. Required
    # unless allow_unauthenticated.
    master_key: str | None = field(default=None, repr=False)
    # Serve without client authentication when no master key is set (loopback only).
    allow_unauthenticated: bool = False
    # Region used upstream; falls back to AWS_REGION, AWS_DEFAULT_REGION, the AWS profile.
    region: str | None = None
    # Honour the region in a client's SigV4 credential scope (strictly validated).
    client_region: bool = True
    # Upstream base URL per service name; the SDK's AWS_ENDPOINT_URL_* variables also apply.
    endpoints: dict[str, str] = field(default_factory=dict)
    # Larger request bodies get a 413 in the caller's protocol.
    max_body_bytes: int = 32 * 1024 * 1024
    # Bodies held at once, across the process, before their SigV4 signature is verified.
    max_unverified_body_bytes: int = 256 * 1024 * 1024
    # Largest single upload through /bedrock/files (S3's own limit for one PUT is 5 GiB).
    max_file_bytes: int = 5 * 1024**3
    # Connecting to the upstream.
    connect_timeout: float = 10.0
    # Waiting for the upstream's response headers.
    first_byte_timeout: float = 600.0
    # Silence between chunks of a response; streams have no total limit.
    idle_timeout: float = 120.0
    # The longest a bidirectional session may last, however busy (Nova Sonic's own
    # connections last at most 8 minutes); a revoked key ends it within a second.
    max_session_seconds: float = 3600.0
    # Seconds a client has to send its request headers (then the connection closes).
    header_timeout: float = 10.0
    # Seconds a client has to send its request body (then a 408).
    body_timeout: float = 120.0
    # Seconds a client's connection may stay idle between requests.
    keepalive_timeout: float = 75.0
    # HTTP/1.1 connections per upstream host; 0 means no limit (each call in flight holds one).
    pool_size: int = 0
    # Event streams share HTTP/2 connections upstream, this many per connection (fewer if
    # the server says so); 0 puts each on an HTTP/1.1 connection of its own. An upstream
    # that does not agree to HTTP/2 gets HTTP/1.1.
    upstream_http2_streams: int = 100
    # Send this Bedrock API key upstream instead of SigV4 (AWS_BEARER_TOKEN_BEDROCK).
    upstream_bearer_token: str | None = field(default=None, repr=False)
    # The AWS profile of the server's credentials (AWS_PROFILE).
    aws_profile: str | None = None
    # Headers that may carry a client's key, besides Authorization: Bearer.
    auth_headers: list[str] = field(default_factory=lambda: list(DEFAULT_AUTH_HEADERS))
    # One JSON line per request on stdout.
    access_log: bool = True
    # The server log's level (JSON lines on stderr).
    log_level: str = "info"
    # HTTPS on the main port with this PEM chain (--tls-cert) and the key below; reloaded
    # on SIGHUP.
    tls_cert: str | None = None
    # The private key of tls_cert (--tls-key).
    tls_key: str | None = None
    # A second, plain-HTTP listener for health checks (and metrics) inside a cluster.
    http_port: int | None = None
    # The key and ledger store: PostgreSQL when set, else SQLite at sqlite_path.
    database_url: str | None = field(default=None, repr=False)
    # The SQLite file, when database_url is unset.
    sqlite_path: str = "bedrock-proxy.db"
    # PostgreSQL connections per process.
    database_pool_size: int = 10
    # The longest any one store call may take (connecting included) before the request
    # that needed it gets a 503 with Retry-After; cached keys are served meanwhile.
    store_timeout: float = 3.0
    # Seals the virtual keys' SigV4 secrets at rest; defaults to the master key.
    secret_key: str | None = field(default=None, repr=False)
    # Older secret_keys that still open sealed secrets during a rotation.
    previous_secret_keys: list[str] = field(default_factory=list, repr=False)
    # How long a replica trusts a cached key: the bound on revocation delay.
    key_cache_ttl: float = 5.0
    # Clock skew allowed on SigV4 requests signed with a virtual key.
    sigv4_max_skew: int = 900
    # Rate-limit and budget counters shared by replicas; in-process when unset.
    redis_url: str | None = field(default=None, repr=False)
    # Where this deployment's keys live in Redis: its replicas share the prefix; two
    # deployments on one Redis need one each, or they share limits and upstream health.
    redis_prefix: str = "bp"
    # The longest any one Redis call may take (connecting included).
    redis_timeout: float = 2.0
    # While Redis is unreachable, keys with limits are refused with a 503 ("refuse"), or
    # admitted against counters kept by each replica alone ("local"): each replica then
    # enforces the whole limit by itself, so N replicas admit up to N times it.
    limits_on_redis_outage: str = "refuse"
    # A request's parallel slot and budget reservation in Redis lapse this long after its
    # replica last renewed them (every third of it, while the request runs): what a dead
    # replica, or a settlement lost to an outage, can hold a key's slots for at most.
    limits_lease_seconds: float = 30.0
    # Ledger rows are written at least this often; a SIGKILL loses at most this much.
    ledger_flush_interval: float = 1.0
    # Extra or overriding prices: a JSON file shaped like proxy/data/prices.json, and/or
    # {model: {input, output, cache_read, cache_write}} in USD per 1,000 tokens.
    prices_file: str | None = None
    # Prices in the settings themselves, {model: {input, output, cache_read, cache_write}}.
    prices: dict[str, Any] = field(default_factory=dict)
    # The price of a model no source prices, {input, output} per 1,000 tokens. Unset, a
    # key with a budget is refused such a model (its calls would otherwise be free).
    unpriced_model_price: dict[str, Any] = field(default_factory=dict)
    # USD per successful request, for operations that bill models they do not report
    # (InvokeAgent without a trace, InvokeFlow, RetrieveAndGenerate, Rerank...).
    request_prices: dict[str, Any] = field(default_factory=dict)
    # Batch jobs: how often one replica looks for ended jobs to charge, and their discount.
    batch_poll_interval: float = 60.0
    # A batch job's price against on-demand's.
    batch_discount: float = 0.5
    # Seconds an application inference profile's or provisioned model's resolution is kept.
    model_ref_ttl: float = 3600.0
    # Budget alerts: POSTed when a key, user, team or named limit crosses 80 % and 100 % of
    # its budget, once per period; "slack" sends Slack's {"text": ...} body.
    alert_webhook_url: str | None = field(default=None, repr=False)
    # The alert's body: "json", or "slack".
    alert_webhook_format: str = "json"
    # Output tokens assumed when reserving budget at admission.
    reserve_output_tokens: int = 1000
    # x-bedrock-proxy-cost / -tokens headers on non-stream responses.
    cost_headers: bool = True
    # Processes serving one port (SO_REUSEPORT); docs/operations.md says when to raise it.
    workers: int = 1
    # Listen with SO_REUSEPORT (set for --workers).
    reuse_port: bool = False
    # Set by the --workers supervisor: where workers share their metrics (observe.shared).
    metrics_dir: str | None = None
    # On SIGTERM: how long in-flight requests and streams may take to finish.
    shutdown_timeout: float = 30.0
    # /metrics on the main port without the master key (it is open on http_port anyway).
    metrics_public: bool = False
    # OpenTelemetry spans per request (needs the "otel" extra; configured by OTEL_* vars).
    tracing: bool = False
    # Upstream routing: named AWS accounts, pools of (account, region) members, routes
    # (see docs/operations.md). Unset: one upstream, the default credentials and region.
    upstreams: dict[str, Any] = field(default_factory=dict)
    # The operator's console at /ui.
    console: bool = True
    # Answer Bedrock calls from the built-in simulator instead of AWS (try it, or CI).
    simulate: bool = False
    # How long an idle console session lasts.
    console_idle_timeout: float = 1800.0
    # Load balancers (IP addresses or networks) whose X-Forwarded-Proto / Forwarded and
    # X-Forwarded-For the console believes: behind a TLS-terminating one, the browser's
    # scheme (for the sign-in's Origin check and the cookie's Secure flag) and address.
    trusted_proxies: list[str] = field(default_factory=list)
    # Single sign-on for the console (OpenID Connect): issuer, client_id, client_secret (or
    # client_secret_env, client_secret_file), scopes, groups_claim, email_claim, roles
    # ({admin|team-admin|member|auditor: [groups]}), teams ({group: team_id}),
    # recheck_seconds (how often a `bedrock-proxy login` asks the provider about its user
    # again, 60) and offline_prompt (sent with its refresh token's request, "consent"). See
    # docs/sso.md.
    oidc: dict[str, Any] = field(default_factory=dict)
    # The master key as a console sign-in: the break-glass way in beside single sign-on.
    console_master_signin: bool = True
    # Every user's spend cap across all their keys and APIs, unless their user record or
    # their team (team_member_budget) says otherwise: {max_budget: 50, budget_duration: 1d}.
    user_spend_cap: dict[str, Any] = field(default_factory=dict)
    # How long the audit log keeps a row, in days (0: for ever).
    audit_retention_days: float = 365.0
    # Derived, not a setting: ``oidc`` parsed (its client secret read from where it says).
    sso: OidcSettings | None = field(
        default=None, init=False, repr=False, compare=False, metadata={"derived": True}
    )
    # Derived, not a setting: ``upstreams`` parsed (once, by ``load_settings``).
    fleet: FleetConfig = field(
        default_factory=lambda: parse_fleet({}),
        init=False,
        repr=False,
        compare=False,
        metadata={"derived": True},
    )


# The settings a file, the environment or a flag may give (not what is derived from them).
_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if not f.metadata.get("derived")}
_SECRETS = frozenset(
    {
        "master_key",
        "upstream_bearer_token",
        "database_url",
        "secret_key",
        "previous_secret_keys",
        "redis_url",
        "oidc",
    }
)


def load_settings(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """File, then environment, then explicit overrides (the CLI's flags)."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    path = path or env.get(ENV_PREFIX + "CONFIG")
    if path:
        raw.update(_read_yaml(path))
    for name in _FIELDS:
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            raw[name] = value
    if "upstream_bearer_token" not in raw and env.get("AWS_BEARER_TOKEN_BEDROCK"):
        raw["upstream_bearer_token"] = env["AWS_BEARER_TOKEN_BEDROCK"]
    if "aws_profile" not in raw and env.get("AWS_PROFILE"):
        raw["aws_profile"] = env["AWS_PROFILE"]
    for name, value in (overrides or {}).items():
        if value is not None:
            raw[name] = value
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _FIELDS:
            raise ConfigError(f"config error: unknown setting {name!r}")
        values[name] = _coerce(name, _FIELDS[name].type, value)
    if values.get("region") is None:
        values["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if "auth_headers" in values:
        values["auth_headers"] = [h.lower() for h in values["auth_headers"]]
    if values.get("simulate") and not values.get("upstream_bearer_token"):
        # The simulator needs no AWS credentials: a token it ignores, so none are looked up.
        values["upstream_bearer_token"] = "bedrock-proxy-simulated"
    # Frozen from here on: every part of the process reads the same settings.
    settings = Settings(**values)
    object.__setattr__(settings, "fleet", validate(settings))
    if settings.oidc:
        try:
            sso = OidcSettings.parse(settings.oidc, dict(env))
        except OidcConfigError as exc:
            raise ConfigError(f"config error: {exc}") from None
        object.__setattr__(settings, "sso", sso)
    return settings


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"config error: cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path} must hold a mapping of settings")
    return data


def _coerce(name: str, type_: Any, value: Any) -> Any:
    kind = str(type_)
    try:
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "dict[str, Any]":
            value = orjson.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
        if kind.startswith("dict"):
            if isinstance(value, str):
                value = dict(item.split("=", 1) for item in value.split(",") if item)
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): str(v) for k, v in value.items()}
        if kind.startswith("list"):
            if isinstance(value, str):
                value = [item.strip() for item in value.split(",") if item.strip()]
            if not isinstance(value, list):
                raise ValueError
            return [str(v) for v in value]
        return None if value is None else str(value)
    except (TypeError, ValueError):
        shown = "<hidden>" if name in _SECRETS else repr(value)
        raise ConfigError(
            f"config error: {name}: expected {kind.replace(' | None', '')}, got {shown}"
        ) from None
