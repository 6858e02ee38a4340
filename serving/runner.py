"""The model runner: checks and loads an exported model directory (SavedModel + tokenizer file
only, never training code) and serves it through dynamic micro-batching on one worker thread.
It knows nothing about HTTP, keys or money.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from serving.errors import first_line
from serving.futures import settle
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
        raise ModelDirError(f"cannot load the SavedModel in {info.path}: {first_line(exc)}; "
                            f"re-run the export stage") from exc

    def call(ids, mask):
        return sig(**{INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask})[OUTPUT_NAME]

    # A SavedModel holds graphs, not Python: "eager" calls the signature's concrete function
    # directly; "graph" wraps it in one tf.function traced once for every shape (the input
    # signature leaves batch and length open: without it each new batch size retraced, ~0.5 s
    # each, under load); "xla" also compiles with XLA, once per concrete shape it meets.
    spec = [tf.TensorSpec([None, None], tf.int32)] * 2
    if execution == "xla":
        fn = tf.function(call, jit_compile=True, input_signature=spec)
    elif execution == "graph":
        fn = tf.function(call, input_signature=spec)
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
    bucket: int  # the bucket of its longest row: all its rows are padded to it
    enqueued: float = 0.0
    future: Future = field(default_factory=Future)


# A queued job is never passed over for a fuller bucket for longer than this.
FAIRNESS_S = 0.05


class MicroBatcher:
    """One queue per length bucket -> one worker thread making one model call per batch.

    Each job (a request's rows) waits in the queue of the bucket its longest row pads to, so a
    model call is one shape and needs no splitting. The worker serves the bucket with the most
    queued rows (a job waiting longer than FAIRNESS_S goes first), taking up to `max_batch`
    rows, and answers those jobs as soon as that call returns. It waits up to `max_wait_s` for
    a batch to fill only when nothing else is queued and requests are arriving faster than that
    wait (an idle endpoint never waits; a busy one keeps the model working on what is queued).

    A priority job (the priority price tier) waits in its bucket's priority queue, and those go
    first: the bucket of the oldest priority job is served next, its priority jobs ahead of its
    standard ones. Standard jobs wait while priority ones keep coming (bounded by queue_size,
    as every job): priority is sold at a surcharge so that it stays the smaller share.
    """

    def __init__(self, predict: PredictFn, buckets: Sequence[int], max_batch: int = 32,
                 max_wait_s: float = 0.002, queue_size: int = 1024,
                 on_batch: Optional[Callable[[int], None]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.predict, self.buckets = predict, list(buckets)
        self.max_batch, self.max_wait_s, self.queue_size = max_batch, max_wait_s, queue_size
        self.on_batch, self.clock = on_batch, clock
        self._queues: Dict[int, Deque[_Job]] = {b: deque() for b in self.buckets}
        self._priority: Dict[int, Deque[_Job]] = {b: deque() for b in self.buckets}
        self._rows: Dict[int, int] = {b: 0 for b in self.buckets}  # both queues' rows
        self._jobs = 0  # both queues' jobs
        self._priority_jobs = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._last_arrival: Optional[float] = None
        self._gap_s = float("inf")  # moving average of the time between arrivals
        self._thread = threading.Thread(target=self._loop, name="model-runner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def restart(self) -> bool:
        """A new worker if the started one died (the watchdog); False if it runs or stopped."""
        with self._cond:
            if self._stopping or self._thread.is_alive() or self._thread.ident is None:
                return False
            self._thread = threading.Thread(target=self._loop, name="model-runner",
                                            daemon=True)
            self._thread.start()
            return True

    def stop(self) -> None:
        """Answer what is queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def depth(self) -> int:
        return self._jobs

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, rows: List[List[int]], priority: bool = False) -> Future:
        now = self.clock()
        job = _Job(rows, bucket_length(max(len(r) for r in rows), self.buckets), now)
        with self._cond:
            if self._jobs >= self.queue_size:
                raise Overloaded("model queue is full")
            (self._priority if priority else self._queues)[job.bucket].append(job)
            self._rows[job.bucket] += len(rows)
            self._jobs += 1
            self._priority_jobs += priority
            if self._last_arrival is not None:
                gap = now - self._last_arrival
                self._gap_s = gap if self._gap_s == float("inf") else 0.8 * self._gap_s + 0.2 * gap
            self._last_arrival = now
            self._cond.notify()
        return job.future

    def warm_up(self) -> None:
        """Trace every bucket shape once before serving (each new shape costs seconds)."""
        for length in self.buckets:
            for n in sorted({1, self.max_batch}):
                ids, mask = pad([[1] * min(2, length)] * n, length)
                self.predict(ids, mask)

    def _pick(self, now: float) -> int:
        """The bucket to serve next: the oldest priority job's, else an overdue head job's,
        else the one with most rows."""
        if self._priority_jobs:
            urgent = [b for b in self.buckets if self._priority[b]]
            return min(urgent, key=lambda b: self._priority[b][0].enqueued)
        waiting = [b for b in self.buckets if self._queues[b]]
        oldest = min(waiting, key=lambda b: self._queues[b][0].enqueued)
        if now - self._queues[oldest][0].enqueued > FAIRNESS_S:
            return oldest
        return max(waiting, key=lambda b: self._rows[b])

    def _next(self) -> Optional[Tuple[int, List[_Job]]]:
        """The next batch (bucket, jobs), or None when stopping with nothing queued."""
        with self._cond:
            while self._jobs == 0:
                if self._stopping:
                    return None
                self._cond.wait()
            bucket = self._pick(self.clock())
            deadline = self.clock() + self.max_wait_s
            while (self._rows[bucket] < self.max_batch and self._jobs == len(
                    self._queues[bucket]) + len(self._priority[bucket])
                   and self._gap_s < self.max_wait_s and not self._stopping):
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            n = 0
            taken: List[_Job] = []
            for queue in (self._priority[bucket], self._queues[bucket]):
                before = len(taken)
                while queue and (not taken or n + len(queue[0].rows) <= self.max_batch):
                    taken.append(queue.popleft())
                    n += len(taken[-1].rows)
                if queue is self._priority[bucket]:
                    self._priority_jobs -= len(taken) - before
                    if queue:  # a full batch of priority jobs: no standard job rides along
                        break
            self._rows[bucket] -= n
            self._jobs -= len(taken)
        # False for a job whose caller cancelled it (a client gone): no model work for it.
        return bucket, [j for j in taken if j.future.set_running_or_notify_cancel()]

    def _run(self, length: int, jobs: List[_Job]) -> None:
        if not jobs:  # all of them were cancelled
            return
        rows = [r for job in jobs for r in job.rows]
        outputs = []
        # One call, unless a single job has more rows than max_batch (MAX_TEXTS > MAX_BATCH).
        for i in range(0, len(rows), self.max_batch):
            ids, mask = pad(rows[i: i + self.max_batch], length)
            outputs.append(self.predict(ids, mask))
            if self.on_batch:
                self.on_batch(len(ids))
        probs = np.concatenate(outputs) if len(outputs) > 1 else outputs[0]
        start = 0
        for job in jobs:
            settle(job.future, probs[start: start + len(job.rows)])
            start += len(job.rows)

    def _loop(self) -> None:
        while True:
            batch = self._next()
            if batch is None:
                return
            bucket, jobs = batch
            try:
                self._run(bucket, jobs)
            except Exception as exc:  # a failed batch fails its requests, not the worker
                for job in jobs:
                    settle(job.future, error=exc)


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

    def submit(self, rows: List[List[int]], priority: bool = False) -> Future:
        return self.batcher.submit(rows, priority)

    def depth(self) -> int:
        """Jobs waiting for the model."""
        return self.batcher.depth()

    def alive(self) -> bool:
        """Whether the worker thread that runs the model is alive (/readyz reports it)."""
        return self.batcher.alive()

    def restart(self) -> bool:
        return self.batcher.restart()

    def set_batch_hook(self, hook: Optional[Callable[[int], None]]) -> None:
        """Call `hook(rows)` after every model call (e.g. a batch-size histogram)."""
        self.batcher.on_batch = hook

    def stop(self) -> None:
        self.ready = False
        self.batcher.stop()
