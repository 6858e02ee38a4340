"""The behavioural checks (pipeline/behaviour.py) on predictors whose behaviour is known:
a lexicon that reads sentiment words passes them, a predictor that counts characters
fails invariance, and a constant one fails the directional pairs. The cases file is
checked for what the checks assume of it."""

from __future__ import annotations

from typing import List

import numpy as np

from pipeline.behaviour import (
    PERTURBATIONS,
    check,
    end_mark,
    load_cases,
    other_width,
    spaced,
)

LABELS = ["negative", "positive"]
GOOD = ("好", "干净", "满意", "喜欢", "推荐", "快", "精彩", "清晰", "高", "值得", "安静", "优美",
        "热情", "丰富", "方便", "耐用", "宽敞", "爱看", "周到", "不错", "好看")
BAD = ("差", "脏", "不值得", "不推荐", "不满意", "不处理", "讨厌", "失望", "无聊", "慢", "模糊",
       "低", "吵", "坏", "难", "恶劣", "空洞", "浪费", "异味", "噪音", "错", "严重", "坏点")
TEST_TEXTS = ["房间很好，早餐不错!", "服务差，不推荐。", "这本书(第二版)很精彩：推荐", "太吵了"]


def lexicon(texts: List[str]) -> np.ndarray:
    """P(positive) from counted sentiment words: a model that reads words, not layout."""
    score = np.array([sum(t.count(w) for w in GOOD) - 2 * sum(t.count(w) for w in BAD)
                      for t in texts], dtype=float)
    pos = 1 / (1 + np.exp(-score))
    return np.stack([1 - pos, pos], axis=1)


def test_the_perturbations():
    assert spaced("好，很好!") == "好 ， 很好 !"
    assert other_width("好,很好!（真的）") == "好，很好！(真的)"
    assert other_width(other_width("好，很好!")) == "好，很好!"
    assert end_mark("很好。") == "很好！" and end_mark("很好!") == "很好。"
    assert end_mark("很好") == "很好。"


def test_a_model_that_reads_the_words_passes():
    result = check(lexicon, LABELS, TEST_TEXTS, load_cases())
    assert set(result) == {"minimum", "directional", "invariance"}
    for kind, r in result.items():
        assert r["cases"] > 0 and r["pass_rate"] == 1.0, (kind, r["failed_examples"])
    # a case is a text a perturbation changed: "太吵了" has no mark to space or widen
    assert result["invariance"]["cases"] == len(PERTURBATIONS) * len(TEST_TEXTS) - 2


def test_a_model_that_counts_characters_fails_invariance_only_where_it_flips():
    def by_length(texts: List[str]) -> np.ndarray:
        pos = np.array([len(t) % 2 for t in texts], dtype=float)
        return np.stack([1 - pos, pos], axis=1)

    result = check(by_length, LABELS, TEST_TEXTS, load_cases())
    inv = result["invariance"]
    # spaces: +2 per mark, +1 for a final mark (no space after it): parity flips where the
    # text ends in a mark; width: the same length; the final mark swapped keeps the length,
    # added (no mark to swap) flips it
    assert inv["cases"] == 10 and inv["passed"] == 6
    assert inv["failed_examples"] == ["spaces: 房间很好，早餐不错!", "spaces: 服务差，不推荐。",
                                      "final_mark: 这本书(第二版)很精彩：推荐",
                                      "final_mark: 太吵了"]


def test_a_constant_model_fails_every_directional_pair_and_half_the_minimum():
    cases = load_cases()
    result = check(lambda texts: np.tile([0.3, 0.7], (len(texts), 1)), LABELS, TEST_TEXTS,
                   cases)
    assert result["directional"]["passed"] == 0
    assert result["minimum"]["passed"] == len(cases["minimum"]["positive"])
    assert result["minimum"]["cases"] == sum(len(v) for v in cases["minimum"].values())
    assert len(result["minimum"]["failed_examples"]) == 5  # shown: at most five
    assert result["invariance"]["pass_rate"] == 1.0


def test_the_cases_file_names_real_labels_and_real_pairs():
    cases = load_cases()
    assert set(cases["minimum"]) <= set(LABELS)
    assert all(len(v) >= 5 for v in cases["minimum"].values())
    for pair in cases["directional"]:
        assert len(pair) == 2 and pair[0] != pair[1]


def test_a_model_with_other_labels_gets_invariance_only_and_says_why():
    # Your own data (prepare.source) may name its labels otherwise: the hand-written cases
    # cannot be scored, and saying so beats a traceback or a made-up pass.
    result = check(lexicon, ["bad", "good"], TEST_TEXTS, load_cases())
    for kind in ("minimum", "directional"):
        assert set(result[kind]) == {"not_run"}
        assert "negative, positive" in result[kind]["not_run"]
        assert "bad, good" in result[kind]["not_run"]
    assert result["invariance"]["cases"] == 10 and result["invariance"]["pass_rate"] == 1.0


def test_the_gate_reads_only_the_kinds_that_ran():
    from pipeline.params import Validate
    from pipeline.validate import gates

    behaved = check(lexicon, ["bad", "good"], TEST_TEXTS, load_cases())
    behaved["invariance"]["pass_rate"] = 0.5  # as if half had flipped
    g = gates(Validate(), {"accuracy": 0.9, "macro_f1": 0.9}, {"accuracy": 0.85}, 1e-7, [],
              behaved)["behaviour"]
    assert g["passed"] is False and g["kind"] == "invariance" and g["value"] == 0.5
