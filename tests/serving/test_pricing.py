"""Money: exact, one rounding rule, prices from the pricing file."""

from __future__ import annotations

from decimal import Decimal

import pytest

from serving import pricing
from serving.settings import DEFAULT_PRICING


def price(inp: str, out: str) -> pricing.Price:
    return pricing.Price("m", "USD", Decimal(inp), Decimal(out))


def test_brief_example_costs_exactly_0_003():
    c = pricing.cost(price("0.002", "0.002"), input_tokens=1000, output_tokens=500)
    assert (c.input_micro, c.output_micro, c.total_micro) == (2000, 1000, 3000)
    assert pricing.micro_to_str(c.total_micro) == "0.003000"
    assert Decimal(pricing.micro_to_str(c.total_micro)) == Decimal("0.003")


def test_rounding_is_half_up_to_a_micro_usd_per_side():
    p = price("0.002", "0.0015")
    # 1 token at $0.002/1K = 2 micro exactly; 1 token at $0.0015/1K = 1.5 -> 2 (half up)
    assert pricing.cost(p, 1, 1) == pricing.Cost(2, 2)
    # 3 tokens at $0.0001/1K = 0.3 micro -> 0; 5 tokens = 0.5 -> 1
    q = price("0.0001", "0.0001")
    assert pricing.cost(q, 3, 5) == pricing.Cost(0, 1)
    # each side rounds on its own, then they add
    assert pricing.cost(q, 5, 5).total_micro == 2


def test_amounts_are_integers_not_floats():
    c = pricing.cost(price("0.002", "0.002"), 7, 9)
    assert isinstance(c.input_micro, int) and isinstance(c.output_micro, int)


def test_default_pricing_file_prices_the_smoke_model():
    p = pricing.price_for(DEFAULT_PRICING, "sentiment")
    assert p.input_per_1k == Decimal("0.002") and p.currency == "USD"


def test_float_prices_and_unknown_models_are_refused(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("currency: USD\nmodels:\n  m:\n    input_per_1k: 0.002\n    output_per_1k: '1'\n")
    with pytest.raises(pricing.PricingError, match="quoted strings"):
        pricing.load_prices(f)
    f.write_text("models:\n  m: {input_per_1k: '1', output_per_1k: '1'}\n")
    with pytest.raises(pricing.PricingError, match="no price for model 'x'"):
        pricing.price_for(f, "x")


def test_usd_to_micro():
    assert pricing.usd_to_micro("1.5") == 1_500_000
    assert pricing.usd_to_micro("0.000220") == 220
    with pytest.raises(pricing.PricingError):
        pricing.usd_to_micro("0.0000001")
    with pytest.raises(pricing.PricingError):
        pricing.usd_to_micro("-1")
