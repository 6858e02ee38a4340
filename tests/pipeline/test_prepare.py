"""prepare's pure core: cleaning, de-duplication, conflicts, stratified disjoint splits."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline.errors import PipelineError
from pipeline.params import Prepare
from pipeline.prepare import Corpus, clean, normalise, prepare, split


def test_normalise_collapses_every_kind_of_whitespace():
    assert normalise("  好\t\t书\u3000 真\n好 ") == "好 书 真 好"
    assert normalise(" \u3000\t ") == ""


def test_clean_drops_empty_duplicates_and_conflicting_texts():
    corpus = Corpus(
        texts=["好书", "好书 ", "坏书", "一般", "一般", "  ", "好  书"],
        labels=["pos", "pos", "neg", "pos", "neg", "neg", "pos"],
    )
    cleaned, stats = clean(corpus)
    # "一般" carries both labels -> dropped entirely; "好书"/"好书 " collapse to one.
    assert cleaned.texts == ["好书", "坏书", "好 书"]
    assert cleaned.labels == ["pos", "neg", "pos"]
    assert stats == {"raw": 7, "empty_dropped": 1, "duplicates_dropped": 2,
                     "conflicting_dropped": 1, "kept": 3}


def _synthetic(n_per_label: int) -> Corpus:
    texts = [f"评论 {i} 好" for i in range(n_per_label)]
    texts += [f"评论 {i} 差" for i in range(n_per_label)]
    return Corpus(texts, ["pos"] * n_per_label + ["neg"] * n_per_label)


def test_split_is_stratified_disjoint_and_seeded():
    corpus = _synthetic(200)
    p = Prepare(val_fraction=0.1, test_fraction=0.1, seed=3)
    parts = split(corpus, p)
    sets = {k: set(v.texts) for k, v in parts.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) \
        and not (sets["val"] & sets["test"])
    assert sum(len(s) for s in sets.values()) == 400
    assert Counter(parts["test"].labels) == {"pos": 20, "neg": 20}
    assert Counter(parts["val"].labels) == {"pos": 20, "neg": 20}
    again = split(corpus, p)
    assert again["test"].texts == parts["test"].texts
    other = split(corpus, Prepare(val_fraction=0.1, test_fraction=0.1, seed=4))
    assert other["test"].texts != parts["test"].texts


def test_prepare_reports_counts_and_subsamples():
    p = Prepare(max_texts=100, seed=0)
    parts, labels, report = prepare(_synthetic(200), p)
    assert labels == ["neg", "pos"]
    assert sum(report["splits"][s]["count"] for s in ("train", "val", "test")) == 100
    assert report["cleaning"]["kept"] == 400


def test_prepare_refuses_a_single_label():
    with pytest.raises(PipelineError, match="1 label"):
        prepare(Corpus(["a", "b", "c"], ["x", "x", "x"]), Prepare())


def test_prepare_refuses_a_split_without_a_label():
    corpus = Corpus([f"t{i}" for i in range(12)], ["a"] * 10 + ["b"] * 2)
    with pytest.raises(PipelineError, match="(split|cannot split)"):
        prepare(corpus, Prepare(min_per_split_label=1))
