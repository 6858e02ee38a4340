"""Stage `export`: the trained Keras model -> a plain SavedModel at models/<name>/<version>/.

The `serving_default` signature takes `input_ids` and `attention_mask` (int32,
[batch, seq]) and returns `probabilities` ([batch, num_labels], float32) - a layout TF
Serving or Triton loads as it is. Beside it: the tokenizer files (the billing unit), the
label map, a model card, and a parity batch (inputs + the Keras model's outputs) that
`validate` checks the SavedModel against in a fresh process.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import numpy as np

from pipeline import modeling, paths
from pipeline.errors import require, run_stage
from pipeline.io import read_json, read_jsonl, sha256_file, write_json
from pipeline.params import PARAMS_FILE, Export, Train, load, read_yaml
from pipeline.tokenizer import TOKENIZER_FILES
from serving import tokenization
from serving.model_dir import (
    CARD_FILE,
    INPUT_NAMES,
    LABELS_FILE,
    OUTPUT_NAME,
    PARITY_FILE,
    SIGNATURE,
)

CARD_PARAMS = ("prepare", "tokenizer", "train", "export")


def make_serving_module(model):
    import tensorflow as tf

    class Serving(tf.Module):
        def __init__(self, keras_model):
            super().__init__()
            self.model = keras_model

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name=n)
                                      for n in INPUT_NAMES])
        def serve(self, input_ids, attention_mask):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                training=False).logits
            return {OUTPUT_NAME: tf.nn.softmax(logits, axis=-1)}

    return Serving(model)


def export(out_dir: Path, e: Export, max_length: int) -> dict:
    import tensorflow as tf
    import transformers

    model = modeling.load_trained(paths.TRAINED_MODEL_DIR)
    module = make_serving_module(model)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(module, str(tmp), signatures={SIGNATURE: module.serve})

    for name in TOKENIZER_FILES:
        shutil.copy2(paths.TOKENIZER_DIR / name, tmp / name)
    label_names = read_json(paths.LABELS_FILE)
    write_json(tmp / LABELS_FILE, {str(i): n for i, n in enumerate(label_names)})

    # The parity batch: the first test texts, padded together; Keras outputs recorded now.
    texts = [r["text"] for r in read_jsonl(paths.split_file("test"))[: e.parity_batch_size]]
    tok = tokenization.load_tokenizer(paths.TOKENIZER_DIR / "tokenizer.json", max_length)
    ids = tokenization.encode(tok, texts)
    input_ids, mask = tokenization.pad(ids, max(len(r) for r in ids))
    keras_probs = tf.nn.softmax(model(input_ids=input_ids, attention_mask=mask,
                                      training=False).logits, axis=-1).numpy()
    np.savez(tmp / PARITY_FILE, input_ids=input_ids, attention_mask=mask,
             probabilities=keras_probs.astype(np.float32))

    # Only the sections that shape the model: the card must change exactly when they do
    # (dvc.yaml lists the same sections as this stage's params).
    params = {k: v for k, v in read_yaml(PARAMS_FILE).items() if k in CARD_PARAMS}
    card = {
        "name": e.name, "version": e.version,
        "task": "text classification (sentiment)",
        "labels": label_names,
        "signature": {"name": SIGNATURE, "inputs": {n: ["batch", "seq", "int32"]
                                                    for n in INPUT_NAMES},
                      "outputs": {OUTPUT_NAME: ["batch", len(label_names), "float32"]}},
        "max_input_tokens": max_length,
        "billing": "input tokens = ids the model receives, [CLS] and [SEP] included",
        "architecture": model.config.to_diff_dict(),
        "parameters": int(model.count_params()),
        "metrics": {"train": read_json(paths.metrics_file("train")),
                    "baseline": read_json(paths.metrics_file("baseline"))["test"]},
        "hashes": {**{f"data/{s}": sha256_file(paths.split_file(s)) for s in paths.SPLITS},
                   "vocab.txt": sha256_file(paths.TOKENIZER_DIR / "vocab.txt"),
                   "tokenizer.json": sha256_file(paths.TOKENIZER_DIR / "tokenizer.json")},
        "exported_with": {"tensorflow": tf.__version__,
                          "transformers": transformers.__version__,
                          "python": platform.python_version()},
        "params": params,
    }
    write_json(tmp / CARD_FILE, card)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out_dir)  # the version dir appears whole or not at all
    return card


def main() -> None:
    e = load(Export)
    t = load(Train)
    require(paths.TRAINED_MODEL_DIR / "config.json", paths.TOKENIZER_DIR / "tokenizer.json",
            paths.LABELS_FILE, paths.split_file("test"), paths.metrics_file("train"),
            paths.metrics_file("baseline"))
    out = paths.model_dir(e.name, e.version)
    # Other versions of the model are kept: TF Serving serves the highest by default.
    card = export(out, e, t.max_length)
    print(f"export: {out} (signature {SIGNATURE}: {', '.join(INPUT_NAMES)} -> {OUTPUT_NAME}, "
          f"{card['parameters']:,} parameters, TF {card['exported_with']['tensorflow']})")


if __name__ == "__main__":
    run_stage("export", main)
