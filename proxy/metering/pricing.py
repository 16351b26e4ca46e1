"""Cost from usage, with prices from a maintained source.

Where a price comes from, first match wins:
1. the operator's overrides (``prices`` in config, then ``prices_file``): negotiated or
   private prices;
2. ``genai-prices`` (a PyPI package whose maintainers track AWS's price list: Bedrock model
   IDs, cross-region ``us.``/``eu.``/``apac.``/``jp.``/``au.``/``global.`` profiles with
   their regional premiums, cache read and write prices);
3. the table shipped in ``data/prices.json``, for what the maintained source lacks
   (guardrail text units, a few embedding and rerank models).

A model none of them prices gets a null cost (never a silent zero) and is counted, so the
gap shows; a key with a budget is refused such a model (see ``metering``) unless a
fallback price is configured.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import Any

from ..wire.modelids import arn_model_id, split_profile
from .usage import Usage

log = logging.getLogger("bedrock_proxy.pricing")

_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1,000 tokens, and where it came from."""

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None
    source: str = "config"
    # A maintained price that is not linear (tiers by context length): costed exactly by
    # genai-prices itself, on the slow path.
    exact: Any = None


class PriceTable:
    def __init__(
        self,
        overrides: dict[str, Price],
        shipped: dict[str, Price],
        multipliers: dict[str, float],
        guardrails: dict[str, float],
        fallback: Price | None = None,
        use_maintained: bool = True,
        rerank: dict[str, float] | None = None,
    ) -> None:
        self.overrides = overrides
        self.shipped = shipped
        self.multipliers = multipliers
        self.guardrails = guardrails
        # Rerank models: USD per 1,000 queries (genai-prices has no per-query prices).
        self.rerank = rerank or {}
        self.fallback = fallback
        self._use_maintained = use_maintained
        self._found: dict[str, tuple[Price, float] | None] = {}
        if use_maintained:
            # Loaded now, at startup, not on the first request: its ~40,000 objects then
            # join the heap that ``serve`` freezes out of garbage collection, instead of
            # lengthening every full collection (a stall for every open stream).
            from genai_prices import data_snapshot

            data_snapshot.get_snapshot()
        self.unpriced: Counter[str] = Counter()

    @classmethod
    def load(
        cls,
        extra_file: str | None = None,
        overrides: dict[str, Any] | None = None,
        fallback: dict[str, Any] | None = None,
        use_maintained: bool = True,
    ) -> PriceTable:
        data = json.loads(resources.files("proxy").joinpath("data/prices.json").read_text())
        shipped = {m: _price(m, spec, "shipped") for m, spec in data.get("models", {}).items()}
        multipliers = {k: float(v) for k, v in data.get("profile_multipliers", {}).items()}
        guardrails = {k: float(v) for k, v in data.get("guardrails", {}).items()}
        rerank = {k: float(v) for k, v in data.get("rerank", {}).items()}
        operator: dict[str, Price] = {}
        layers: list[tuple[str, dict[str, Any]]] = []
        if extra_file:
            with open(extra_file, encoding="utf-8") as fh:
                layers.append(("prices_file", json.load(fh)))
        if overrides:
            layers.append(("config", {"models": overrides}))
        for source, layer in layers:
            for model, spec in layer.get("models", {}).items():
                operator[model] = _price(model, spec, source)
            multipliers.update(
                {k: float(v) for k, v in layer.get("profile_multipliers", {}).items()}
            )
            guardrails.update({k: float(v) for k, v in layer.get("guardrails", {}).items()})
            rerank.update({k: float(v) for k, v in layer.get("rerank", {}).items()})
        fallback_price = _price("unpriced_model_price", fallback, "fallback") if fallback else None
        return cls(
            operator, shipped, multipliers, guardrails, fallback_price, use_maintained, rerank
        )

    def query_price(self, model: str | None) -> float | None:
        """USD per 1,000 Rerank queries of a model id or its foundation-model ARN."""
        if not model:
            return None
        return self.rerank.get(arn_model_id(model) or model)

    def price_for(self, model_id: str) -> tuple[Price, float] | None:
        """The price of a model id, ARN or inference profile, and the multiplier to apply
        (a shipped or operator price of the base model, for a cross-region profile)."""
        try:
            return self._found[model_id]
        except KeyError:
            pass
        found = self._lookup(model_id)
        if len(self._found) >= _CACHE_MAX:  # model ids come from authenticated requests
            self._found.clear()
        self._found[model_id] = found
        return found

    def _lookup(self, model_id: str) -> tuple[Price, float] | None:
        model = model_id
        if model.startswith("arn:"):
            named = arn_model_id(model_id)
            if named is None:  # known only by a lookup (see access.modelrefs), or by its ARN
                return _exact(self.overrides, model_id, self.multipliers)
            model = named
        found = _exact(self.overrides, model_id, self.multipliers) or _exact(
            self.overrides, model, self.multipliers
        )
        if found is not None:
            return found
        if self._use_maintained:
            maintained = _maintained(model) or _maintained(_versioned(model) or "")
            if maintained is not None:
                return maintained, 1.0
        return _exact(self.shipped, model, self.multipliers)

    def cost(self, model: str | None, usage: Usage, succeeded: bool) -> float | None:
        if usage.free:
            return 0.0
        if usage.guardrail_units:
            return (
                sum(n * self.guardrails.get(k, 0.0) for k, n in usage.guardrail_units.items())
                / 1000
            )
        if not usage.found:
            # AWS does not bill a refused or failed call; a success without usage is unknown.
            return None if succeeded else 0.0
        if usage.queries:
            per_thousand = self.query_price(model)
            return None if per_thousand is None else usage.queries * per_thousand / 1000
        found = self.price_for(model) if model else None
        if found is None:
            self.unpriced[model or "(none)"] += 1
            if self.unpriced[model or "(none)"] == 1:
                log.warning("no price for model %s: its requests get a null cost", model)
            if self.fallback is None:
                return None
            found = (self.fallback, 1.0)
        price, multiplier = found
        return tokens_cost(price, usage, multiplier)


