"""Stage `train`: fit the BERT-style classifier on the train split, seeded and deterministic.

Every run is an MLflow run (params, per-epoch metrics, the training-curve plot, the
vocabulary). Writes the trained model (`build/train/model/`, transformers layout), the
per-epoch history `metrics/train_history.csv` (a DVC plot) and `metrics/train.json`.
The weights of the epoch with the best val accuracy are kept.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from pipeline import batching, modeling, paths, tracking
from pipeline.errors import fail, run_stage
from pipeline.io import read_json, read_jsonl, write_atomic, write_json
from pipeline.params import Train, Tracking, load

HISTORY_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


def make_dataset(ids: List[List[int]], labels: np.ndarray, p: Train, shuffle: bool):
    """A tf.data pipeline of bucketed batches; reshuffled (seeded) on each epoch."""
    import tensorflow as tf

    epoch = [0]

    def gen():
        rng = np.random.default_rng(p.seed + epoch[0]) if shuffle else None
        epoch[0] += 1
        for input_ids, mask, rows in batching.make_batches(ids, p.batch_size,
                                                           p.length_buckets, rng):
            yield {"input_ids": input_ids, "attention_mask": mask}, labels[rows]

    spec = tf.TensorSpec([None, None], tf.int32)
    return tf.data.Dataset.from_generator(
        gen, output_signature=({"input_ids": spec, "attention_mask": spec},
                               tf.TensorSpec([None], tf.int32)))


def mask_tokens(input_ids: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                vocab_size: int, first_regular_id: int, mask_id: int,
                probability: float):
    """BERT's masking: pick `probability` of real tokens; 80% [MASK], 10% random, 10% kept.

    Returns (masked ids, labels) with label -100 where no prediction is asked.
    Special tokens (ids below `first_regular_id`) are never picked.
    """
    labels = np.full_like(input_ids, -100)
    chosen = (mask == 1) & (input_ids >= first_regular_id) & (rng.random(input_ids.shape)
                                                                < probability)
    labels[chosen] = input_ids[chosen]
    r = rng.random(input_ids.shape)
    ids = input_ids.copy()
    ids[chosen & (r < 0.8)] = mask_id
    swap = chosen & (r >= 0.8) & (r < 0.9)
    ids[swap] = rng.integers(first_regular_id, vocab_size, size=int(swap.sum()))
    return ids, labels


def _masked_lm_class():
    import tensorflow as tf

    class MaskedPositionsLM(tf.keras.Model):
        """Trains a TFBertForMaskedLM, scoring the vocabulary only at masked positions.

        The stock model projects every position onto the vocabulary; with 15% masked that
        is ~85% wasted work (an epoch took 2.5x a classification epoch here).
        """

        def __init__(self, mlm):
            super().__init__()
            self.mlm = mlm

        def train_step(self, data):
            labels = data["labels"]
            with tf.GradientTape() as tape:
                seq = self.mlm.bert(input_ids=data["input_ids"],
                                    attention_mask=data["attention_mask"],
                                    training=True).last_hidden_state
                where = tf.where(labels != -100)
                picked = tf.gather_nd(seq, where)[tf.newaxis]  # [1, n_masked, hidden]
                logits = self.mlm.mlm(picked, training=True)[0]
                per_token = tf.keras.losses.sparse_categorical_crossentropy(
                    tf.gather_nd(labels, where), logits, from_logits=True)
                # divide_no_nan: a batch where nothing was masked contributes 0, not NaN
                loss = tf.math.divide_no_nan(tf.reduce_sum(per_token),
                                             tf.cast(tf.size(per_token), per_token.dtype))
            variables = self.mlm.trainable_variables
            self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return {"loss": loss}

    return MaskedPositionsLM


def pretrain_encoder(p: Train, ids: List[List[int]], tokenizer, num_labels: int) -> Path:
    """Masked-LM pre-training of a fresh encoder on the train texts; returns its directory."""
    import tensorflow as tf
    from transformers import TFBertForMaskedLM, create_optimizer

    config = modeling.scratch_config(p, tokenizer.get_vocab_size(), num_labels,
                                     tokenizer.token_to_id("[PAD]"))
    mlm = TFBertForMaskedLM(config)
    mlm(mlm.dummy_inputs)  # create the variables under their checkpoint names
    vocab_size = tokenizer.get_vocab_size()
    mask_id = tokenizer.token_to_id("[MASK]")
    first_regular = 1 + max(tokenizer.token_to_id(t) for t in
                            ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))
    epoch = [0]

    def gen():
        rng = np.random.default_rng(10_000 + p.seed + epoch[0])
        epoch[0] += 1
        for input_ids, attn, _rows in batching.make_batches(ids, p.batch_size,
                                                            p.length_buckets, rng):
            masked, labels = mask_tokens(input_ids, attn, rng, vocab_size, first_regular,
                                         mask_id, p.mask_probability)
            yield {"input_ids": masked, "attention_mask": attn, "labels": labels}

    spec = tf.TensorSpec([None, None], tf.int32)
    ds = tf.data.Dataset.from_generator(gen, output_signature={
        "input_ids": spec, "attention_mask": spec, "labels": spec}).repeat()
    steps = -(-len(ids) // p.batch_size)
    optimizer, _ = create_optimizer(init_lr=p.pretrain_learning_rate,
                                    num_train_steps=steps * p.pretrain_epochs,
                                    num_warmup_steps=int(p.warmup_fraction * steps
                                                         * p.pretrain_epochs),
                                    weight_decay_rate=p.weight_decay)
    model = _masked_lm_class()(mlm)
    model.compile(optimizer=optimizer)
    print(f"train: masked-LM pre-training, {p.pretrain_epochs} epoch(s)", flush=True)
    hist = model.fit(ds, epochs=p.pretrain_epochs, steps_per_epoch=steps,
                     verbose=1 if sys.stdout.isatty() else 2)
    out = paths.TRAIN_DIR / "encoder"
    mlm.save_pretrained(str(out))
    import mlflow

    for i, loss in enumerate(hist.history["loss"], start=1):
        mlflow.log_metric("pretrain_mlm_loss", float(loss), step=i)
    return out


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


def train(p: Train, experiment: str) -> dict:
    import tensorflow as tf
    from transformers import create_optimizer

    tf.keras.utils.set_random_seed(p.seed)
    tf.config.experimental.enable_op_determinism()

    label_names = read_json(paths.LABELS_FILE)
    tokenizer = batching.load_tokenizer(paths.TOKENIZER_DIR / "tokenizer.json", p.max_length)
    data = {}
    for split in ("train", "val"):
        rows = read_jsonl(paths.split_file(split))
        if not rows:
            fail(f"{paths.split_file(split)} is empty; run the prepare stage first")
        data[split] = (batching.encode(tokenizer, [r["text"] for r in rows]),
                       np.array([r["label"] for r in rows], dtype=np.int32))

    steps_per_epoch = -(-len(data["train"][0]) // p.batch_size)
    total_steps = steps_per_epoch * p.epochs
    optimizer, schedule = create_optimizer(
        init_lr=p.learning_rate, num_train_steps=total_steps,
        num_warmup_steps=int(p.warmup_fraction * total_steps), weight_decay_rate=p.weight_decay)
    # repeat(): with steps_per_epoch Keras keeps one iterator across epochs; each pass
    # through the generator is one epoch with its own seeded shuffle.
    train_ds = make_dataset(*data["train"], p, shuffle=True).repeat()
    val_ds = make_dataset(*data["val"], p, shuffle=False)

    history: List[Dict[str, float]] = []
    best = {"val_accuracy": -1.0, "epoch": 0, "weights": None}

    import mlflow

    class Track(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            row = {"epoch": epoch + 1,
                   **{k: round(float(logs[k]), 6) for k in HISTORY_FIELDS[1:5]},
                   "learning_rate": float(schedule(min((epoch + 1) * steps_per_epoch,
                                                       total_steps)))}
            history.append(row)
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            if row["val_accuracy"] > best["val_accuracy"]:
                best.update(val_accuracy=row["val_accuracy"], epoch=epoch + 1,
                            weights=self.model.get_weights())

    with tracking.start_run(experiment, run_name=f"train-{p.init}") as run:
        mlflow.log_params(tracking.flatten("train", p.model_dump()))
        mlflow.log_params({"data.train_texts": len(data["train"][0]),
                           "tokenizer.vocab_size": tokenizer.get_vocab_size(),
                           "tf_version": tf.__version__})
        started = time.perf_counter()
        encoder_dir = None
        if p.pretrain_epochs:
            encoder_dir = pretrain_encoder(p, data["train"][0], tokenizer, len(label_names))
        model = modeling.build(p, tokenizer.get_vocab_size(), len(label_names),
                               pad_token_id=tokenizer.token_to_id("[PAD]"),
                               encoder_dir=encoder_dir)
        model.compile(optimizer=optimizer,
                      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        model.fit(train_ds, validation_data=val_ds, epochs=p.epochs,
                  steps_per_epoch=steps_per_epoch, callbacks=[Track()],
                  verbose=1 if sys.stdout.isatty() else 2)
        wall = time.perf_counter() - started
        model.set_weights(best["weights"])
        mlflow.log_metrics({"best_val_accuracy": best["val_accuracy"],
                            "train_wall_seconds": wall})
        png = curve_png(history)
        write_atomic(paths.PLOTS_DIR / "training_curve.png", png)
        mlflow.log_artifact(str(paths.PLOTS_DIR / "training_curve.png"))
        mlflow.log_artifact(str(paths.TOKENIZER_DIR / "vocab.txt"))
        run_id = run.info.run_id

    out = paths.TRAINED_MODEL_DIR
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    write_atomic(paths.METRICS_DIR / "train_history.csv", history_csv(history))
    summary = {"best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"],
               "epochs": p.epochs, "steps_per_epoch": steps_per_epoch,
               "parameters": int(model.count_params())}
    write_json(paths.metrics_file("train"), summary)
    print(f"train: best val accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}/"
          f"{p.epochs}, {summary['parameters']:,} parameters, {wall:.0f} s; "
          f"MLflow run {run_id}")
    return summary


def main() -> None:
    p = load(Train)
    experiment = load(Tracking).experiment
    for f in (paths.LABELS_FILE, paths.TOKENIZER_DIR / "tokenizer.json"):
        if not Path(f).is_file():
            fail(f"{f} is missing; run `dvc repro` (prepare and tokenizer come first)")
    train(p, experiment)


if __name__ == "__main__":
    run_stage("train", main)
