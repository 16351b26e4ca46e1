"""The one gate: every front's request becomes an admitted call or a refusal here.

The steps, in this order, whatever the front:

1. the credential in the headers (a bearer key, a console session, a signature whose
   payload hash is declared), judged before any body is read, so a refusal costs no body;
2. otherwise the body, read under the process-wide cap on unverified bytes, then the
   signature that covers it;
3. the policy decision on what the request names (models, jobs, sessions, buckets, pages);
4. for a call that goes upstream: the route (the members to try), the request's
   annotations, its meter, and admission by the limits (budgets, RPM/TPM, parallel
   requests), which holds its reservations until the exchange completes.

A front only declares how it reads a request, as a ``Door``. It cannot skip or reorder a
step, and it cannot reach an upstream without the ``Admitted`` call this returns: the
upstream client takes one (``upstream.UpstreamClient.exchange``, ``authorize_stream``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from aiohttp import web

from ..access.unverified import UnverifiedBodies
from ..exchange import Exchange, Identity
from ..metering.annotations import read_annotations
from ..metering.service import Metering
from ..metering.usage import Meter
from .fleet import Target
from .listen.bodies import RequestBody

D = TypeVar("D")
D_co = TypeVar("D_co", covariant=True)


@dataclass(slots=True)
class Admitted(Generic[D]):
    """A call the gate let through: who makes it, the body read to judge it (None when it
    streams or has none), the members it may go to, and what the policy decided (a front's
    own record of it, such as the stored session a call continues)."""

    identity: Identity
    body: RequestBody | None
    targets: list[Target]
    decision: D


class Door(Protocol[D_co]):
    """What a front declares to the gate: how it reads each step's input from a request.
    Every method may raise ``errors.AwsError`` (or an HTTP redirect, for a browser): the
    refusal, rendered by the front in its caller's dialect."""

    # Whether admitted calls go upstream: routed, metered and admitted by the limits.
    upstream: bool

    def credential(self, request: web.Request, x: Exchange) -> Awaitable[Identity | None]:
        """The caller, judged from the headers alone; None when the credential covers the
        body (a SigV4 signature by a known key), which ``verify`` then judges."""
        ...

    def read(self, request: web.Request, x: Exchange) -> Awaitable[RequestBody | None]:
        """The body, when the front needs it before the call (None: it streams, or none)."""
        ...

    def verify(
        self, request: web.Request, x: Exchange, body: RequestBody | None
    ) -> Awaitable[Identity]:
        """The caller, from a credential that covers the body just read."""
        ...

    def authorize(
        self, request: web.Request, x: Exchange, body: RequestBody | None
    ) -> Awaitable[D_co]:
        """The policy decision on what the request names (``x.identity`` is the caller)."""
        ...

    def route(
        self, request: web.Request, x: Exchange, body: RequestBody | None
    ) -> Awaitable[list[Target]]:
        """The members the call may go to, in order (only asked when ``upstream``)."""
        ...

    def meter(self, x: Exchange, body: RequestBody | None) -> Meter | None:
        """What reads the call's usage (only asked when ``upstream``)."""
        ...


H = TypeVar("H", bound=Callable[..., Any])


class Gate:
    def __init__(self, metering: Metering, unverified: UnverifiedBodies, max_body: int) -> None:
        self._metering = metering
        self._unverified = unverified
        self._max_body = max_body
        # Every route handler that admits through this gate, and what it admits for (a
        # front, a door): a test enumerates the app's routes against it.
        self.guarded: dict[Callable[..., Any], object] = {}
        self.refused = 0

    def guard(self, handler: H, admits_for: object) -> H:
        """Record that ``handler`` admits its requests here, for ``admits_for``."""
        self.guarded[handler] = admits_for
        return handler

    async def admit(
        self,
        request: web.Request,
        x: Exchange,
        door: Door[D],
        annotations: list[tuple[str, str]] | None = None,
        body_limit: int | None = None,
    ) -> Admitted[D]:
        """The steps of the module's doc, or the refusal of the first that fails.
        ``body_limit``: the most a door reads before its credential is verified (the
        console's sign-in form), when less than the largest request body."""
        try:  # (no coroutine of its own: one frame less per request)
            identity = await door.credential(request, x)
            if identity is None:
                with self._unverified.hold(request.content_length, body_limit or self._max_body):
                    body = await door.read(request, x)
                    identity = await door.verify(request, x, body)
            else:
                body = await door.read(request, x)
            size = body.size if body is not None else request.content_length or 0
            x.bytes_in = size
            x.identity = identity  # before the policy, so a refusal is attributed to the key
            decision = await door.authorize(request, x, body)
            if not door.upstream:
                return Admitted(identity, body, [], decision)
            targets = await door.route(request, x, body)
            if annotations:
                x.annotations = read_annotations(annotations)
            x.meter = door.meter(x, body)
            await self._metering.admit(x, size)
            return Admitted(identity, body, targets, decision)
        except Exception:
            self.refused += 1
            raise


class LocalDoor:
    """A door for what the proxy answers itself (the admin API, the console): nothing goes
    upstream, so nothing is routed or metered, and a body is read by the page once its
    caller is known."""

    upstream = False

    async def read(self, request: web.Request, x: Exchange) -> RequestBody | None:
        return None

    async def verify(self, request: web.Request, x: Exchange, body: RequestBody | None) -> Identity:
        raise AssertionError(f"{type(self).__name__} judges its credential from the headers")

    async def authorize(self, request: web.Request, x: Exchange, body: RequestBody | None) -> None:
        return None

    async def route(
        self, request: web.Request, x: Exchange, body: RequestBody | None
    ) -> list[Target]:
        return []

    def meter(self, x: Exchange, body: RequestBody | None) -> Meter | None:
        return None
