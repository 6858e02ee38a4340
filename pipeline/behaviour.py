"""Behavioural checks of a classifier, beside the aggregate gates of the validate stage.

Three kinds (CheckList, Ribeiro et al. 2020; the Made-With-ML course tests models this way):
minimum functionality (hand-written reviews with their label), directional pairs (the same
review with its sentiment words flipped moves the positive probability the right way), and
invariance (a test text with spaces or punctuation changed keeps its predicted label). The
cases are in `pipeline/behaviour.yaml`; the perturbations are here. Owns the checks and
their pass rates; knows nothing of TensorFlow: it is given a `predict(texts) -> probs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import yaml

CASES_FILE = Path(__file__).with_name("behaviour.yaml")

Predict = Callable[[List[str]], np.ndarray]  # texts -> probabilities, one row per text

# Half-width and full-width forms of the punctuation reviews use; both kinds are common in
# the corpus, so a model must not care which.
WIDTH = str.maketrans({",": "，", "!": "！", "?": "？", ";": "；", ":": "：", "(": "（",
                       ")": "）", "，": ",", "！": "!", "？": "?", "；": ";", "：": ":",
                       "（": "(", "）": ")"})


def spaced(text: str) -> str:
    """Spaces around every punctuation mark: what careless typing and copy-paste add."""
    return "".join(f" {ch} " if not ch.isalnum() and not ch.isspace() else ch
                   for ch in text).strip()


def other_width(text: str) -> str:
    return text.translate(WIDTH)


def end_mark(text: str) -> str:
    """The text with its final full stop or exclamation swapped (one added if none)."""
    stripped = text.rstrip("。！!.？?")
    return stripped + ("！" if text.endswith("。") else "。")


PERTURBATIONS: Dict[str, Callable[[str], str]] = {
    "spaces": spaced, "punctuation_width": other_width, "final_mark": end_mark}


def load_cases(path: Path = CASES_FILE) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def check(predict: Predict, label_names: Sequence[str], invariance_texts: Sequence[str],
          cases: dict) -> Dict[str, dict]:
    """Pass rates and the failing cases of each kind (at most five shown per kind). The
    hand-written cases name labels (`positive`, `negative`); for a model without them (your
    own data) those two kinds say `not_run` and why, and only invariance is checked."""
    names = list(label_names)
    result: Dict[str, dict] = {}
    missing = sorted((set(cases["minimum"]) | {"positive"}) - set(names))
    if missing:
        reason = (f"{CASES_FILE.name} is written for the labels {', '.join(missing)}, which "
                  f"this model does not have ({', '.join(names)})")
        result["minimum"] = result["directional"] = {"not_run": reason}
    else:
        minimum = [(text, names.index(name))
                   for name, texts in cases["minimum"].items() for text in texts]
        probs = predict([t for t, _ in minimum])
        failed = [t for (t, y), p in zip(minimum, probs) if int(p.argmax()) != y]
        result["minimum"] = _rate(len(minimum), failed)

        positive = names.index("positive")
        pairs = cases["directional"]
        probs = predict([t for pair in pairs for t in pair])
        failed = [f"{a} / {b}" for (a, b), pa, pb in zip(pairs, probs[0::2], probs[1::2])
                  if not pa[positive] > pb[positive]]
        result["directional"] = _rate(len(pairs), failed)

    base = predict(list(invariance_texts)).argmax(axis=1)
    failed, count = [], 0
    for name, perturb in PERTURBATIONS.items():
        changed = [(i, p) for i, p in ((i, perturb(t)) for i, t in enumerate(invariance_texts))
                   if p != invariance_texts[i]]
        labels = predict([t for _, t in changed]).argmax(axis=1) if changed else []
        failed += [f"{name}: {invariance_texts[i]}" for (i, _), y in zip(changed, labels)
                   if y != base[i]]
        count += len(changed)
    result["invariance"] = _rate(count, failed)
    return result


def _rate(cases: int, failed: List[str]) -> dict:
    return {"cases": cases, "passed": cases - len(failed),
            "pass_rate": round((cases - len(failed)) / cases, 6) if cases else 1.0,
            "failed_examples": failed[:5]}