def tokens_cost(price: Price, usage: Usage, multiplier: float = 1.0) -> float:
    if price.exact is not None:
        return round(float(_exact_cost(price.exact, usage)) * multiplier, 10)
    cost = (
        usage.input_tokens * price.input
        + usage.output_tokens * price.output
        + usage.cache_read_tokens
        * (price.cache_read if price.cache_read is not None else price.input)
        + usage.cache_write_tokens
        * (price.cache_write if price.cache_write is not None else price.input)
    )
    if usage.cache_write_1h_tokens:
        # An hour's cache write costs twice the input price, where a 5-minute write
        # (``cache_write``) costs 1.25 times it
        # (https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching#pricing).
        extra = 2 * price.input - (
            price.cache_write if price.cache_write is not None else price.input
        )
        cost += usage.cache_write_1h_tokens * extra
    return round(cost * multiplier / 1000, 10)


def _exact(
    table: dict[str, Price], model: str, multipliers: dict[str, float]
) -> tuple[Price, float] | None:
    price = table.get(model)
    if price is not None:
        return price, 1.0
    prefix, base = split_profile(model)
    if prefix is not None:
        price = table.get(base)
        if price is not None:
            return price, multipliers.get(prefix, 1.0)
    return None


def _versioned(model: str) -> str | None:
    """The versioned Bedrock id of a model named without its version, as bedrock-mantle
    names them (``openai.gpt-oss-120b`` for ``openai.gpt-oss-120b-1:0``,
    ``anthropic.claude-haiku-4-5`` for ``anthropic.claude-haiku-4-5-20251001-v1:0``), in
    its in-region form; the latest when there are several."""
    if not model or ":" in model:
        return None
    from genai_prices import data_snapshot

    pattern = re.compile(
        r"(?:regional\.)?" + re.escape(model) + r"(?:-\d{8})?(?:-v\d+)?(?:-\d+)?:\d+"
    )
    provider = next((p for p in data_snapshot.get_snapshot().providers if p.id == "aws"), None)
    found = sorted(m.id for m in (provider.models if provider else ()) if pattern.fullmatch(m.id))
    return found[-1].removeprefix("regional.") if found else None


def _maintained(model: str) -> Price | None:
    """The price genai-prices knows for a Bedrock model id or profile, if any.

    Its own ``calc_price`` takes ~130 us a call (a model search, then Decimal arithmetic):
    a third of the proxy's CPU per request. The search runs once per model here, and
    linear prices are applied as floats; tiered ones go back to genai-prices.
    """
    from genai_prices import Usage as GenaiUsage
    from genai_prices import calc_price

    try:
        found = calc_price(GenaiUsage(input_tokens=0), model_ref=model, provider_id="aws")
    except LookupError:
        return None
    prices = found.model_price
    linear = [
        prices.input_mtok,
        prices.output_mtok,
        prices.cache_read_mtok,
        prices.cache_write_mtok,
    ]
    values: list[float | None] = []
    for p in linear:
        if p is not None and not isinstance(p, int | float | Decimal):
            break  # tiered: priced by genai-prices' own arithmetic (below)
        values.append(None if p is None else float(p) / 1000)
    else:
        return Price(
            input=values[0] or 0.0,
            output=values[1] or 0.0,
            cache_read=values[2],
            cache_write=values[3],
            source=f"genai-prices ({found.model.id})",
        )
    return Price(0.0, 0.0, source=f"genai-prices ({found.model.id}, tiered)", exact=prices)


def _exact_cost(prices: Any, usage: Usage) -> Decimal:
    from genai_prices import Usage as GenaiUsage

    # genai-prices counts cached tokens inside input_tokens; Bedrock reports them apart.
    result = prices.calc_price(
        GenaiUsage(
            input_tokens=usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
        )
    )
    return Decimal(result["total_price"])


def _price(model: str, spec: Any, source: str) -> Price:
    try:
        return Price(
            input=float(spec["input"]),
            output=float(spec.get("output", 0.0)),
            cache_read=float(spec["cache_read"]) if "cache_read" in spec else None,
            cache_write=float(spec["cache_write"]) if "cache_write" in spec else None,
            source=source,
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError(
            f"price for {model} needs numeric input (and output) per 1K tokens"
        ) from None
