"""The distillation transfer set (pipeline/teacher.py) and the targets train makes of it:
clause runs and character dropout cut real new texts, out-of-fold teacher labels carry no
memory of their own text, and the label/teacher mix is the one params.yaml names."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import paths
from pipeline.params import Baseline, Train
from pipeline.teacher import augment, char_dropout, clause_run, out_of_fold
from pipeline.train import training_targets

REVIEW = "房间很大，早餐也不错。就是隔音太差！晚上很吵"


def test_a_clause_run_is_whole_clauses_of_the_text():
    rng = np.random.default_rng(0)
    clauses = ["房间很大，", "早餐也不错。", "就是隔音太差！", "晚上很吵"]
    runs = {clause_run(REVIEW, rng) for _ in range(40)}
    # half of four clauses, every start drawn
    assert runs == {"".join(clauses[i:i + 2]) for i in range(3)}
    assert clause_run("一句话没有停顿", rng) is None


def test_character_dropout_keeps_order_and_drops_about_the_rate():
    rng = np.random.default_rng(0)
    text = "这本书写得非常好值得一读" * 20
    assert char_dropout(text, 0.0, rng) == text
    cut = char_dropout(text, 0.3, rng)
    assert 0.6 * len(text) < len(cut) < 0.8 * len(text)
    rest = iter(text)
    assert all(ch in rest for ch in cut)  # a subsequence: order kept, nothing added


def test_augmented_texts_are_new_nonempty_and_seeded():
    texts = [REVIEW, "服务很好，下次还来。", "质量太差", "屏幕清晰，速度很快，推荐"]
    extra = augment(texts, 12, 0.2, np.random.default_rng(1))
    assert len(extra) == 12 and len(set(extra)) == 12
    assert all(t and t not in texts for t in extra)
    assert extra == augment(texts, 12, 0.2, np.random.default_rng(1))
    assert extra != augment(texts, 12, 0.2, np.random.default_rng(2))


def test_out_of_fold_labels_do_not_remember_their_own_text():
    # Every text is a string of its own random characters and its label a coin flip: a
    # model that saw the text can recall its label, one that did not can only guess.
    from pipeline.baseline import make_model

    rng = np.random.default_rng(0)
    alphabet = [chr(0x4E00 + i) for i in range(3000)]
    texts = ["".join(rng.choice(alphabet, 12)) for _ in range(300)]
    labels = rng.integers(0, 2, 300)
    p = Baseline(ngram_min=1, ngram_max=2)
    recalled = make_model(p, 16.0).fit(texts, labels).predict_proba(texts)
    assert (recalled.argmax(1) == labels).mean() > 0.95
    oof = out_of_fold(texts, labels, p, 16.0, folds=5, seed=0)
    assert 0.35 < (oof.argmax(1) == labels).mean() < 0.65
    np.testing.assert_allclose(oof.sum(axis=1), 1.0)


def _write(ws, transfer):
    (ws / paths.DATA_DIR).mkdir(parents=True)
    (ws / paths.split_file("train")).write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n"
                for t, y, _ in transfer if y is not None))
    (ws / paths.TEACHER_DIR).mkdir(parents=True)
    (ws / paths.TRANSFER_FILE).write_text(
        "".join(json.dumps({"text": t, "label": y, "probs": q}) + "\n" for t, y, q in transfer))


def test_targets_mix_the_label_with_the_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, [("好", 1, [0.8, 0.2]), ("差", 0, [0.9, 0.1]), ("一般", None, [0.3, 0.7])])
    texts, targets = training_targets(Train(distill_alpha=0.25), num_labels=2)
    assert texts == ["好", "差", "一般"]
    # 0.25 x one-hot + 0.75 x teacher; the extra text: the teacher alone
    np.testing.assert_allclose(targets, [[0.6, 0.4], [0.925, 0.075], [0.3, 0.7]], atol=1e-6)
    assert targets.dtype == np.float32

    texts, targets = training_targets(Train(distill_alpha=1.0), num_labels=2)
    assert texts == ["好", "差"]  # no teacher: the train split, its labels only
    np.testing.assert_array_equal(targets, [[0, 1], [1, 0]])


def test_a_transfer_set_of_other_labels_is_refused(tmp_path, monkeypatch):
    from pipeline.errors import PipelineError

    monkeypatch.chdir(tmp_path)
    _write(tmp_path, [("好", 1, [0.1, 0.2, 0.7])])
    with pytest.raises(PipelineError, match="run the teacher stage"):
        training_targets(Train(distill_alpha=0.5), num_labels=2)
