"""The whole chain on the smoke profile, run for real with `dvc repro` in a workspace.

Checks the contracts later parts rely on: disjoint splits, the tokenizer's [CLS]/[SEP]
counting, the SavedModel signature and its parity with Keras, determinism of forced
re-runs, and validate failing (naming the gate) on a broken model.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import paths
from serving.model_dir import INPUT_NAMES, OUTPUT_NAME, SIGNATURE
from tests.conftest import dvc, run_stage

pytestmark = pytest.mark.slow

MODEL = Path("models/sentiment/1")


def _params(ws: Path) -> dict:
    """The workspace's params.yaml: the defaults merged with the smoke profile."""
    return yaml.safe_load((ws / "params.yaml").read_text(encoding="utf-8"))


def _rows(ws: Path, split: str):
    return [json.loads(line) for line in (ws / paths.split_file(split)).read_text().splitlines()]


def test_splits_are_disjoint_and_labels_never_conflict(smoke_ws):
    seen = {}
    for split in paths.SPLITS:
        rows = _rows(smoke_ws, split)
        assert rows, f"{split} is empty"
        for r in rows:
            assert r["text"] == " ".join(r["text"].split()), "text not normalised"
            assert r["text"] not in seen, f"text in both {seen.get(r['text'])} and {split}"
            seen[r["text"]] = split
    report = json.loads((smoke_ws / "metrics/prepare.json").read_text())
    assert sum(report["splits"][s]["count"] for s in paths.SPLITS) == len(seen) == \
        _params(smoke_ws)["prepare"]["max_texts"]
    assert report["cleaning"]["conflicting_dropped"] > 0  # the real corpus has some


def test_tokenizer_loads_in_bert_tokenizer_fast_and_counts_cls_sep(smoke_ws):
    from tokenizers import Tokenizer
    from transformers import BertTokenizerFast

    for folder in (smoke_ws / paths.TOKENIZER_DIR, smoke_ws / MODEL):
        fast = BertTokenizerFast.from_pretrained(str(folder))
        raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
        for text in ["这本书很好看", "Hello ThinkPad 很好用 😀", r["text"] if (
                r := _rows(smoke_ws, "test")[0]) else ""]:
            ids = fast(text)["input_ids"]
            assert ids[0] == fast.cls_token_id and ids[-1] == fast.sep_token_id
            assert ids == raw.encode(text).ids
            assert len(ids) == len(fast.tokenize(text)) + 2
        # every CJK character is its own token
        assert fast.tokenize("这本书") == ["这", "本", "书"]


def test_exported_signature_and_keras_parity(smoke_ws):
    import tensorflow as tf

    from pipeline import modeling

    loaded = tf.saved_model.load(str(smoke_ws / MODEL))
    fn = loaded.signatures[SIGNATURE]
    _, inputs = fn.structured_input_signature
    assert sorted(inputs) == sorted(INPUT_NAMES)
    for spec in inputs.values():
        assert spec.dtype == tf.int32 and spec.shape.as_list() == [None, None]
    out_spec = fn.structured_outputs[OUTPUT_NAME]
    assert out_spec.dtype == tf.float32 and out_spec.shape.as_list() == [None, 2]

    # A batch the export never saw, with ragged lengths (padding and mask matter).
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smoke_ws / MODEL / "tokenizer.json"))
    texts = [r["text"] for r in _rows(smoke_ws, "val")[:6]] + ["好", "差评"]
    enc = [tok.encode(t).ids[:64] for t in texts]
    width = max(map(len, enc))
    ids = np.array([e + [0] * (width - len(e)) for e in enc], dtype=np.int32)
    mask = (np.arange(width)[None, :] < np.array([len(e) for e in enc])[:, None]).astype(np.int32)
    served = fn(input_ids=tf.constant(ids), attention_mask=tf.constant(mask))[OUTPUT_NAME].numpy()
    keras = modeling.load_trained(smoke_ws / paths.TRAINED_MODEL_DIR)
    expected = tf.nn.softmax(keras(input_ids=ids, attention_mask=mask, training=False).logits,
                             axis=-1).numpy()
    assert np.abs(served - expected).max() < 1e-5
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)

    card = json.loads((smoke_ws / MODEL / "model_card.json").read_text())
    assert card["exported_with"]["tensorflow"] == tf.__version__
    assert card["max_input_tokens"] == _params(smoke_ws)["train"]["max_length"]
    assert set(card["hashes"]) >= {"data/train", "data/test", "vocab.txt"}


