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


# (tokens, price per 1K as written in the pricing file, exact micro-USD worked out by hand)
KNOWN = [
    (1, "0.0025", 3),  # 2.5 micro: half-up gives 3 (half-even, Python's round(), gives 2)
    (1, "0.0045", 5),  # 4.5 micro: in floats 0.0045 / 1000 * 1e6 is 4.4999999..., -> 4
    (3, "0.0025", 8),  # 7.5 micro: in floats 7.4999999...
    (11, "0.0215", 237),  # 236.5 micro: in floats 236.49999999999997
    (1, "0.0004999", 0),  # 0.4999 micro: below the half, down
    (7, "0.00015", 1),  # 1.05 micro
    (0, "0.002", 0),
    # 2**53 + 1 micro: an integer a float cannot hold (it would come back as 2**53)
    (9_007_199_254_740_993, "0.001", 9_007_199_254_740_993),
]


@pytest.mark.parametrize("tokens,per_1k,micro", KNOWN, ids=[f"{t}x{p}" for t, p, _ in KNOWN])
def test_exact_micro_usd_for_known_inputs(tokens, per_1k, micro):
    c = pricing.cost(price(per_1k, "0"), tokens, 0)
    assert (c.input_micro, c.output_micro, c.total_micro) == (micro, 0, micro)
    assert str(c.total_micro) == str(micro)  # an int, not 5.0 or Decimal('5')


def test_six_decimal_strings_are_exact():
    assert pricing.micro_to_str(0) == "0.000000"
    assert pricing.micro_to_str(1) == "0.000001"
    assert pricing.micro_to_str(1_234_567) == "1.234567"
    assert pricing.micro_to_str(9_007_199_254_740_993) == "9007199254.740993"


def test_a_float_price_never_reaches_the_arithmetic(tmp_path):
    # A float that slipped past the pricing file's check is refused, not silently rounded.
    with pytest.raises(TypeError):
        pricing.cost(pricing.Price("m", "USD", 0.0045, Decimal("0")), 1, 0)  # type: ignore
    f = tmp_path / "p.yaml"
    f.write_text("currency: USD\nmodels:\n  m: {input_per_1k: '0.0045', output_per_1k: '0.0025'}\n")
    p = pricing.price_for(f, "m")
    assert (p.input_per_1k, p.output_per_1k) == (Decimal("0.0045"), Decimal("0.0025"))
    assert pricing.cost(p, 1, 3) == pricing.Cost(5, 8)  # the quoted strings, read exactly


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


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "sNaN"])
def test_non_finite_amounts_and_prices_are_refused(value, tmp_path):
    with pytest.raises(pricing.PricingError, match="finite"):
        pricing.usd_to_micro(value)
    f = tmp_path / "p.yaml"
    f.write_text(f"models:\n  m: {{input_per_1k: '{value}', output_per_1k: '1'}}\n")
    with pytest.raises(pricing.PricingError, match="finite"):
        pricing.load_prices(f)


LONG = ("currency: USD\nmodels:\n  m:\n    input_per_1k: '0.002'\n    output_per_1k: '0.004'\n"
        "    long_context:\n      above_input_tokens: 100\n      input_per_1k: '0.003'\n"
        "      output_per_1k: '0.006'\n")


# Amounts by hand, at the tier edge (above_input_tokens: 100):
#   100 in at 0.002/1K = 0.000200 -> 200 micro; 7 out at 0.004/1K = 0.000028 -> 28 micro
#   101 in at 0.003/1K = 0.000303 -> 303 micro; 7 out at 0.006/1K = 0.000042 -> 42 micro
#   the whole request moves to the long-context rates, its output included
#   1 in at 0.002/1K = 0.000002 -> 2; 1 out at 0.004/1K = 0.000004 -> 4
#   333 in at 0.003/1K = 0.000999 -> 999; 83 out at 0.006/1K = 0.000498 -> 498
#   250 in at 0.003/1K = 0.00075 -> 750; 1 out at 0.006/1K = 0.000006 -> 6
@pytest.mark.parametrize("n_in, n_out, tier, in_micro, out_micro", [
    (100, 7, "standard", 200, 28),
    (101, 7, "long_context", 303, 42),
    (1, 1, "standard", 2, 4),
    (333, 83, "long_context", 999, 498),
    (250, 1, "long_context", 750, 6),
])
def test_the_context_length_tier_prices_the_whole_request(tmp_path, n_in, n_out, tier,
                                                          in_micro, out_micro):
    f = tmp_path / "p.yaml"
    f.write_text(LONG)
    c = pricing.cost(pricing.price_for(f, "m"), n_in, n_out)
    assert (c.tier, c.input_micro, c.output_micro) == (tier, in_micro, out_micro)


