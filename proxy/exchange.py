"""The record of one request, and the observers that read it once it has ended.

The pipeline fills an ``Exchange`` as the request goes: who called (``Identity``), what
(operation, model), how it went upstream, what it consumed. When it ends, each observer
(metering, metrics, the access log, tracing) is handed the same finished record once, in
the order given at construction, so metering's cost is there for the others to read.

This module sits below ``access`` and ``metering`` so both may fill the record; the types
it names from them are for type checking only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .store.records import KeyRecord, KeySpec
from .wire.routing import Operation

if TYPE_CHECKING:
    from .metering.limits import Admission
    from .metering.usage import Meter, Usage


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request is from, once authenticated."""

    kind: str  # "master", "virtual", "anonymous"; "user" (single sign-on), "token" (admin)
    key_id: str | None = None  # a key's id; a user's subject; an admin token's id
    alias: str | None = None
    record: KeyRecord | None = None
    # The admin API's and the console's callers: a role (``access.roles``), the teams a
    # team-admin administers, and a user's email.
    role: str | None = None
    teams: tuple[str, ...] = ()
    email: str | None = None

    @property
    def is_master(self) -> bool:
        return self.kind == "master"

    @property
    def spec(self) -> KeySpec | None:
        return self.record.spec if self.record is not None else None


MASTER = Identity("master", key_id="master", alias="master")
ANONYMOUS = Identity("anonymous")


@dataclass(slots=True)
class Exchange:
    """One request's way through the proxy: what the observers record."""

    request_id: str
    method: str
    started: float  # perf_counter
    operation: Operation | None = None
    model: str | None = None
    # The model as the request named it, when that was an ARN resolved to ``model``.
    model_ref: str | None = None
    region: str | None = None
    # The upstream account and pool member ("account/region") that served the request.
    account: str | None = None
    upstream: str | None = None
    # The pool member that holds stored state the request continues (a compatible API's
    # stored response): the request goes there, or is not sent.
    pinned: str | None = None
    # The request asked for one answer where its operation may stream (a compatible API's
    # body without ``"stream": true``): it goes on HTTP/1.1, as a native call's does.
    single_answer: bool = False
    identity: Identity | None = None
    annotations: dict[str, Any] = field(default_factory=dict)
    admission: Admission | None = None
    meter: Meter | None = None
    usage: Usage | None = None
    cost: float | None = None
    status: int = 500
    error: str | None = None
    # Why a limit refused the request (rpm, tpm, budget, ...), for the metrics.
    refusal: str | None = None
    incomplete: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_request_id: str | None = None
    upstream_error: str | None = None
    # perf_counter marks, for the metrics: upstream time vs the proxy's own.
    upstream_started: float | None = None
    upstream_headers_at: float | None = None
    upstream_done: float | None = None
    first_byte_at: float | None = None
    # Set when the request ends (``end``): its duration, and the client's headers (for
    # tracing).
    seconds: float = 0.0
    # ``seconds`` in milliseconds, to the microsecond, worked out once for every observer.
    latency_ms: float = 0.0
    request_headers: Mapping[str, str] | None = None

    def end(self, seconds: float) -> None:
        """Record the request's duration. ``round(x, 3)`` rounds a float by formatting it
        in decimal (~2k instructions); rounding a count of microseconds to an integer does
        not, and differs from it by one microsecond at most, only on values within a
        rounding error of half a microsecond."""
        self.seconds = seconds
        self.latency_ms = round(seconds * 1_000_000) / 1000


class Observer(Protocol):
    """Reads a finished exchange. Called on the event loop; must not block or raise."""

    def completed(self, x: Exchange) -> None: ...
