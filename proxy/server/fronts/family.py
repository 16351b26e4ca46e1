"""The Bedrock front and its kin, built together: native Bedrock, AgentCore's data and
control planes, and the OpenAI- and Anthropic-compatible APIs on bedrock-runtime and
bedrock-mantle, each on routes and base paths of its own."""

from __future__ import annotations

from typing import Any

from ...access.auth import Authenticator
from ...access.compat import OwnedState
from ...access.jobs import JobRegistry
from ...access.modelrefs import ModelRefs
from ...access.owned import OwnedSessions
from ...metering.service import Metering
from ...observe.metrics import Metrics
from ...store import Store
from ...wire import compat
from ...wire.clock import Clock
from ...wire.compat import CompatRouter
from ...wire.routing import AGENTCORE, AGENTCORE_CONTROL, Router, load_operations
from ..config import Settings
from ..gate import Gate
from ..pipeline import Shutdown
from ..upstream import UpstreamClient
from .bedrock import AGENTCORE_CONTROL_PATH, AGENTCORE_PATH, BASE_PATH, BedrockFront
from .compat import MANTLE_PATH, MANTLE_ROOTS, RUNTIME_PATHS, RUNTIME_ROOTS, CompatFront
from .duplex import DuplexRelay


class BedrockFronts:
    """The Bedrock front and its kin: each on routes and base paths of its own, sharing
    the gate, the job registry, model references and the bidirectional relay."""

    def __init__(
        self,
        settings: Settings,
        authenticator: Authenticator,
        upstream: UpstreamClient,
        metering: Metering,
        metrics: Metrics,
        gate: Gate,
        clock: Clock,
        shutdown: Shutdown,
        store: Store,
    ) -> None:
        self._settings = settings
        self._services = (authenticator, upstream, metering, metrics)
        self._gate, self._clock = gate, clock
        self._jobs = JobRegistry(store)
        self._model_refs = ModelRefs(upstream.control_get, settings.model_ref_ttl, clock)
        self._duplex = DuplexRelay(
            upstream,
            metering,
            settings.idle_timeout,
            settings.first_byte_timeout,
            metrics,
            shutdown,
            settings.connect_timeout,
            lambda x: self._bedrock.watch(x, settings.max_session_seconds),
        )
        self._bedrock = self.front(Router(load_operations()))

    def front(
        self,
        routes: Router | CompatRouter,
        owned: OwnedSessions | None = None,
        base: str = BASE_PATH,
        kind: type[BedrockFront] = BedrockFront,
        **extra: Any,
    ) -> BedrockFront:
        return kind(
            self._settings,
            routes,
            *self._services,
            self._jobs,
            self._model_refs,
            self._duplex,
            self._gate,
            self._clock,
            owned,
            base,
            **extra,
        )

    def by_prefix(self, store: Store) -> list[tuple[str, BedrockFront]]:
        """(prefix, front), the busiest first: /bedrock, then the paths nested in it."""
        # AgentCore's data plane sessions, and the compatible APIs' stored responses and
        # conversations, are owned per key.
        agentcore = self.front(
            Router(load_operations((AGENTCORE,))), OwnedSessions(store), AGENTCORE_PATH
        )
        control = self.front(
            Router(load_operations((AGENTCORE_CONTROL,))), None, AGENTCORE_CONTROL_PATH
        )
        state = OwnedState(store)
        runtime = self.front(
            CompatRouter(compat.RUNTIME, RUNTIME_ROOTS), kind=CompatFront, owned_state=state
        )
        mantle = self.front(
            CompatRouter(compat.MANTLE, MANTLE_ROOTS),
            base=MANTLE_PATH,
            kind=CompatFront,
            owned_state=state,
        )
        return [
            (BASE_PATH, self._bedrock),
            *((p, runtime) for p in RUNTIME_PATHS),
            (AGENTCORE_PATH, agentcore),
            (AGENTCORE_CONTROL_PATH, control),
            (MANTLE_PATH, mantle),
        ]
