"""Stage `train`: fit the BERT-style classifier on the train split, seeded and deterministic.

Every run is an MLflow run (params, per-epoch metrics, the training-curve plot, the
vocabulary). Writes the trained model (`build/train/model/`, transformers layout), the
per-epoch history `metrics/train_history.csv` (a DVC plot) and `metrics/train.json`.
The weights of the epoch with the best val accuracy are kept.

With TF_CONFIG naming a cluster of two or more workers it trains under
MultiWorkerMirroredStrategy (`pipeline/distribute.py`); only the chief writes the outputs
and the MLflow run, the other workers write theirs to a temporary folder and delete it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from pipeline import batching, distribute, modeling, paths, tracking
from pipeline.errors import fail, require, run_stage
from pipeline.io import read_json, read_jsonl, write_atomic, write_json
from pipeline.params import Tracking, Train, load
from serving import tokenization

HISTORY_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


@dataclass
class BestEpoch:
    """The epoch with the best val accuracy so far, and the model's weights after it."""

    val_accuracy: float = -1.0
    epoch: int = 0
    weights: Optional[List[np.ndarray]] = None


def make_dataset(ids: List[List[int]], labels: np.ndarray, p: Train, shuffle: bool,
                 shard: Tuple[int, int] = (0, 1)):
    """A tf.data pipeline of bucketed batches; reshuffled (seeded) on each epoch.

    `shard` (index, count): every worker makes the same global batches and yields rows
    index, index + count, ... of each (multi-worker training); (0, 1) is the whole batch.
    """
    import tensorflow as tf

    epoch = [0]
    index, count = shard

    def gen():
        rng = np.random.default_rng(p.seed + epoch[0]) if shuffle else None
        epoch[0] += 1
        for input_ids, mask, rows in batching.make_batches(ids, p.batch_size,
                                                           p.length_buckets, rng):
            if count > 1:
                part = slice(index, None, count)
                input_ids, mask, rows = input_ids[part], mask[part], rows[part]
            yield {"input_ids": input_ids, "attention_mask": mask}, labels[rows]

    spec = tf.TensorSpec([None, None], tf.int32)
    return tf.data.Dataset.from_generator(
        gen, output_signature=({"input_ids": spec, "attention_mask": spec},
                               tf.TensorSpec([None], tf.int32)))


