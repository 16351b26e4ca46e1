"""Where each service's requests go upstream.

The host comes from configuration only: an explicit endpoint URL (ours, or the SDK's own
``AWS_ENDPOINT_URL_*`` variables and shared config file) or the AWS template with a region.
A region a client asks for is checked against a strict pattern before it reaches the
template, so no request can steer the proxy to a host of its choosing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from yarl import URL

from .routing import Service

# Every AWS region name has this shape (us-east-1, us-gov-west-1, ap-southeast-7,
# eu-isoe-west-1); the length bounds are what keeps a made-up one from growing caches.
# The domain of a service's regional host, where it is not amazonaws.com: bedrock-mantle
# is https://bedrock-mantle.{region}.api.aws
# (https://docs.aws.amazon.com/bedrock/latest/userguide/bedrock-mantle.html).
_DOMAINS = {"bedrock-mantle": "api.aws"}
REGION_RE = re.compile(r"[a-z]{2}(?:-[a-z]{1,10}){1,3}-\d{1,2}")
_CACHE_MAX = 256


@dataclass(frozen=True, slots=True)
class Upstream:
    # scheme://host[:port]
    origin: str
    # A path prefix from an endpoint override, no trailing slash; usually empty.
    base_path: str
    # The Host header, exactly as signed.
    host: str
    region: str
    service: Service


def valid_region(region: str) -> bool:
    return REGION_RE.fullmatch(region) is not None


class Endpoints:
    """Resolves (service, region) to an upstream, caching each answer."""

    def __init__(self, overrides: dict[str, str], default_region: str) -> None:
        self._overrides = {name: _parse_base(url) for name, url in overrides.items()}
        self.default_region = default_region
        self._cache: dict[tuple[str, str], Upstream] = {}

    def resolve(self, service: Service, region: str | None = None) -> Upstream:
        region = region or self.default_region
        key = (service.name, region)
        upstream = self._cache.get(key)
        if upstream is None:
            if not valid_region(region):
                raise ValueError(f"invalid region {region!r}")
            override = self._overrides.get(service.name)
            if override is not None:
                origin, base_path, host = override
            else:
                domain = _DOMAINS.get(service.name, "amazonaws.com")
                origin, base_path, host = _parse_base(
                    f"https://{service.endpoint_prefix}.{region}.{domain}"
                )
            upstream = Upstream(origin, base_path, host, region, service)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = upstream
        return upstream


def _parse_base(url: str) -> tuple[str, str, str]:
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise ValueError(f"endpoint URL must be http(s)://host[:port][/path], got {url!r}")
    if parsed.query_string or parsed.fragment:
        raise ValueError(f"endpoint URL must not carry a query or fragment: {url!r}")
    host = parsed.raw_host
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if parsed.explicit_port is not None:
        host = f"{host}:{parsed.explicit_port}"
    return f"{parsed.scheme}://{host}", parsed.raw_path.rstrip("/"), host


def sdk_endpoint_overrides(service_names: tuple[str, ...]) -> dict[str, str]:
    """Endpoint URLs the AWS SDKs themselves would use: AWS_ENDPOINT_URL_<SERVICE>,
    AWS_ENDPOINT_URL, and the shared config file's ``services`` / ``endpoint_url``."""
    import botocore.session
    from botocore.configprovider import ConfiguredEndpointProvider

    session = botocore.session.get_session()
    try:
        if str(session.get_config_variable("ignore_configured_endpoint_urls")).lower() == "true":
            return {}
        full = session.full_config
        scoped = session.get_scoped_config()
    except Exception:  # a missing or broken profile must not hide the env overrides
        full, scoped = {}, {}
    found: dict[str, str] = {}
    for name in service_names:
        url = ConfiguredEndpointProvider(full, scoped, name).provide()
        if url:
            found[name] = url
    return found
