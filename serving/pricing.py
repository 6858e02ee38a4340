"""Prices per model from the pricing file, and the one rounding rule that turns tokens into money.

Amounts are integer micro-USD (1 USD = 1,000,000) or Decimal; a float never touches money.
This module knows nothing about requests, keys or the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

MICRO = Decimal("0.000001")
MICRO_PER_UNIT = 1_000_000


class PricingError(ValueError):
    """The pricing file is missing, malformed, or has no price for a model."""


STANDARD, LONG_CONTEXT = "standard", "long_context"
TIERS = (STANDARD, LONG_CONTEXT)


@dataclass(frozen=True)
class Price:
    model: str
    currency: str
    input_per_1k: Decimal
    output_per_1k: Decimal
    # The context-length tier: a request with more input tokens than `long_context_above` is
    # priced, the whole request, at the long-context rates. None: one rate for every length.
    long_context_above: Optional[int] = None
    long_input_per_1k: Optional[Decimal] = None
    long_output_per_1k: Optional[Decimal] = None

    def tier(self, input_tokens: int) -> str:
        above = self.long_context_above
        return LONG_CONTEXT if above is not None and input_tokens > above else STANDARD

    def rates(self, tier: str) -> Tuple[Decimal, Decimal]:
        """(input, output) USD per 1K tokens of a tier."""
        if tier == LONG_CONTEXT and self.long_input_per_1k is not None \
                and self.long_output_per_1k is not None:
            return self.long_input_per_1k, self.long_output_per_1k
        return self.input_per_1k, self.output_per_1k


@dataclass(frozen=True)
class Cost:
    input_micro: int
    output_micro: int
    tier: str = STANDARD

    @property
    def total_micro(self) -> int:
        return self.input_micro + self.output_micro


def side_cost_micro(tokens: int, price_per_1k: Decimal) -> int:
    """The rounding rule: tokens * price / 1000, half-up to a whole micro-USD, per side."""
    amount = Decimal(tokens) * price_per_1k / Decimal(1000)
    return int((amount / MICRO).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def cost(price: Price, input_tokens: int, output_tokens: int) -> Cost:
    """What a request costs: its tier from its input tokens, then the rounding rule per side
    at that tier's rates."""
    tier = price.tier(input_tokens)
    input_rate, output_rate = price.rates(tier)
    return Cost(side_cost_micro(input_tokens, input_rate),
                side_cost_micro(output_tokens, output_rate), tier)


def micro_to_str(micro: int) -> str:
    """Micro-USD as a decimal string with six places, e.g. 3000 -> "0.003000"."""
    return str((Decimal(micro) * MICRO).quantize(MICRO))


def usd_to_micro(value: str) -> int:
    """A decimal USD string ("1.50") as micro-USD; more than six places is an error."""
    try:
        d = Decimal(str(value))
    except InvalidOperation as exc:
        raise PricingError(f"not a decimal amount: {value!r}") from exc
    if not d.is_finite():
        raise PricingError(f"amount must be a finite number of USD, e.g. 5.00: {value!r}")
    micro = d / MICRO
    if micro != micro.to_integral_value() or d < 0:
        raise PricingError(f"amount must be >= 0 with at most 6 decimal places: {value!r}")
    return int(micro)


def _decimal(v, where: str) -> Decimal:
    if isinstance(v, float):
        # YAML 0.002 is a float: refuse it rather than inherit binary rounding.
        raise PricingError(f"{where}: write prices as quoted strings, e.g. \"0.002\" (got {v!r})")
    try:
        d = Decimal(str(v))
    except InvalidOperation as exc:
        raise PricingError(f"{where}: not a decimal: {v!r}") from exc
    if not d.is_finite():
        raise PricingError(f"{where}: a price must be a finite decimal, e.g. \"0.002\": {v!r}")
    if d < 0:
        raise PricingError(f"{where}: negative price {v!r}")
    return d


def load_prices(path: Path) -> Dict[str, Price]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PricingError(f"cannot read pricing file {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise PricingError(f"{path}: expected a mapping with `currency` and `models`")
    currency = str(data.get("currency", "USD"))
    prices = {}
    for name, p in data["models"].items():
        if not isinstance(p, dict):
            raise PricingError(f"{path}: models.{name}: expected input_per_1k and output_per_1k")
        where = f"{path}: models.{name}"
        prices[str(name)] = Price(
            model=str(name), currency=currency,
            input_per_1k=_decimal(p.get("input_per_1k"), f"{where}.input_per_1k"),
            output_per_1k=_decimal(p.get("output_per_1k"), f"{where}.output_per_1k"),
            **_long_context(p.get("long_context"), f"{where}.long_context"))
    return prices


def _long_context(spec: Any, where: str) -> Dict[str, Any]:
    """The optional context-length tier of one model's price."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise PricingError(f"{where}: expected above_input_tokens, input_per_1k, output_per_1k")
    above = spec.get("above_input_tokens")
    if not isinstance(above, int) or isinstance(above, bool) or above < 1:
        raise PricingError(f"{where}.above_input_tokens: a whole number of tokens >= 1 "
                           f"(got {above!r})")
    return {"long_context_above": above,
            "long_input_per_1k": _decimal(spec.get("input_per_1k"), f"{where}.input_per_1k"),
            "long_output_per_1k": _decimal(spec.get("output_per_1k"), f"{where}.output_per_1k")}


def monthly_minimum_micro(path: Path) -> int:
    """The optional `monthly_minimum_usd` of the pricing file (0 when absent): what a user's
    invoice totals at least, a true-up line making up the difference."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PricingError(f"cannot read pricing file {path}: {exc}") from exc
    value = data.get("monthly_minimum_usd") if isinstance(data, dict) else None
    if value is None:
        return 0
    return usd_to_micro(str(_decimal(value, f"{path}: monthly_minimum_usd")))


def currency_of(path: Path) -> str:
    prices = load_prices(path)
    return next(iter(prices.values())).currency if prices else "USD"


def price_for(path: Path, model: str) -> Price:
    prices = load_prices(path)
    if model not in prices:
        raise PricingError(f"{path}: no price for model {model!r} (have: {sorted(prices)})")
    return prices[model]
