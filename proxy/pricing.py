"""Cost from usage: a price table shipped as data (``data/prices.json``, with its source and
date), extended or overridden in config. A model without a price keeps its tokens and gets
a null cost — never a silent zero — and is counted so the gap shows."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .policy import PROFILE_PREFIXES
from .usage import Usage

log = logging.getLogger("bedrock_proxy.pricing")


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1,000 tokens."""

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None


class PriceTable:
    def __init__(
        self,
        models: dict[str, Price],
        multipliers: dict[str, float],
        guardrails: dict[str, float],
        source: str = "",
        as_of: str = "",
    ) -> None:
        self.models = models
        self.multipliers = multipliers
        self.guardrails = guardrails
        self.source = source
        self.as_of = as_of
        self.unpriced: Counter[str] = Counter()

    @classmethod
    def load(
        cls, extra_file: str | None = None, overrides: dict[str, Any] | None = None
    ) -> PriceTable:
        data = json.loads(resources.files("proxy").joinpath("data/prices.json").read_text())
        layers = [data]
        if extra_file:
            with open(extra_file, encoding="utf-8") as fh:
                layers.append(json.load(fh))
        if overrides:
            layers.append({"models": overrides})
        models: dict[str, Price] = {}
        multipliers: dict[str, float] = {}
        guardrails: dict[str, float] = {}
        for layer in layers:
            for model, spec in layer.get("models", {}).items():
                models[model] = _price(model, spec)
            multipliers.update(
                {k: float(v) for k, v in layer.get("profile_multipliers", {}).items()}
            )
            guardrails.update({k: float(v) for k, v in layer.get("guardrails", {}).items()})
        return cls(models, multipliers, guardrails, data.get("_source", ""), data.get("_as_of", ""))

    def price_for(self, model_id: str) -> tuple[Price, float] | None:
        """The price of a model id, ARN or inference profile, with the profile's multiplier."""
        price = self.models.get(model_id)
        if price is not None:
            return price, 1.0
        model = model_id
        if model.startswith("arn:"):
            kind, _, resource_id = model.split(":", 5)[-1].partition("/")
            if kind not in ("foundation-model", "inference-profile"):
                return None
            model = resource_id
            price = self.models.get(model)
            if price is not None:
                return price, 1.0
        for prefix in PROFILE_PREFIXES:
            if model.startswith(prefix):
                price = self.models.get(model[len(prefix) :])
                if price is not None:
                    return price, self.multipliers.get(prefix, 1.0)
                break
        return None

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
        found = self.price_for(model) if model else None
        if found is None:
            self.unpriced[model or "(none)"] += 1
            if self.unpriced[model or "(none)"] == 1:
                log.warning("no price for model %s: its requests get a null cost", model)
            return None
        price, multiplier = found
        cost = (
            usage.input_tokens * price.input
            + usage.output_tokens * price.output
            + usage.cache_read_tokens
            * (price.cache_read if price.cache_read is not None else price.input)
            + usage.cache_write_tokens
            * (price.cache_write if price.cache_write is not None else price.input)
        )
        return round(cost * multiplier / 1000, 10)


def _price(model: str, spec: Any) -> Price:
    try:
        return Price(
            input=float(spec["input"]),
            output=float(spec.get("output", 0.0)),
            cache_read=float(spec["cache_read"]) if "cache_read" in spec else None,
            cache_write=float(spec["cache_write"]) if "cache_write" in spec else None,
        )
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"price for {model} needs numeric input (and output) per 1K tokens"
        ) from None
