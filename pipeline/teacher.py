"""Stage `teacher`: the distillation transfer set, every text labelled by the TF-IDF baseline.

The student (`train`, `train.distill_alpha`) learns from the true labels mixed with the
teacher's probabilities, and from extra texts only the teacher labels. This module owns
both: the teacher's probabilities on the train texts, each from a fold model that never
saw that text (so they carry the teacher's real doubt and errors; refit on all of train
it scores 98% on its own training texts and would teach little beyond the labels), and
the extra texts cut from train texts (a run of clauses, or the text with characters
dropped), labelled by the teacher fit on all of train. The teacher is the baseline model
at the C the baseline stage chose on val. Reads only the train split, never val or test.
Writes `build/teacher/transfer.jsonl` and `metrics/teacher.json`.
"""

from __future__ import annotations

import re
import time
from typing import List, Optional, Sequence

import numpy as np

from pipeline import paths
from pipeline.baseline import make_model
from pipeline.errors import fail, require, run_stage
from pipeline.io import read_json, read_jsonl, write_json, write_jsonl
from pipeline.params import Baseline, Teacher, load

CLAUSE_END = re.compile(r"(?<=[。！？!?；;，,、…~～\n])")


def clause_run(text: str, rng: np.random.Generator) -> Optional[str]:
    """A run of whole clauses, about half of them (None: fewer than two clauses)."""
    clauses = [c for c in CLAUSE_END.split(text) if c.strip()]
    if len(clauses) < 2:
        return None
    size = max(1, len(clauses) // 2)
    start = int(rng.integers(0, len(clauses) - size + 1))
    return "".join(clauses[start:start + size]).strip()


def char_dropout(text: str, rate: float, rng: np.random.Generator) -> str:
    keep = rng.random(len(text)) >= rate
    return "".join(ch for ch, k in zip(text, keep) if k).strip()


def augment(texts: Sequence[str], count: int, rate: float,
            rng: np.random.Generator) -> List[str]:
    """`count` new texts, each cut from a randomly drawn train text: half a clause run
    (where the text has two clauses or more), the rest character dropout. A cut that is
    empty or equal to a train text is skipped (at most a few tries per text)."""
    seen = set(texts)
    out: List[str] = []
    for _ in range(count * 3):
        if len(out) == count:
            break
        source = texts[int(rng.integers(0, len(texts)))]
        piece = clause_run(source, rng) if rng.random() < 0.5 else None
        if piece is None:
            piece = char_dropout(source, rate, rng)
        if piece and piece not in seen:
            seen.add(piece)
            out.append(piece)
    return out


def out_of_fold(texts: List[str], labels: np.ndarray, p: Baseline, c: float, folds: int,
                seed: int) -> np.ndarray:
    """The teacher's probabilities on each text from a model fit on the other folds."""
    from sklearn.model_selection import StratifiedKFold

    probs = np.zeros((len(texts), int(labels.max()) + 1))
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for fit_rows, held in split.split(texts, labels):
        model = make_model(p, c).fit([texts[i] for i in fit_rows], labels[fit_rows])
        probs[held] = model.predict_proba([texts[i] for i in held])
    return probs


def main() -> None:
    p = load(Teacher)
    base = load(Baseline)
    require(paths.split_file("train"), paths.metrics_file("baseline"))
    rows = read_jsonl(paths.split_file("train"))
    if not rows:
        fail(f"{paths.split_file('train')} is empty; run the prepare stage first")
    texts = [r["text"] for r in rows]
    labels = np.array([int(r["label"]) for r in rows])
    c = float(read_json(paths.metrics_file("baseline"))["C"])
    if p.folds and np.bincount(labels).min() < p.folds:
        fail(f"params.yaml: teacher.folds {p.folds} is more than the smallest label's "
             f"{np.bincount(labels).min()} train texts; lower it")
    started = time.perf_counter()
    teacher = make_model(base, c).fit(texts, labels)
    probs = (out_of_fold(texts, labels, base, c, p.folds, p.seed) if p.folds
             else teacher.predict_proba(texts))
    rng = np.random.default_rng(p.seed)
    extra = augment(texts, round(p.augment_fraction * len(texts)), p.char_dropout, rng)
    extra_probs = teacher.predict_proba(extra) if extra else np.zeros((0, probs.shape[1]))

    def row(text: str, label: Optional[int], prob: np.ndarray) -> dict:
        return {"text": text, "label": label, "probs": [round(float(x), 6) for x in prob]}

    write_jsonl(paths.TRANSFER_FILE,
                [*(row(t, int(y), q) for t, y, q in zip(texts, labels, probs)),
                 *(row(t, None, q) for t, q in zip(extra, extra_probs))])
    agree = float((probs.argmax(1) == labels).mean())
    summary = {"teacher": f"baseline at C={c}", "folds": p.folds,
               "train_texts": len(texts), "extra_texts": len(extra),
               "teacher_train_accuracy": round(agree, 6),
               "seconds": round(time.perf_counter() - started, 1)}
    write_json(paths.metrics_file("teacher"), summary)
    where = f"out of {p.folds} folds" if p.folds else "in-sample"
    print(f"teacher: {len(texts):,} train texts labelled {where} (teacher agrees with "
          f"{agree:.1%} of their labels), {len(extra):,} extra texts; "
          f"{summary['seconds']:.0f} s")


if __name__ == "__main__":
    run_stage("teacher", main)