def curve_png(history: List[Dict[str, float]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax1.set(title="loss", xlabel="epoch")
    ax2.plot(epochs, [h["accuracy"] for h in history], "o-", label="train")
    ax2.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val")
    ax2.set(title="accuracy", xlabel="epoch")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def history_csv(history: List[Dict[str, float]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue().encode()


class _NoTracking:
    """What a non-chief worker logs to: nothing (the chief's MLflow run is the record)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def train(p: Train, experiment: str, role: distribute.Role = distribute.SINGLE,
          root: Path = Path(".")) -> dict:
    """Fit and write the outputs under `root` (the workspace; a non-chief worker's is a
    temporary folder). `role` from TF_CONFIG; the default is single-worker training."""
    strategy = distribute.make_strategy(role)  # first: before any other TF op runs
    import tensorflow as tf
    from transformers import create_optimizer

    tf.keras.utils.set_random_seed(p.seed)
    tf.config.experimental.enable_op_determinism()

    label_names = read_json(paths.LABELS_FILE)
    tokenizer = tokenization.load_tokenizer(paths.TOKENIZER_DIR / "tokenizer.json", p.max_length)
    data = {}
    for split in ("train", "val"):
        rows = read_jsonl(paths.split_file(split))
        if not rows:
            fail(f"{paths.split_file(split)} is empty; run the prepare stage first")
        data[split] = (tokenization.encode(tokenizer, [r["text"] for r in rows]),
                       np.array([r["label"] for r in rows], dtype=np.int32))

    steps_per_epoch = -(-len(data["train"][0]) // p.batch_size)
    # A distributed dataset needs its length given (one pass over val: its batch count).
    validation_steps = -(-len(data["val"][0]) // p.batch_size) if strategy else None
    total_steps = steps_per_epoch * p.epochs
    with distribute.scope(strategy):  # the optimizer, model and metrics belong to it
        optimizer, schedule = create_optimizer(
            init_lr=p.learning_rate, num_train_steps=total_steps,
            num_warmup_steps=int(p.warmup_fraction * total_steps),
            weight_decay_rate=p.weight_decay)
    # repeat(): with steps_per_epoch Keras keeps one iterator across epochs; each pass
    # through the generator is one epoch with its own seeded shuffle.
    train_ds = distribute.dataset(strategy, lambda i, n: make_dataset(
        *data["train"], p, shuffle=True, shard=(i, n)).repeat())
    val_ds = distribute.dataset(strategy, lambda i, n: make_dataset(
        *data["val"], p, shuffle=False, shard=(i, n)))

    history: List[Dict[str, float]] = []
    best = BestEpoch()

    import mlflow

    log: Any = mlflow if role.is_chief else _NoTracking()

    class Track(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            row = {"epoch": epoch + 1,
                   **{k: round(float(logs[k]), 6) for k in HISTORY_FIELDS[1:5]},
                   "learning_rate": float(schedule(min((epoch + 1) * steps_per_epoch,
                                                       total_steps)))}
            history.append(row)
            log.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            if row["val_accuracy"] > best.val_accuracy:
                best.val_accuracy, best.epoch = row["val_accuracy"], epoch + 1
                best.weights = self.model.get_weights()

    run_context = (tracking.start_run(experiment, run_name=f"train-{p.init}") if role.is_chief
                   else contextlib.nullcontext())
    with run_context as run:
        log.log_params(tracking.flatten("train", p.model_dump()))
        log.log_params({"data.train_texts": len(data["train"][0]),
                        "tokenizer.vocab_size": tokenizer.get_vocab_size(),
                        "tf_version": tf.__version__})
        if role.distributed:
            log.log_params({"distribute.workers": role.num_workers})
        started = time.perf_counter()
        with distribute.scope(strategy):
            model = modeling.build(p, tokenizer.get_vocab_size(), len(label_names),
                                   pad_token_id=tokenizer.token_to_id("[PAD]"))
            model.compile(optimizer=optimizer,
                          loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
            if strategy:
                # Built here, in the scope, the weights get the same initial values as in a
                # single-worker run (where the first training step builds them); built by
                # the first distributed step, inside a replica, they would get other values.
                model(model.dummy_inputs)
        model.fit(train_ds, validation_data=val_ds, epochs=p.epochs,
                  steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
                  callbacks=[Track()],
                  verbose=1 if sys.stdout.isatty() else 2)
        wall = time.perf_counter() - started
        model.set_weights(best.weights)
        log.log_metrics({"best_val_accuracy": best.val_accuracy,
                         "train_wall_seconds": wall})
        png = curve_png(history)
        write_atomic(root / paths.PLOTS_DIR / "training_curve.png", png)
        log.log_artifact(str(root / paths.PLOTS_DIR / "training_curve.png"))
        log.log_artifact(str(paths.TOKENIZER_DIR / "vocab.txt"))
        run_id = run.info.run_id if run is not None else "(the chief's)"

    out = root / paths.TRAINED_MODEL_DIR
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    write_atomic(root / paths.METRICS_DIR / "train_history.csv", history_csv(history))
    summary = {"best_epoch": best.epoch, "best_val_accuracy": best.val_accuracy,
               "epochs": p.epochs, "steps_per_epoch": steps_per_epoch,
               "parameters": int(model.count_params())}
    write_json(root / paths.metrics_file("train"), summary)
    worker = f" ({role.describe()})" if role.distributed else ""
    print(f"train{worker}: best val accuracy {best.val_accuracy:.4f} at epoch {best.epoch}/"
          f"{p.epochs}, {summary['parameters']:,} parameters, {wall:.0f} s; "
          f"MLflow run {run_id}")
    return summary


def main() -> None:
    role = distribute.role_from_env()
    p = load(Train)
    experiment = load(Tracking).experiment
    require(paths.LABELS_FILE, paths.TOKENIZER_DIR / "tokenizer.json",
            *(paths.split_file(s) for s in ("train", "val")))
    if role.is_chief:
        train(p, experiment, role)
        return
    # The standard multi-worker pattern: every worker saves (saving may take part in
    # collectives), a non-chief into a folder of its own that it then deletes.
    with tempfile.TemporaryDirectory(prefix=f"tokenmeter-{role.task_type}{role.task_index}-") \
            as tmp:
        train(p, experiment, role, root=Path(tmp))
    print(f"train ({role.describe()}): not the chief; its outputs went to {tmp} (deleted)")


if __name__ == "__main__":
    run_stage("train", main)
