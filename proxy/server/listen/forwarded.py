"""What a request says about its client when it came through a TLS-terminating load
balancer: the scheme the browser used and the browser's address.

``X-Forwarded-Proto``, ``X-Forwarded-For`` and RFC 7239 ``Forwarded`` are anyone's to
send, so they are read only from the proxies an operator names (``trusted_proxies``, IP
addresses or networks); from anyone else the connection itself is the truth.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from aiohttp import web

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    def __init__(self, networks: Iterable[str] = ()) -> None:
        self._networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in networks
        )

    def trusts(self, address: str | None) -> bool:
        if not self._networks or not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def scheme(self, request: web.BaseRequest) -> str:
        """``http`` or ``https`` as the browser used it."""
        if self.trusts(request.remote):
            forwarded = _forwarded_proto(request.headers.get("Forwarded", ""))
            proto = forwarded or request.headers.get("X-Forwarded-Proto", "")
            proto = proto.split(",")[0].strip().lower()
            if proto in ("http", "https"):
                return proto
        return request.scheme

    def client(self, request: web.BaseRequest) -> str:
        """The browser's address: the last hop of X-Forwarded-For not one of ours."""
        remote = request.remote or "-"
        if not self.trusts(remote):
            return remote
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
        for hop in reversed([h for h in hops if h]):
            if not self.trusts(hop):
                return hop
        return remote


def _forwarded_proto(value: str) -> str:
    """The first element's ``proto=`` of an RFC 7239 Forwarded header, or ""."""
    first = value.split(",", 1)[0]
    for pair in first.split(";"):
        name, _, token = pair.strip().partition("=")
        if name.lower() == "proto":
            return token.strip().strip('"')
    return ""