def test_a_price_file_without_tiers_prices_every_length_alike(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("models:\n  m: {input_per_1k: '0.002', output_per_1k: '0.004'}\n")
    assert pricing.cost(pricing.price_for(f, "m"), 10_000, 1) == pricing.Cost(20_000, 4)


COMPOSITE = LONG + """    volume_tiers:
      - {from_tokens: 1000, input_per_1k: '0.0015', output_per_1k: '0.003'}
      - {from_tokens: 5000, name: bulk, input_per_1k: '0.001', output_per_1k: '0.002'}
    priority_surcharge: {input_per_1k: '0.0005', output_per_1k: '0.001'}
"""


# Amounts by hand. Rates per 1K (input / output): standard 0.002 / 0.004; volume_1 (the user
# was billed >= 1000 tokens earlier this month) 0.0015 / 0.003; bulk (>= 5000) 0.001 / 0.002;
# long context (> 100 input tokens, whatever the month) 0.003 / 0.006; priority adds
# 0.0005 / 0.001 to whichever applies.
#   10 in x 0.002 = 0.000020 -> 20; 2 out x 0.004 = 0.000008 -> 8
#   10 x 0.0015 = 0.000015 -> 15; 2 x 0.003 = 0.000006 -> 6
#   10 x 0.001 = 10; 2 x 0.002 = 4;  with priority 10 x 0.0015 = 15, 2 x 0.003 = 6
#   100 x 0.001 = 100 (100 is not above the long-context edge); 2 x 0.002 = 4
#   101 x 0.003 = 303; 2 x 0.006 = 12 (long context wins over bulk)
#   101 x 0.0035 = 353.5 -> 354 (half up); 2 x 0.007 = 14
#   3 x 0.0015 = 4.5 -> 5; 1 x 0.003 = 3
#   1 x 0.0025 = 2.5 -> 3; 1 x 0.005 = 5
@pytest.mark.parametrize("n_in, n_out, month, priority, tier, in_micro, out_micro", [
    (10, 2, 0, False, "standard", 20, 8),
    (10, 2, 999, False, "standard", 20, 8),
    (10, 2, 1000, False, "volume_1", 15, 6),
    (10, 2, 4999, False, "volume_1", 15, 6),
    (10, 2, 5000, False, "bulk", 10, 4),
    (10, 2, 10 ** 12, False, "bulk", 10, 4),
    (10, 2, 5000, True, "bulk+priority", 15, 6),
    (100, 2, 5000, False, "bulk", 100, 4),
    (101, 2, 5000, False, "long_context", 303, 12),
    (101, 2, 0, True, "long_context+priority", 354, 14),
    (3, 1, 1000, False, "volume_1", 5, 3),
    (1, 1, 0, True, "standard+priority", 3, 5),
])
def test_composite_prices_at_every_tier_edge(tmp_path, n_in, n_out, month, priority, tier,
                                             in_micro, out_micro):
    f = tmp_path / "p.yaml"
    f.write_text(COMPOSITE)
    c = pricing.cost(pricing.price_for(f, "m"), n_in, n_out, month, priority)
    assert (c.tier, c.input_micro, c.output_micro) == (tier, in_micro, out_micro)


def test_the_rates_charged_are_the_tier_s_plus_the_surcharge(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(COMPOSITE)
    c = pricing.cost(pricing.price_for(f, "m"), 10, 2, 1000, priority=True)
    assert (c.input_per_1k, c.output_per_1k) == (Decimal("0.0020"), Decimal("0.004"))


def test_priority_on_a_model_without_a_priority_tier_is_an_error(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(LONG)
    p = pricing.price_for(f, "m")
    assert not p.has_priority and not p.by_volume
    with pytest.raises(pricing.PricingError, match="no priority tier"):
        pricing.cost(p, 1, 1, priority=True)
    # Without volume tiers the month changes nothing.
    assert pricing.cost(p, 10, 2, 10 ** 9) == pricing.cost(p, 10, 2, 0) == pricing.Cost(20, 8)


@pytest.mark.parametrize("section, spec, says", [
    ("long_context", "{above_input_tokens: 0, input_per_1k: '1', output_per_1k: '1'}",
     "above_input_tokens"),
    ("long_context", "{above_input_tokens: '5', input_per_1k: '1', output_per_1k: '1'}",
     "above_input_tokens"),
    ("long_context", "{above_input_tokens: 5, input_per_1k: 0.003, output_per_1k: '1'}",
     "quoted strings"),
    ("long_context", "{above_input_tokens: 5, output_per_1k: '1'}",
     "long_context.input_per_1k: missing"),
    ("volume_tiers", "[{from_tokens: 0, input_per_1k: '1', output_per_1k: '1'}]",
     "from_tokens"),
    ("volume_tiers", "[{from_tokens: 10, input_per_1k: '1', output_per_1k: '1'},"
                     " {from_tokens: 10, input_per_1k: '1', output_per_1k: '1'}]", "ascending"),
    ("volume_tiers", "[{from_tokens: 10, name: standard, input_per_1k: '1',"
                     " output_per_1k: '1'}]", "name"),
    ("volume_tiers", "[{from_tokens: 10, name: 'Big Tier', input_per_1k: '1',"
                     " output_per_1k: '1'}]", "name"),
    ("volume_tiers", "[{from_tokens: 10, input_per_1k: 0.5, output_per_1k: '1'}]",
     "quoted strings"),
    ("volume_tiers", "[]", "a list"),
    ("volume_tiers", "{from_tokens: 10}", "a list"),
    ("priority_surcharge", "{input_per_1k: '0.001'}", "priority_surcharge.output_per_1k"),
    ("priority_surcharge", "'0.001'", "expected input_per_1k and output_per_1k"),
])
def test_a_malformed_tier_is_refused_with_what_to_fix(tmp_path, section, spec, says):
    f = tmp_path / "p.yaml"
    f.write_text(f"models:\n  m:\n    input_per_1k: '1'\n    output_per_1k: '1'\n"
                 f"    {section}: {spec}\n")
    with pytest.raises(pricing.PricingError, match=says):
        pricing.load_prices(f)
