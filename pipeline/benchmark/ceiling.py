"""Model-only throughput for the benchmark: the exported SavedModel called in this process through
the serving runner's own predict function (eager, tf.function, or tf.function with XLA).

Two views: fixed synthetic shapes (batch x length) per execution mode, and the sampled texts
pushed through the endpoint's batch policy (arrival order, split by length bucket, padded).
No HTTP, no tokenization timing, no money.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from pipeline.errors import fail
from serving.tokenization import default_buckets, group_by_bucket, pad


def check(model_dir: Path):
    """The serving runner's check of a model directory; a refusal is one PipelineError line."""
    import tensorflow as tf

    from serving.runner import ModelDirError, check_model_dir

    try:
        return check_model_dir(model_dir, tf.__version__)
    except ModelDirError as exc:
        fail(str(exc))


def _predict_fn(model_dir: Path, execution: str):
    from serving.runner import ModelDirError, load_predict_fn

    info = check(model_dir)
    try:
        return info, load_predict_fn(info, execution)
    except ModelDirError as exc:
        fail(str(exc))


def _timed(call, seconds: float, min_calls: int = 3) -> "tuple[int, float]":
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < seconds:
        call()
        calls += 1
    return calls, time.perf_counter() - t0


def shape_grid(model_dir: Path, modes: Sequence[str], batch_sizes: Sequence[int],
               lengths: Sequence[int], seconds: float, seed: int = 0) -> List[Dict[str, object]]:
    """Rows/s per (mode, batch size, length) on random ids, after one untimed warm-up call
    (a new shape costs seconds of tracing or XLA compilation, which serving pays at start)."""
    rng = np.random.default_rng(seed)
    out: List[Dict[str, object]] = []
    for mode in modes:
        info, predict = _predict_fn(model_dir, mode)
        for length in lengths:
            length = min(length, info.max_tokens)
            for bs in batch_sizes:
                ids = rng.integers(5, 100, size=(bs, length)).astype(np.int32)
                mask = np.ones_like(ids)
                t0 = time.perf_counter()
                predict(ids, mask)
                first_s = time.perf_counter() - t0
                calls, elapsed = _timed(lambda p=predict, i=ids, m=mask: p(i, m), seconds)
                out.append({"mode": mode, "batch_size": bs, "length": length,
                            "rows_per_s": round(calls * bs / elapsed, 3),
                            "ms_per_call": round(elapsed / calls * 1000, 3),
                            "first_call_ms": round(first_s * 1000, 1)})
    return out


def policy_pass(predict, ids: Sequence[Sequence[int]], batch_size: int,
                buckets: Sequence[int]) -> Tuple[np.ndarray, int]:
    """`ids` arriving in order, `batch_size` at a time, each window split by length bucket and
    padded to it: the most the endpoint's per-bucket batches can hold when `batch_size`
    requests are waiting at once (concurrency = batch_size). The argmax labels, model calls."""
    labels = np.zeros(len(ids), dtype=np.int64)
    calls = 0
    for start in range(0, len(ids), batch_size):
        window = ids[start: start + batch_size]
        for length, members in group_by_bucket([len(r) for r in window], buckets):
            rows = [start + i for i in members]
            probs = predict(*pad([ids[i] for i in rows], length))
            labels[rows] = np.argmax(probs, axis=1)
            calls += 1
    return labels, calls


def batch_policy(model_dir: Path, execution: str, ids: Sequence[Sequence[int]],
                 batch_sizes: Sequence[int],
                 label_tokens: Dict[int, int]) -> List[Dict[str, object]]:
    """Texts/s and billed tokens/s of the model alone on real texts, per batch size.

    Each batch size runs twice over the same texts; only the second pass is timed."""
    info, predict = _predict_fn(model_dir, execution)
    buckets = default_buckets(info.max_tokens)
    input_tokens = sum(len(r) for r in ids)
    out: List[Dict[str, object]] = []
    for bs in batch_sizes:
        policy_pass(predict, ids, bs, buckets)
        t0 = time.perf_counter()
        labels, calls = policy_pass(predict, ids, bs, buckets)
        elapsed = time.perf_counter() - t0
        tokens = input_tokens + sum(label_tokens[int(k)] for k in labels)
        out.append({"execution": execution, "batch_size": bs, "texts": len(ids),
                    "rows_per_call": round(len(ids) / calls, 3),
                    "texts_per_s": round(len(ids) / elapsed, 3),
                    "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 3)})
    return out
