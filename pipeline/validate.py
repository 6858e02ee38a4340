"""Stage `validate`: check the exported SavedModel in a fresh process, against gates.

Loads only the SavedModel and the tokenizer file beside it (no transformers, no training
code): signature names/dtypes/shapes, parity with the Keras outputs recorded at export,
test accuracy and macro-F1 against `validate` gates and against the baseline, behavioural
checks (`pipeline/behaviour.py`: minimum functionality, directional pairs, invariance to
spacing and punctuation), and single-request latency. Writes `metrics/validate.json` and
the test predictions (`metrics/test_predictions.csv`, a DVC confusion-matrix plot); a
failed gate exits 1 with one line naming it.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from pipeline import batching, behaviour, paths
from pipeline.baseline import scores
from pipeline.errors import GateFailed, fail, require, run_stage
from pipeline.io import read_json, read_jsonl, write_atomic, write_json
from pipeline.params import Export, Validate, load
from serving import tokenization
from serving.model_dir import (
    INPUT_DTYPE,
    INPUT_NAMES,
    OUTPUT_NAME,
    PARITY_FILE,
    SIGNATURE,
    TOKENIZER_FILE,
    read_card,
    read_labels,
)


def load_signature(model_dir: Path):
    import tensorflow as tf

    if not (model_dir / "saved_model.pb").is_file():
        fail(f"{model_dir} has no saved_model.pb; run the export stage first")
    loaded = tf.saved_model.load(str(model_dir))
    if SIGNATURE not in loaded.signatures:
        raise GateFailed(f"signature: '{SIGNATURE}' missing (has {list(loaded.signatures)})")
    return loaded, loaded.signatures[SIGNATURE]


def check_signature(fn, num_labels: int) -> List[str]:
    """Problems with the signature's names, dtypes and shapes (empty list = as documented)."""
    problems = []
    _, inputs = fn.structured_input_signature
    if sorted(inputs) != sorted(INPUT_NAMES):
        problems.append(f"inputs are {sorted(inputs)}, expected {sorted(INPUT_NAMES)}")
    for name, spec in inputs.items():
        if spec.dtype.name != INPUT_DTYPE or spec.shape.as_list() != [None, None]:
            problems.append(f"{name} is {spec.dtype.name}{spec.shape.as_list()}, "
                            f"expected {INPUT_DTYPE}[None, None]")
    outputs = fn.structured_outputs
    if list(outputs) != [OUTPUT_NAME]:
        problems.append(f"outputs are {list(outputs)}, expected ['{OUTPUT_NAME}']")
    else:
        spec = outputs[OUTPUT_NAME]
        if spec.dtype.name != "float32" or spec.shape.as_list() != [None, num_labels]:
            problems.append(f"{OUTPUT_NAME} is {spec.dtype.name}{spec.shape.as_list()}, "
                            f"expected float32[None, {num_labels}]")
    return problems


def call(fn, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    out = fn(input_ids=tf.constant(input_ids, tf.int32), attention_mask=tf.constant(mask, tf.int32))
    return out[OUTPUT_NAME].numpy()


def predict(fn, ids: List[List[int]], batch_size: int, buckets: List[int]) -> np.ndarray:
    probs = None
    for input_ids, mask, rows in batching.make_batches(ids, batch_size, buckets):
        out = call(fn, input_ids, mask)
        if probs is None:
            probs = np.zeros((len(ids), out.shape[1]), dtype=np.float32)
        probs[rows] = out
    if probs is None:  # no ids, so no batches
        raise ValueError("predict: no rows to predict")
    return probs


def latency(fn, tokenizer, texts: List[str], n: int, buckets: List[int]) -> Dict[str, float]:
    """One request at a time, tokenisation included: the single-caller view."""
    rng = np.random.default_rng(0)
    picks = [texts[i] for i in rng.integers(0, len(texts), size=n)]
    for text in picks[:5]:  # warm-up: first calls allocate
        ids = tokenization.encode(tokenizer, [text])
        call(fn, *tokenization.pad(ids, tokenization.bucket_length(len(ids[0]), buckets)))
    times = []
    for text in picks:
        t0 = time.perf_counter()
        ids = tokenization.encode(tokenizer, [text])
        call(fn, *tokenization.pad(ids, tokenization.bucket_length(len(ids[0]), buckets)))
        times.append((time.perf_counter() - t0) * 1000)
    arr = np.array(times)
    return {"requests": n, "p50_ms": round(float(np.percentile(arr, 50)), 3),
            "p95_ms": round(float(np.percentile(arr, 95)), 3),
            "mean_ms": round(float(arr.mean()), 3)}


def predictions_csv(labels: List[int], probs: np.ndarray, names: Dict[int, str]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "actual", "predicted", "score"])
    for i, (y, p) in enumerate(zip(labels, probs)):
        k = int(p.argmax())
        w.writerow([i, names[y], names[k], f"{p[k]:.6f}"])
    return buf.getvalue().encode()


