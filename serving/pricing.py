"""Prices per model from the pricing file, and the one rounding rule that turns tokens into money.

Amounts are integer micro-USD (1 USD = 1,000,000) or Decimal; a float never touches money.
This module knows nothing about requests, keys or the ledger.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

MICRO = Decimal("0.000001")
MICRO_PER_UNIT = 1_000_000


class PricingError(ValueError):
    """The pricing file is missing, malformed, or has no price for a model."""


STANDARD, LONG_CONTEXT, PRIORITY = "standard", "long_context", "priority"
# Tier names a price file may not give a volume tier: they already mean something.
RESERVED_TIERS = (STANDARD, LONG_CONTEXT, PRIORITY)


@dataclass(frozen=True)
class VolumeTier:
    """Rates for a user's tokens past `from_tokens` in a month (all keys, all models)."""

    name: str
    from_tokens: int
    input_per_1k: Decimal
    output_per_1k: Decimal


@dataclass(frozen=True)
class Price:
    """One model's price. The tier of a request, in order:

    1. context length: more input tokens than `long_context_above` -> the long-context rates,
       for the whole request (volume tiers do not apply to it);
    2. else volume: the user's tokens billed earlier in the month pick the last volume tier
       whose `from_tokens` they have reached (graduated by request: the whole request is priced
       at that tier; the request that crosses an edge is the last one below it);
    3. else the standard rates;
    then the priority surcharge is added to both rates when the request asked for priority.
    """

    model: str
    currency: str
    input_per_1k: Decimal
    output_per_1k: Decimal
    # The context-length tier: a request with more input tokens than `long_context_above` is
    # priced, the whole request, at the long-context rates. None: one rate for every length.
    long_context_above: Optional[int] = None
    long_input_per_1k: Optional[Decimal] = None
    long_output_per_1k: Optional[Decimal] = None
    volume_tiers: Tuple[VolumeTier, ...] = ()  # ascending from_tokens
    # Added to both rates of a request sent with priority; None: this model has no priority.
    priority_input_per_1k: Optional[Decimal] = None
    priority_output_per_1k: Optional[Decimal] = None

    @property
    def has_priority(self) -> bool:
        return self.priority_input_per_1k is not None

    @property
    def by_volume(self) -> bool:
        """Whether a request's price depends on what its user was billed earlier this month."""
        return bool(self.volume_tiers)

    def base(self, input_tokens: int, month_tokens: int = 0) -> Tuple[str, Decimal, Decimal]:
        """(tier, input rate, output rate) per 1K tokens before any priority surcharge."""
        above = self.long_context_above
        if above is not None and input_tokens > above and self.long_input_per_1k is not None \
                and self.long_output_per_1k is not None:
            return LONG_CONTEXT, self.long_input_per_1k, self.long_output_per_1k
        tier = (STANDARD, self.input_per_1k, self.output_per_1k)
        for v in self.volume_tiers:
            if month_tokens >= v.from_tokens:
                tier = (v.name, v.input_per_1k, v.output_per_1k)
        return tier


@dataclass(frozen=True)
class Cost:
    input_micro: int
    output_micro: int
    tier: str = STANDARD
    # The rates charged (USD per 1K tokens), kept on the ledger row; not part of equality.
    input_per_1k: Optional[Decimal] = field(default=None, compare=False)
    output_per_1k: Optional[Decimal] = field(default=None, compare=False)

    @property
    def total_micro(self) -> int:
        return self.input_micro + self.output_micro


def side_cost_micro(tokens: int, price_per_1k: Decimal) -> int:
    """The rounding rule: tokens * price / 1000, half-up to a whole micro-USD, per side."""
    amount = Decimal(tokens) * price_per_1k / Decimal(1000)
    return int((amount / MICRO).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def cost(price: Price, input_tokens: int, output_tokens: int, month_tokens: int = 0,
         priority: bool = False) -> Cost:
    """What a request costs: its tier (see Price), that tier's rates plus the priority
    surcharge when asked for, then the rounding rule per side. `month_tokens`: what its user
    was billed earlier in the month, which only volume tiers read."""
    tier, input_rate, output_rate = price.base(input_tokens, month_tokens)
    if priority:
        if price.priority_input_per_1k is None or price.priority_output_per_1k is None:
            raise PricingError(f"model {price.model!r} has no priority tier")
        tier = f"{tier}+{PRIORITY}"
        input_rate += price.priority_input_per_1k
        output_rate += price.priority_output_per_1k
    return Cost(side_cost_micro(input_tokens, input_rate),
                side_cost_micro(output_tokens, output_rate), tier, input_rate, output_rate)


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
    if v is None:
        raise PricingError(f"{where}: missing; write the price as a quoted string, e.g. \"0.002\"")
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
            **_long_context(p.get("long_context"), f"{where}.long_context"),
            **_priority(p.get("priority_surcharge"), f"{where}.priority_surcharge"),
            volume_tiers=_volume_tiers(p.get("volume_tiers"), f"{where}.volume_tiers"))
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


def _priority(spec: Any, where: str) -> Dict[str, Any]:
    """The optional priority surcharge of one model's price, added to both rates."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise PricingError(f"{where}: expected input_per_1k and output_per_1k")
    return {"priority_input_per_1k": _decimal(spec.get("input_per_1k"), f"{where}.input_per_1k"),
            "priority_output_per_1k": _decimal(spec.get("output_per_1k"),
                                               f"{where}.output_per_1k")}


def _volume_tiers(spec: Any, where: str) -> Tuple[VolumeTier, ...]:
    """The optional volume tiers of one model's price: a list in ascending `from_tokens`."""
    if spec is None:
        return ()
    if not isinstance(spec, list) or not spec:
        raise PricingError(f"{where}: expected a list of {{from_tokens, input_per_1k, "
                           f"output_per_1k}}")
    tiers: List[VolumeTier] = []
    for i, t in enumerate(spec):
        at = f"{where}[{i}]"
        if not isinstance(t, dict):
            raise PricingError(f"{at}: expected from_tokens, input_per_1k, output_per_1k")
        start = t.get("from_tokens")
        if not isinstance(start, int) or isinstance(start, bool) or start < 1:
            raise PricingError(f"{at}.from_tokens: a whole number of tokens >= 1 (got {start!r})")
        if tiers and start <= tiers[-1].from_tokens:
            raise PricingError(f"{at}.from_tokens: tiers must be in ascending from_tokens "
                               f"({start} after {tiers[-1].from_tokens})")
        name = str(t.get("name", f"volume_{i + 1}"))
        if name in RESERVED_TIERS or not re.fullmatch(r"[a-z0-9_]{1,32}", name) \
                or name in {v.name for v in tiers}:
            raise PricingError(f"{at}.name: 1-32 of a-z, 0-9 and _, unique, and not one of "
                               f"{RESERVED_TIERS} (got {name!r})")
        tiers.append(VolumeTier(name, start, _decimal(t.get("input_per_1k"), f"{at}.input_per_1k"),
                                _decimal(t.get("output_per_1k"), f"{at}.output_per_1k")))
    return tuple(tiers)


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
