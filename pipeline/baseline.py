"""Stage `baseline`: the bar the BERT model must clear, trained on the same split.

TF-IDF over character n-grams + logistic regression (scikit-learn); C is picked on val,
the model refit on train, scored once on test. Writes `metrics/baseline.json`.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from pipeline import paths
from pipeline.errors import fail, require, run_stage
from pipeline.io import read_jsonl, write_json
from pipeline.params import Baseline, load


def scores(y_true: Sequence[int], y_pred: Sequence[int]) -> Dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": round(float(accuracy_score(y_true, y_pred)), 6),
            "macro_f1": round(float(f1_score(y_true, y_pred, average="macro")), 6)}


def make_model(p: Baseline, c: float):
    """The unfitted baseline at inverse regularisation c."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        TfidfVectorizer(analyzer="char", ngram_range=(p.ngram_min, p.ngram_max),
                        sublinear_tf=True),
        LogisticRegression(C=c, max_iter=p.max_iter))


def fit_baseline(train: Tuple[List[str], List[int]], val: Tuple[List[str], List[int]],
                 test: Tuple[List[str], List[int]], p: Baseline) -> dict:
    val_acc = {}
    for c in p.c_grid:
        val_acc[c] = scores(val[1], make_model(p, c).fit(*train).predict(val[0]))["accuracy"]
    best_c = max(p.c_grid, key=lambda c: (val_acc[c], -c))  # ties: the simpler model
    best = make_model(p, best_c).fit(*train)
    return {"model": f"tfidf-char-{p.ngram_min}-{p.ngram_max}+logreg", "C": best_c,
            "val_accuracy_by_C": {str(c): a for c, a in val_acc.items()},
            "val": scores(val[1], best.predict(val[0])),
            "test": scores(test[1], best.predict(test[0]))}


def main() -> None:
    p = load(Baseline)
    require(*(paths.split_file(s) for s in paths.SPLITS))
    data = {}
    for split in paths.SPLITS:
        rows = read_jsonl(paths.split_file(split))
        if not rows:
            fail(f"{paths.split_file(split)} is empty; run the prepare stage first")
        data[split] = ([r["text"] for r in rows], [int(r["label"]) for r in rows])
    result = fit_baseline(data["train"], data["val"], data["test"], p)
    write_json(paths.metrics_file("baseline"), result)
    print(f"baseline: {result['model']} C={result['C']}: test accuracy "
          f"{result['test']['accuracy']:.4f}, macro-F1 {result['test']['macro_f1']:.4f}")


if __name__ == "__main__":
    run_stage("baseline", main)
