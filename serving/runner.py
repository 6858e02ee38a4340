"""The model runner: checks and loads an exported model directory (SavedModel + tokenizer file
only, never training code) and serves it through dynamic micro-batching on one worker thread.
It knows nothing about HTTP, keys or money.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, cast

import numpy as np

from serving.model_dir import (
    CARD_FILE,
    INPUT_NAMES,
    LABELS_FILE,
    OUTPUT_NAME,
    SIGNATURE,
    TOKENIZER_FILE,
)
from serving.tokenization import bucket_length, default_buckets, pad

PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class ModelDirError(RuntimeError):
    """The model directory cannot be served; the message is one line saying why and what to do."""


class Overloaded(RuntimeError):
    """The batching queue is full."""


@dataclass
class ModelInfo:
    path: Path
    name: str
    version: str
    max_tokens: int
    labels: Dict[int, str]
    exported_with_tf: str


def _version_tuple(v: str) -> Tuple[int, ...]:
    parts = []
    for p in v.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_model_dir(path: Path, running_tf: str) -> ModelInfo:
    """Refuse, with one line, a directory that is missing, incomplete, or from a newer TF."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist; run the pipeline "
                            f"(dvc repro) or set TOKENMETER_MODEL_DIR")
    for f in ("saved_model.pb", "variables", TOKENIZER_FILE, LABELS_FILE, CARD_FILE):
        if not (path / f).exists():
            raise ModelDirError(f"model directory {path} is incomplete: {f} is missing; "
                                f"re-run the export stage")
    try:
        card = json.loads((path / CARD_FILE).read_text(encoding="utf-8"))
        labels = {int(k): str(v) for k, v in
                  json.loads((path / LABELS_FILE).read_text(encoding="utf-8")).items()}
        max_tokens = int(card["max_input_tokens"])
        exported_tf = str(card["exported_with"]["tensorflow"])
        name, version = str(card["name"]), str(card["version"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelDirError(f"model directory {path} is corrupt: cannot read {CARD_FILE}/"
                            f"{LABELS_FILE} ({type(exc).__name__}: {exc}); re-run export") from exc
    # SavedModels load forward only (a TF 2.15 export fails on TF 2.9 with unregistered ops).
    if _version_tuple(exported_tf)[:2] > _version_tuple(running_tf)[:2]:
        raise ModelDirError(f"model in {path} was exported by TensorFlow {exported_tf}, newer "
                            f"than the running {running_tf}; export it with TF <= {running_tf}")
    return ModelInfo(path=path, name=name, version=version, max_tokens=max_tokens,
                     labels=labels, exported_with_tf=exported_tf)


def load_predict_fn(info: ModelInfo, execution: str) -> PredictFn:
    """The SavedModel's serving signature as a numpy function, in the chosen execution mode."""
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(info.path))
        sig = loaded.signatures[SIGNATURE]
    except Exception as exc:  # TF raises many types for a broken SavedModel
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelDirError(f"cannot load the SavedModel in {info.path}: {first}; "
                            f"re-run the export stage") from exc

    def call(ids, mask):
        return sig(**{INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask})[OUTPUT_NAME]

    # A SavedModel holds graphs, not Python: "eager" calls the signature's concrete function
    # directly (no extra tracing); "graph" wraps it in a tf.function (one trace per bucket
    # shape); "xla" also compiles each shape with XLA (jit_compile=True).
    if execution == "xla":
        fn = tf.function(call, jit_compile=True)
    elif execution == "graph":
        fn = tf.function(call)
    else:
        fn = call

    def predict(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = fn(tf.constant(ids, tf.int32), tf.constant(mask, tf.int32))
        return out.numpy()

    # The signature needs its object graph alive. (mypy does not model attributes set on a
    # function: python/mypy#2087.)
    predict.keep_alive = loaded  # type: ignore[attr-defined]
    return predict


@dataclass
class _Job:
    rows: List[List[int]]
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Bounded queue -> one worker thread that groups queued jobs into batches.

    A batch is whatever is queued (up to `max_batch` rows), waiting at most `max_wait_s` for
    more; rows are grouped by length bucket and padded to it, so TF sees few shapes.
    """

    def __init__(self, predict: PredictFn, buckets: Sequence[int], max_batch: int = 32,
                 max_wait_s: float = 0.002, queue_size: int = 1024,
                 on_batch: Optional[Callable[[int], None]] = None):
        self.predict, self.buckets = predict, list(buckets)
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue: "queue.Queue[Optional[_Job]]" = queue.Queue(maxsize=queue_size)
        self.on_batch = on_batch
        self._thread = threading.Thread(target=self._loop, name="model-runner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        try:
            self.queue.put(None, timeout=1)
        except queue.Full:
            pass
        self._thread.join(timeout=5)

    def depth(self) -> int:
        return self.queue.qsize()

    def submit(self, rows: List[List[int]]) -> Future:
        job = _Job(rows)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Overloaded("model queue is full") from None
        return job.future

    def warm_up(self) -> None:
        """Trace every bucket shape once before serving (each new shape costs seconds)."""
        for length in self.buckets:
            ids, mask = pad([[1] * min(2, length)], length)
            self.predict(ids, mask)

    def _collect(self, first: _Job) -> List[_Job]:
        jobs, n = [first], len(first.rows)
        deadline = time.monotonic() + self.max_wait_s
        while n < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=remaining) if remaining > 0 else \
                    self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put_nowait(None)  # keep the stop signal for the loop
                break
            jobs.append(job)
            n += len(job.rows)
        return jobs

    def _run(self, jobs: List[_Job]) -> None:
        flat = [(j, r) for j, job in enumerate(jobs) for r in range(len(job.rows))]
        by_bucket: Dict[int, List[Tuple[int, int]]] = {}
        for j, r in flat:
            by_bucket.setdefault(bucket_length(len(jobs[j].rows[r]), self.buckets),
                                 []).append((j, r))
        outputs: List[List[Optional[np.ndarray]]] = [[None] * len(job.rows) for job in jobs]
        for length, members in sorted(by_bucket.items()):
            for i in range(0, len(members), self.max_batch):
                chunk = members[i: i + self.max_batch]
                ids, mask = pad([jobs[j].rows[r] for j, r in chunk], length)
                probs = self.predict(ids, mask)
                if self.on_batch:
                    self.on_batch(len(chunk))
                for (j, r), p in zip(chunk, probs):
                    outputs[j][r] = p
        for job, out in zip(jobs, outputs):
            # Every (job, row) is in exactly one chunk above, so no slot is still None.
            job.future.set_result(np.stack(cast(List[np.ndarray], out)))

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs = self._collect(first)
            try:
                self._run(jobs)
            except Exception as exc:  # a failed batch fails its requests, not the worker
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)


class ModelRunner:
    """The checked model, its predict function and its batcher, ready to serve."""

    def __init__(self, model_dir: Path, execution: str = "graph", max_batch: int = 32,
                 max_wait_s: float = 0.002, queue_size: int = 1024, warmup: bool = True,
                 on_batch: Optional[Callable[[int], None]] = None):
        import tensorflow as tf

        self.info = check_model_dir(model_dir, tf.__version__)
        predict = load_predict_fn(self.info, execution)
        self.batcher = MicroBatcher(predict, default_buckets(self.info.max_tokens),
                                    max_batch=max_batch, max_wait_s=max_wait_s,
                                    queue_size=queue_size, on_batch=on_batch)
        if warmup:
            self.batcher.warm_up()
        self.batcher.start()
        self.ready = True

    def submit(self, rows: List[List[int]]) -> Future:
        return self.batcher.submit(rows)

    def stop(self) -> None:
        self.ready = False
        self.batcher.stop()
