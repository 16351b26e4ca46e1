"""What the store keeps about a virtual key: its spec (owner, allow-lists, limits) and its
record (hashed token, sealed secret, times). Parsing admin input into a spec is ``access.keys``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..wire.clock import iso

OPERATION_GROUPS = (
    "inference",
    "agents",
    "guardrails",
    "batch",
    "control-read",
    "control-write",
    "files",
    # Bedrock AgentCore's data plane.
    "agentcore-runtime",
    "agentcore-memory",
    "agentcore-tools",
    "agentcore-evaluations",
    # Operations that hand the caller credentials or move money the server's principal
    # holds: never in a key unless named.
    "agentcore-identity",
    "agentcore-payments",
    # Bedrock's OpenAI- and Anthropic-compatible APIs: server-side tools, stored files,
    # containers, stored prompts and projects (``access.compat``).
    "server-tools",
)
# Allow-lists of resources besides models: None means no restriction, a list (even empty)
# allows only what it names.
ALLOW_LIST_FIELDS = (
    "guardrail_ids",
    "knowledge_base_ids",
    "agent_ids",
    "flow_ids",
    "file_buckets",
    "file_prefixes",
    "agent_runtime_arns",
    "memory_ids",
    "code_interpreter_ids",
    "browser_ids",
    "evaluator_ids",
    "gateway_ids",
    "registry_ids",
)
# Everything but changing the account's Bedrock resources, and AgentCore's credentials
# and payments.
DEFAULT_GROUPS = (
    "inference",
    "agents",
    "guardrails",
    "batch",
    "control-read",
    "files",
    "agentcore-runtime",
    "agentcore-memory",
    "agentcore-tools",
    "agentcore-evaluations",
)


@dataclass(slots=True)
class KeySpec:
    key_alias: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # Exact IDs, ARNs or glob patterns; empty means every model.
    models: list[str] = field(default_factory=list)
    operation_groups: list[str] = field(default_factory=lambda: list(DEFAULT_GROUPS))
    # None means no restriction; a list (even empty) is an allow-list.
    guardrail_ids: list[str] | None = None
    knowledge_base_ids: list[str] | None = None
    agent_ids: list[str] | None = None
    flow_ids: list[str] | None = None
    # Files (S3) and batch-job S3 URIs: allowed buckets, and key prefixes within them.
    file_buckets: list[str] | None = None
    file_prefixes: list[str] | None = None
    # AgentCore: runtimes (ids or ARNs, a harness too), memories, code interpreters,
    # browsers, evaluators, gateways and registries a key may use.
    agent_runtime_arns: list[str] | None = None
    memory_ids: list[str] | None = None
    code_interpreter_ids: list[str] | None = None
    browser_ids: list[str] | None = None
    evaluator_ids: list[str] | None = None
    gateway_ids: list[str] | None = None
    registry_ids: list[str] | None = None
    expires_at: float | None = None
    blocked: bool = False
    max_budget: float | None = None
    budget_duration: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    # The upstream pool this key's requests go to (``upstreams.pools``); None: its team's,
    # then the routes'.
    upstream: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeySpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(slots=True)
class KeyRecord:
    key_id: str
    token_hash: str
    token_hint: str
    access_key_id: str
    secret_enc: str
    spec: KeySpec
    created_at: float
    updated_at: float

    def refusal(self, now: float) -> str | None:
        """Why this key may not be used right now, or None."""
        if self.spec.blocked:
            return "The API key is blocked"
        if self.spec.expires_at is not None and now >= self.spec.expires_at:
            return "The API key has expired"
        return None

    def public(self) -> dict[str, Any]:
        """What the admin API shows: never the token hash or the sealed secret."""
        out = self.spec.to_json()
        out["expires"] = iso(self.spec.expires_at)
        del out["expires_at"]
        out.update(
            key_id=self.key_id,
            token=self.key_id,
            key_name=self.token_hint,
            access_key_id=self.access_key_id,
            created_at=iso(self.created_at),
            updated_at=iso(self.updated_at),
        )
        return out


class SpendRow(NamedTuple):
    """One ledger row: a request (or a batch job), who made it, what it used and cost.

    The field order is the column order of ``bp_spend``: ``SPEND_COLUMNS`` is derived from
    it, so a row and its columns cannot drift apart. A tuple, so that it is bound as it
    is: a dataclass's values, read out with an ``attrgetter`` of 27 names, cost ~7,000
    instructions a row on the event loop's thread.
    """

    request_id: str
    ts: float
    day: str
    key_id: str | None
    key_alias: str | None
    user_id: str | None
    team_id: str | None
    end_user: str | None
    operation: str
    service: str
    model: str | None
    status: int
    latency_ms: float
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    total_tokens: int
    cost: float | None
    incomplete: int
    use_case: str | None
    annotations: str | None  # JSON
    error: str | None
    estimated: int
    model_ref: str | None
    account: str | None
    region: str | None


class LabelRow(NamedTuple):
    """A tag or named limit a request was charged under (reports group by these)."""

    request_id: str
    kind: str  # "tag" or "limit"
    value: str
    ts: float
    cost: float | None
    total_tokens: int


SPEND_COLUMNS: tuple[str, ...] = SpendRow._fields
LABEL_COLUMNS: tuple[str, ...] = LabelRow._fields
