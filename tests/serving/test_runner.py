"""The model runner: refusing bad model directories (one line, before serving) and the
micro-batcher's queueing, bucketing and overload behaviour (with a plain numpy model)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from serving.runner import MicroBatcher, ModelDirError, Overloaded, check_model_dir
from tests.serving.conftest import ROOT


class RecordingModel:
    """A real (tiny) model: probabilities from the row sums; records every batch shape."""

    def __init__(self, gate: threading.Event = None):
        self.shapes, self.gate, self.entered = [], gate, threading.Event()

    def __call__(self, ids, mask):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        self.shapes.append(ids.shape)
        p = (mask.sum(axis=1) % 2).astype(np.float32)
        return np.stack([1 - p, p], axis=1)


def test_batcher_pads_to_buckets_and_answers_each_job():
    gate = threading.Event()
    model = RecordingModel(gate)
    b = MicroBatcher(model, buckets=[4, 8], max_batch=8, max_wait_s=0.0)
    b.start()
    # The first job blocks the worker at the gate while the next three queue up.
    futures = [b.submit([[1, 2, 3]])]
    assert model.entered.wait(30)
    futures += [b.submit([[1] * 6, [1, 2]]), b.submit([[5] * 3]), b.submit([[7] * 8])]
    gate.set()
    out = [f.result(timeout=30) for f in futures]
    b.stop()
    assert [o.shape for o in out] == [(1, 2), (2, 2), (1, 2), (1, 2)]
    assert out[1][0].argmax() == 0 and out[1][1].argmax() == 0  # 6 and 2 tokens: even
    assert out[2][0].argmax() == 1  # 3 tokens: odd
    assert all(s[1] in (4, 8) for s in model.shapes)  # only bucket lengths reach the model
    # The three queued jobs were batched by bucket: one call per bucket, not per job. A job
    # goes whole to the bucket of its longest row (6 -> 8, so its 2-token row is padded to 8).
    assert sorted(model.shapes[1:]) == [(1, 4), (3, 8)]


def test_batcher_refuses_when_the_queue_is_full():
    gate = threading.Event()
    model = RecordingModel(gate)
    b = MicroBatcher(model, buckets=[4], max_batch=1, max_wait_s=0.0, queue_size=2)
    b.start()
    first = b.submit([[1]])
    assert model.entered.wait(30)  # the worker holds job 1; the queue is empty
    b.submit([[1]])
    b.submit([[1]])
    with pytest.raises(Overloaded):
        b.submit([[1]])
    gate.set()
    assert first.result(timeout=30).shape == (1, 2)
    b.stop()


def test_a_failing_batch_fails_its_requests_not_the_worker():
    calls = []

    def model(ids, mask):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("boom")
        return np.zeros((len(ids), 2), np.float32)

    b = MicroBatcher(model, buckets=[4], max_batch=1, max_wait_s=0.0)
    b.start()
    with pytest.raises(ValueError):
        b.submit([[1]]).result(timeout=30)
    assert b.submit([[1]]).result(timeout=30).shape == (1, 2)
    b.stop()


def _fake_dir(tmp_path, tf_version="2.15.1"):
    d = tmp_path / "m"
    (d / "variables").mkdir(parents=True)
    for f in ("saved_model.pb", "tokenizer.json"):
        (d / f).write_text("x")
    (d / "labels.json").write_text(json.dumps({"0": "negative", "1": "positive"}))
    (d / "model_card.json").write_text(json.dumps({
        "name": "sentiment", "version": 1, "max_input_tokens": 64,
        "exported_with": {"tensorflow": tf_version}}))
    return d


def test_check_model_dir_refuses_missing_incomplete_corrupt_and_newer_tf(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        check_model_dir(tmp_path / "nope", "2.15.1")
    d = _fake_dir(tmp_path)
    assert check_model_dir(d, "2.15.1").max_tokens == 64
    assert check_model_dir(d, "2.16.0").name == "sentiment"  # older exports load forward
    with pytest.raises(ModelDirError, match="exported by TensorFlow 2.15.1, newer than"):
        check_model_dir(d, "2.9.3")
    (d / "model_card.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="corrupt"):
        check_model_dir(d, "2.15.1")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelDirError, match="tokenizer.json is missing"):
        check_model_dir(d, "2.15.1")


def _serve(model_dir, tmp_path) -> subprocess.CompletedProcess:
    env = {"TOKENMETER_MODEL_DIR": str(model_dir),
           "TOKENMETER_LEDGER": str(tmp_path / "l.sqlite3"), "TOKENMETER_PORT": "1",
           "PATH": str(ROOT / ".venv" / "bin") + ":/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "serving", "serve"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_serve_refuses_a_newer_tf_export_and_a_corrupt_savedmodel(model_dir, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(model_dir, newer)
    card = json.loads((newer / "model_card.json").read_text())
    card["exported_with"]["tensorflow"] = "99.1.0"
    (newer / "model_card.json").write_text(json.dumps(card))
    r = _serve(newer, tmp_path)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "exported by TensorFlow 99.1.0" in errors[0]
    assert "Traceback" not in r.stderr

    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_dir, corrupt)
    (corrupt / "saved_model.pb").write_bytes(b"not a protobuf")
    r = _serve(corrupt, tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "cannot load the SavedModel" in errors[0]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("execution", ["eager", "graph", "xla"])
def test_every_execution_mode_reproduces_the_exported_parity_batch(model_dir, execution):
    import tensorflow as tf

    from serving.runner import load_predict_fn

    info = check_model_dir(model_dir, tf.__version__)
    parity = np.load(model_dir / "parity_batch.npz")
    predict = load_predict_fn(info, execution)
    probs = predict(parity["input_ids"], parity["attention_mask"])
    np.testing.assert_allclose(probs, parity["probabilities"], atol=1e-4)
    # Buckets from the model card (a fixed [32, 64] would cut the rows of a longer model).
    buckets = [n for n in (16, 32) if n < info.max_tokens] + [info.max_tokens]
    b = MicroBatcher(predict, buckets, max_batch=4, max_wait_s=0.0)
    b.start()
    rows = [list(r[m == 1]) for r, m in zip(parity["input_ids"], parity["attention_mask"])]
    out = np.concatenate([b.submit(rows[i: i + 3]).result(timeout=120)
                          for i in range(0, len(rows), 3)])  # the whole batch, in threes
    b.stop()
    # Padding to a bucket must not change the answer (the mask hides the padding).
    np.testing.assert_allclose(out, parity["probabilities"], atol=1e-4)


def test_serving_imports_no_training_code():
    """The endpoint loads only the SavedModel and tokenizer file: no transformers, no TF at
    import time (TF comes with the runner), no training modules."""
    code = ("import sys, serving.app, serving.cli, serving.runner, serving.metering; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'tensorflow')"
            " or m in ('pipeline.train', 'pipeline.modeling', 'pipeline.export')]; "
            "print(','.join(bad))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == ""


def test_group_by_bucket_orders_buckets_and_keeps_row_order():
    from serving.tokenization import group_by_bucket

    # lengths 9 and 3 pad to 16 and 4; 40 is over the last bucket and pads to it.
    assert group_by_bucket([9, 3, 4, 16, 1, 40], [4, 16, 32]) == [
        (4, [1, 2, 4]), (16, [0, 3]), (32, [5])]


class SteppedModel:
    """Each call waits for its own permit, so the test sees the order of calls and what is
    answered between them."""

    def __init__(self):
        self.shapes, self.permits, self.calls = [], threading.Semaphore(0), threading.Semaphore(0)

    def __call__(self, ids, mask):
        self.shapes.append(ids.shape)
        self.calls.release()
        assert self.permits.acquire(timeout=30)
        return np.zeros((len(ids), 2), np.float32)

    def step(self) -> None:
        """Let one call finish and wait until the next one starts (or 1 s passes)."""
        self.permits.release()
        self.calls.acquire(timeout=1)


def _held_batcher(now):
    """A batcher whose worker is held inside a first call, with a fake clock."""
    model = SteppedModel()
    b = MicroBatcher(model, buckets=[4, 8], max_batch=8, max_wait_s=0.0,
                     clock=lambda: now[0])
    b.start()
    b.submit([[1]])
    assert model.calls.acquire(timeout=30)  # the worker is in call 1
    return b, model


def test_the_fullest_bucket_goes_first_and_each_call_answers_at_once():
    now = [0.0]
    b, model = _held_batcher(now)
    short = b.submit([[1, 2]])                      # bucket 4, one row
    longs = [b.submit([[1] * 7]) for _ in range(3)]  # bucket 8, three rows
    model.step()  # call 1 ends; call 2 starts
    assert model.shapes[1] == (3, 8)  # the fuller bucket, one call
    model.step()  # call 2 ends: its jobs are answered while call 3 still runs
    assert all(f.done() for f in longs) and not short.done()
    assert model.shapes[2] == (1, 4)
    model.step()
    assert short.result(timeout=30).shape == (1, 2)
    b.stop()


def test_a_job_waiting_longer_than_the_fairness_bound_goes_before_a_fuller_bucket():
    from serving.runner import FAIRNESS_S

    now = [0.0]
    b, model = _held_batcher(now)
    short = b.submit([[1, 2]])
    longs = [b.submit([[1] * 7]) for _ in range(3)]
    now[0] += FAIRNESS_S * 2  # the short job has waited too long
    model.step()
    assert model.shapes[1] == (1, 4)
    model.step()
    assert short.done()
    model.step()
    assert all(f.result(timeout=30).shape == (1, 2) for f in longs)
    b.stop()


def test_an_idle_batcher_does_not_wait_to_fill_a_batch():
    # A 10 s fill wait: at idle (no recent arrivals) the lone request must not pay it.
    b = MicroBatcher(lambda ids, mask: np.zeros((len(ids), 2), np.float32), buckets=[4],
                     max_batch=8, max_wait_s=10.0)
    b.start()
    assert b.submit([[1]]).result(timeout=5).shape == (1, 2)
    b.stop()


def test_a_cancelled_request_gets_no_model_work_and_does_not_stop_the_worker():
    now = [0.0]
    b, model = _held_batcher(now)
    gone = b.submit([[1] * 7])
    kept = b.submit([[1] * 6])
    assert gone.cancel()  # its caller gave up while it waited
    model.step()
    assert model.shapes[1] == (1, 8)  # only the kept job reached the model
    model.step()
    assert kept.result(timeout=30).shape == (1, 2)
    # The worker is alive: a later request is answered.
    later = b.submit([[1]])
    model.step()
    assert later.result(timeout=30).shape == (1, 2)
    b.stop()


def test_a_priority_job_goes_ahead_of_older_and_fuller_standard_jobs():
    from serving.runner import FAIRNESS_S

    now = [0.0]
    b, model = _held_batcher(now)
    longs = [b.submit([[1] * 7]) for _ in range(3)]  # bucket 8: three rows, and overdue
    now[0] += FAIRNESS_S * 2
    urgent = b.submit([[1, 2]], priority=True)       # bucket 4: one row, just arrived
    model.step()
    assert model.shapes[1] == (1, 4)  # the priority job alone, before the older, fuller bucket
    model.step()
    assert urgent.done() and not any(f.done() for f in longs)
    assert model.shapes[2] == (3, 8)
    model.step()
    assert all(f.result(timeout=30).shape == (1, 2) for f in longs)
    assert b.depth() == 0
    b.stop()


def test_priority_jobs_take_the_batch_first_and_standard_ones_fill_what_is_left():
    now = [0.0]
    b, model = _held_batcher(now)  # max_batch 8
    standard = [b.submit([[1] * 7] * 3) for _ in range(2)]   # 6 rows, bucket 8
    urgent = [b.submit([[1] * 8] * 3, priority=True) for _ in range(3)]  # 9 rows, bucket 8
    model.step()
    assert model.shapes[1] == (6, 8)  # two priority jobs; the third does not fit, and no
    model.step()                      # standard job rides ahead of it
    assert all(f.done() for f in urgent[:2]) and not urgent[2].done()
    assert model.shapes[2] == (6, 8)  # the last priority job, then a standard one to fill
    model.step()
    assert urgent[2].done() and standard[0].done() and not standard[1].done()
    model.step()
    assert standard[1].result(timeout=30).shape == (3, 2)
    b.stop()