def gates(v: Validate, quality: dict, baseline: dict, parity: float,
          signature_problems: List[str], behaved: Dict[str, dict]) -> Dict[str, dict]:
    floor = baseline["accuracy"] - v.max_accuracy_gap_to_baseline
    ran = {kind: b for kind, b in behaved.items() if "pass_rate" in b}  # not `not_run`
    weakest = min(ran, key=lambda kind: ran[kind]["pass_rate"])
    return {
        "signature": {"passed": not signature_problems, "problems": signature_problems},
        "parity": {"passed": parity <= v.max_parity_diff, "value": parity,
                   "threshold": v.max_parity_diff, "key": "validate.max_parity_diff"},
        "accuracy": {"passed": quality["accuracy"] >= v.min_accuracy,
                     "value": quality["accuracy"], "threshold": v.min_accuracy,
                     "key": "validate.min_accuracy"},
        "macro_f1": {"passed": quality["macro_f1"] >= v.min_macro_f1,
                     "value": quality["macro_f1"], "threshold": v.min_macro_f1,
                     "key": "validate.min_macro_f1"},
        "baseline": {"passed": quality["accuracy"] >= floor, "value": quality["accuracy"],
                     "threshold": round(floor, 6), "key": "validate.max_accuracy_gap_to_baseline"},
        "behaviour": {"passed": all(b["pass_rate"] >= v.min_behaviour_pass_rate
                                    for b in ran.values()),
                      "value": ran[weakest]["pass_rate"], "kind": weakest,
                      "threshold": v.min_behaviour_pass_rate,
                      "key": "validate.min_behaviour_pass_rate"},
    }


def describe_failures(result: Dict[str, dict]) -> str:
    parts = []
    for name, g in result.items():
        if g["passed"]:
            continue
        if name == "signature":
            parts.append("signature: " + "; ".join(g["problems"]))
        else:
            op = "<=" if name == "parity" else ">="
            what = f"{name} ({g['kind']})" if "kind" in g else name
            parts.append(f"{what} {g['value']} is not {op} {g['threshold']} ({g['key']})")
    return "; ".join(parts)


def validate(model_dir: Path, v: Validate) -> Tuple[dict, bytes]:
    names = read_labels(model_dir)
    card = read_card(model_dir)
    max_length = int(card["max_input_tokens"])
    buckets = tokenization.default_buckets(max_length)
    _loaded, fn = load_signature(model_dir)
    problems = check_signature(fn, len(names))

    ref = np.load(model_dir / PARITY_FILE)
    parity = float(np.abs(call(fn, ref["input_ids"], ref["attention_mask"])
                          - ref["probabilities"]).max())

    tokenizer = tokenization.load_tokenizer(model_dir / TOKENIZER_FILE, max_length)
    rows = read_jsonl(paths.split_file("test"))
    if not rows:
        fail(f"{paths.split_file('test')} is empty; run the prepare stage first")
    texts, labels = [r["text"] for r in rows], [int(r["label"]) for r in rows]
    probs = predict(fn, tokenization.encode(tokenizer, texts), v.batch_size, buckets)
    quality = scores(labels, probs.argmax(axis=1).tolist())
    baseline = read_json(paths.metrics_file("baseline"))["test"]
    sample = np.random.default_rng(0).permutation(len(texts))[:v.behaviour_texts]
    behaved = behaviour.check(
        lambda batch: predict(fn, tokenization.encode(tokenizer, batch), v.batch_size, buckets),
        [names[k] for k in sorted(names)], [texts[i] for i in sorted(sample)],
        behaviour.load_cases())
    result = gates(v, quality, baseline, parity, problems, behaved)
    report = {
        "model_dir": str(model_dir),
        "test": {**quality, "texts": len(texts)},
        "baseline_test": baseline,
        "accuracy_vs_baseline": round(quality["accuracy"] - baseline["accuracy"], 6),
        "parity_max_abs_diff": parity,
        "behaviour": behaved,
        "gates": result,
        "passed": all(g["passed"] for g in result.values()),
        # Timings differ run to run; everything above is deterministic.
        "latency": latency(fn, tokenizer, texts, v.latency_requests, buckets),
    }
    return report, predictions_csv(labels, probs, names)


def main() -> None:
    v = load(Validate)
    e = load(Export)
    model_dir = paths.model_dir(e.name, e.version)
    require(model_dir / "saved_model.pb", paths.split_file("test"), paths.metrics_file("baseline"))
    report, predictions = validate(model_dir, v)
    if "transformers" in sys.modules:  # a guard on our own imports, not on user input
        raise RuntimeError("validate imported transformers; it must load only the SavedModel")
    write_json(paths.metrics_file("validate"), report)
    write_atomic(paths.METRICS_DIR / "test_predictions.csv", predictions)
    t, lat = report["test"], report["latency"]
    rates = ", ".join(f"{kind} {b['passed']}/{b['cases']}" if "cases" in b
                      else f"{kind} not run" for kind, b in report["behaviour"].items())
    print(f"validate: test accuracy {t['accuracy']:.4f} (baseline "
          f"{report['baseline_test']['accuracy']:.4f}), macro-F1 {t['macro_f1']:.4f}, parity "
          f"{report['parity_max_abs_diff']:.2e}, behaviour {rates}, latency p50 "
          f"{lat['p50_ms']:.1f} ms p95 {lat['p95_ms']:.1f} ms")
    if not report["passed"]:
        raise GateFailed(describe_failures(report["gates"]))


if __name__ == "__main__":
    run_stage("validate", main)
