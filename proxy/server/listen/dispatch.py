"""Request dispatch for the main listener: aiohttp's router, with shortcuts for the fronts'
prefixes (/bedrock/, /bedrock-mantle/, ...).

The fronts match the raw path themselves, so for their requests aiohttp's resolution
(building and decoding a URL, then a regex per candidate route) is work thrown away: about
7 % of the CPU per request. A raw path under a prefix (the longest that matches), other than
the excluded ones, goes straight to that prefix's route; everything else is resolved by
aiohttp as usual.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute, UrlMappingMatchInfo

from .aiohttp_adapter import application_with_router

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


@dataclass(slots=True)
class _Prefix:
    """A front's prefix ("/bedrock/"), and the prefixes nested in it ("/bedrock/openai",
    "/bedrock/files") by the first character after it: one slice and one lookup tell
    almost every request under the prefix that no nested prefix is its (a startswith per
    candidate is ~300 instructions of argument parsing alone)."""

    path: str
    length: int
    route: AbstractRoute
    # A nested prefix (no trailing slash) and its route, or None: resolved by aiohttp.
    nested: dict[str, list[tuple[str, AbstractRoute | None]]]


class PrefixDispatcher(web.UrlDispatcher):
    def __init__(self) -> None:
        super().__init__()
        # In the order added: the busiest first.
        self._prefixes: list[_Prefix] = []
        # Where requests no route takes go (CONNECT's authority form, a 405), so that they
        # get the app's AWS-shaped error instead of aiohttp's text/plain page.
        self.fallback: AbstractRoute | None = None

    def add_prefix_route(
        self,
        prefix: str,
        handler: Handler,
        *,
        expect_handler: ExpectHandler,
        excluded: tuple[str, ...] = (),
    ) -> None:
        """Every path under ``prefix`` to ``handler``, except paths that are one of
        ``excluded`` or continue one with ``/`` or ``?`` (those resolve as usual). A
        prefix under one added before is nested in it: its paths go to its own handler."""
        for path in (prefix, prefix + "/{tail:.*}"):
            route = self.add_route("*", path, handler, expect_handler=expect_handler)
        outer = next((p for p in self._prefixes if prefix.startswith(p.path)), None)
        if outer is not None:
            outer.nested.setdefault(prefix[outer.length], []).append((prefix, route))
            return
        entry = _Prefix(prefix + "/", len(prefix) + 1, route, {})
        for path in excluded:
            entry.nested.setdefault(path[entry.length], []).append((path, None))
        self._prefixes.append(entry)

    def _shortcut(self, raw_path: str) -> AbstractRoute | None:
        for entry in self._prefixes:
            if raw_path[: entry.length] == entry.path:  # (a slice: no argument parsing)
                break
        else:
            return None
        nested = entry.nested.get(raw_path[entry.length : entry.length + 1])
        if nested is not None:
            for path, route in nested:
                end = len(path)
                if raw_path[:end] == path and raw_path[end : end + 1] in ("", "/", "?"):
                    return route
        return entry.route

    async def resolve(self, request: web.Request) -> UrlMappingMatchInfo:
        route = self._shortcut(request.raw_path)
        if route is not None:
            return UrlMappingMatchInfo({}, route)
        found = await super().resolve(request)
        if self.fallback is not None and getattr(found, "http_exception", None) is not None:
            return UrlMappingMatchInfo({}, self.fallback)
        return found


def application(**kwargs: Any) -> tuple[web.Application, PrefixDispatcher]:
    """An Application on a PrefixDispatcher."""
    router = PrefixDispatcher()
    return application_with_router(router, **kwargs), router
