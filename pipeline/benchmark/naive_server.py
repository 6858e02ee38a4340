"""The product brief's naive design, kept only as the benchmark's reference: a threaded Flask app
that trusts an X-User-ID header, tokenizes each text twice, calls `model.predict` per request
and writes a `logging.info` billing line. Deliberately unfixed; it must never be served.

Run by the benchmark as `python -m pipeline.benchmark.naive_server MODEL_DIR PORT` on 127.0.0.1.
(Not the TF-IDF `baseline` stage: that one is a model; this is a server design.)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from serving.model_dir import (
    INPUT_NAMES,
    OUTPUT_NAME,
    SIGNATURE,
    TOKENIZER_FILE,
    read_card,
    read_labels,
)

log = logging.getLogger("naive-billing")


def build_app(model_dir: Path):
    import numpy as np
    import tensorflow as tf
    from flask import Flask, jsonify, request
    from tokenizers import Tokenizer

    loaded = tf.saved_model.load(str(model_dir))
    sig = loaded.signatures[SIGNATURE]

    class Wrapped(tf.keras.Model):
        """The SavedModel behind a Keras model, so the brief's `model.predict` call works."""

        def call(self, inputs):
            return sig(**{INPUT_NAMES[0]: inputs[0], INPUT_NAMES[1]: inputs[1]})[OUTPUT_NAME]

    model = Wrapped()
    max_len = int(read_card(model_dir)["max_input_tokens"])
    labels = read_labels(model_dir)
    # One tokenizer shared by all request threads, as in the brief (the "Already borrowed"
    # pitfall: changing its truncation while another thread encodes fails that request).
    tok = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    app = Flask("naive")

    @app.post("/v1/analyze")
    def analyze():
        user = request.headers.get("X-User-ID", "anonymous")  # trusted as sent
        text = request.get_json(force=True)["text"]
        tok.no_truncation()
        count = len(tok.encode(text).ids)  # first tokenization: the bill
        tok.enable_truncation(max_len)
        enc = tok.encode(text)  # second tokenization: the model input
        ids = np.zeros((1, max_len), np.int32)
        mask = np.zeros((1, max_len), np.int32)
        ids[0, : len(enc.ids)] = enc.ids
        mask[0, : len(enc.ids)] = 1
        probs = model.predict([ids, mask], verbose=0)[0]
        k = int(probs.argmax())
        out = len(tok.encode(labels[k], add_special_tokens=False).ids)
        log.info("billing user=%s input_tokens=%d output_tokens=%d", user, count, out)
        return jsonify({"label": labels[k], "score": float(probs[k]),
                        "usage": {"input_tokens": count, "output_tokens": out,
                                  "total_tokens": count + out}})

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    model.predict([np.zeros((1, max_len), np.int32)] * 2, verbose=0)  # build + trace once
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("port", type=int)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log per request
    app = build_app(args.model_dir)
    # Loopback only; threaded is the brief's setting (one thread per request).
    app.run(host="127.0.0.1", port=args.port, threaded=True, debug=False)


if __name__ == "__main__":
    main()