def test_validate_report_and_dvc_metrics(smoke_ws):
    report = json.loads((smoke_ws / "metrics/validate.json").read_text())
    assert report["passed"] is True
    assert all(g["passed"] for g in report["gates"].values())
    assert report["parity_max_abs_diff"] < 1e-4
    assert 0.65 <= report["test"]["accuracy"] <= 1
    assert report["latency"]["p50_ms"] > 0
    assert set(report["behaviour"]) == {"minimum", "directional", "invariance"}
    assert all(b["cases"] > 0 for b in report["behaviour"].values())
    assert "behaviour" in report["gates"]
    rows = list(csv.DictReader((smoke_ws / "metrics/test_predictions.csv").open()))
    assert len(rows) == report["test"]["texts"] == len(_rows(smoke_ws, "test"))
    acc = sum(r["actual"] == r["predicted"] for r in rows) / len(rows)
    assert acc == pytest.approx(report["test"]["accuracy"], abs=1e-6)
    shown = dvc(smoke_ws, "metrics", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    assert "validate.json" in shown.stdout and "baseline.json" in shown.stdout
    plots = dvc(smoke_ws, "plots", "show", "-o", "rendered")
    assert plots.returncode == 0, plots.stderr
    html = (smoke_ws / "rendered" / "index.html").read_text()
    for title in ("Training loss", "Training accuracy", "Test confusion matrix"):
        assert title in html


def test_noop_repro_runs_no_stage(smoke_ws):
    result = dvc(smoke_ws, "repro")
    assert result.returncode == 0, result.stderr
    assert "Running stage" not in result.stdout
    assert "up to date" in result.stdout.lower()


def _deterministic_outputs(ws: Path) -> dict:
    out = {}
    for name in ("prepare.json", "tokenizer.json", "baseline.json", "train.json",
                 "train_history.csv", "test_predictions.csv"):
        out[name] = (ws / "metrics" / name).read_bytes()
    validate = json.loads((ws / "metrics/validate.json").read_text())
    validate.pop("latency")  # timings are the one thing that may differ between runs
    out["validate.json"] = validate
    out["vocab.txt"] = (ws / MODEL / "vocab.txt").read_bytes()
    return out


def test_forced_rerun_gives_identical_metrics_and_predictions(ws_copy):
    before = _deterministic_outputs(ws_copy)
    result = dvc(ws_copy, "repro", "--force")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    after = _deterministic_outputs(ws_copy)
    for name in before:
        assert before[name] == after[name], f"{name} differs between two forced runs"


def test_validate_fails_naming_the_gate_on_a_broken_model(ws_copy):
    import tensorflow as tf

    model_dir = ws_copy / MODEL
    loaded = tf.saved_model.load(str(model_dir))
    rng = np.random.default_rng(0)
    fn = loaded.signatures[SIGNATURE]
    assert fn.variables
    for var in fn.variables:  # scramble the trained weights, keep shapes and signature
        var.assign(rng.normal(0, 0.5, var.shape.as_list()).astype(var.dtype.as_numpy_dtype))
    broken = ws_copy / "broken"
    tf.saved_model.save(loaded, str(broken), signatures={SIGNATURE: fn})
    for f in ("saved_model.pb", "variables"):
        target = model_dir / f
        if target.is_dir():
            import shutil

            shutil.rmtree(target)
        else:
            target.unlink()
        (broken / f).rename(target)

    result = run_stage(ws_copy, "validate")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: validate: gate failed:")
    assert "parity" in last and "validate.max_parity_diff" in last
    assert "Traceback" not in result.stderr
    report = json.loads((ws_copy / "metrics/validate.json").read_text())
    assert report["passed"] is False and report["gates"]["parity"]["passed"] is False


def test_training_is_an_mlflow_run_with_params_metrics_and_artifacts(smoke_ws):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{smoke_ws / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("training")
    assert experiment is not None
    # The local store keeps its artifacts beside the database, where the README says.
    assert experiment.artifact_location == (smoke_ws / "mlruns" / "artifacts").resolve().as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert runs, "no MLflow run recorded"
    run = runs[0]
    epochs = _params(smoke_ws)["train"]["epochs"]
    assert run.data.params["train.epochs"] == str(epochs)
    assert run.data.params["train.init"] == "scratch"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(1, epochs + 1))
    rows = list(csv.DictReader((smoke_ws / "metrics/train_history.csv").open()))
    assert [float(r["val_accuracy"]) for r in rows] == [m.value for m in history]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training_curve.png", "vocab.txt"} <= artifacts
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="vocab.txt",
                                                tracking_uri=uri)
    assert Path(local).read_bytes() == (smoke_ws / paths.TOKENIZER_DIR / "vocab.txt").read_bytes()
