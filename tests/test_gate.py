"""Every front passes through the one gate (``proxy.server.gate``).

The app's routes are enumerated: each is either public by name, with the reason below, or
a handler the gate guards. Then every guarded route is called without a key (every
operation of every Bedrock-family front, the files endpoint, every admin route and
console page), and each must be refused by the gate itself: its refusal counter moves
once per request. A route added without the gate fails the first test; a guarded one
that answers before admitting fails the second.
"""

from __future__ import annotations

import http.client
import re
from urllib.parse import urlsplit

from aiohttp import web

from proxy.server.app import GATE
from proxy.server.fronts.bedrock import BedrockFront
from proxy.server.fronts.files import FILES_PATH, FilesFront

# What answers without a key, and why that is safe.
PUBLIC = {
    ("GET", "/"): "redirects a browser to the console",
    ("GET", "/health/liveness"): "says the process is up, nothing else",
    ("GET", "/health/readiness"): "says whether the proxy can serve, nothing else",
    ("GET", "/ui"): "redirects to the sign-in page, or to the session's own page",
    ("GET", "/ui/"): "the same",
    ("GET", "/ui/static/{name}"): "the console's stylesheet and script",
    ("GET", "/ui/signin"): "the sign-in form (its POST passes the gate)",
    ("*", "/{tail}"): "refuses everything: no operation has this path",
}


def _routes(app: web.Application) -> list[tuple[str, str, object]]:
    found = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue  # aiohttp's twin of a GET route, with the same handler
        found.append((route.method, route.resource.canonical, route.handler))
    return found


def test_every_route_is_public_by_name_or_guarded_by_the_gate(start_proxy):
    server = start_proxy(console=True, metrics_public=False)
    gate = server.app[GATE]
    unguarded = [
        (method, path)
        for method, path, handler in _routes(server.app)
        if handler not in gate.guarded and (method, path) not in PUBLIC
    ]
    assert not unguarded, f"routes that bypass the gate: {unguarded}"
    kinds = {type(front) for front in gate.guarded.values()}
    assert FilesFront in kinds and any(issubclass(k, BedrockFront) for k in kinds)


def _filled(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", template)


def _probes(server) -> list[tuple[str, str]]:
    """(method, path) for every guarded route: each operation of a Bedrock-family front,
    the files endpoint, each admin route and console page."""
    gate = server.app[GATE]
    probes: list[tuple[str, str]] = []
    fronts_seen: set[int] = set()
    for method, path, handler in _routes(server.app):
        guarded = gate.guarded.get(handler)
        if guarded is None:
            continue
        if isinstance(guarded, BedrockFront):
            if id(guarded) in fronts_seen:
                continue
            fronts_seen.add(id(guarded))
            router, base = guarded._router, guarded._base
            for op in router.operations:
                filled = _filled(op.template)
                if router.match(op.method, filled.partition("?")[0]) is not None:
                    probes.append((op.method, base + filled))
        elif isinstance(guarded, FilesFront):
            if not path.endswith("}"):
                for verb in ("GET", "PUT", "DELETE", "HEAD"):
                    probes.append((verb, FILES_PATH + "/bucket-x/key"))
        else:
            probes.append((method, _filled(path)))
    return probes


def test_every_guarded_route_is_refused_by_the_gate_without_a_key(start_proxy):
    server = start_proxy(console=True, metrics_public=False)
    gate = server.app[GATE]
    host = urlsplit(server.url).netloc
    probes = _probes(server)
    # Every operation of every front, not a sample.
    assert len(probes) > 300, len(probes)
    conn = http.client.HTTPConnection(host, timeout=10)
    answered = []
    try:
        for method, path in probes:
            before = gate.refused
            body = b"{}" if method in ("POST", "PUT", "PATCH") else None
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.will_close:
                conn.close()
                conn = http.client.HTTPConnection(host, timeout=10)
            refused = 400 <= response.status < 500 or (
                response.status == 303
                and (response.getheader("Location") or "").startswith("/ui/signin")
            )
            if not refused or gate.refused != before + 1:
                answered.append((method, path, response.status, gate.refused - before))
    finally:
        conn.close()
    assert not answered, f"answered without passing the gate: {answered[:10]}"
