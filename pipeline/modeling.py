"""The classifier: a BERT encoder + classification head from transformers' TF classes.

Owns building it (from scratch with a small `BertConfig`, or from a pretrained checkpoint)
and loading a trained one. With `train.ngram_orders` set, the class is
`pipeline.ngrams.TFBertNgramForSequenceClassification` (hashed id-n-gram embeddings added
to the token embeddings); empty, the plain `TFBertForSequenceClassification`. Used by
`train` and `export`; never by `validate` or serving, which see only the SavedModel.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import fail
from pipeline.params import Train
from serving.errors import first_line


def scratch_config(p: Train, vocab_size: int, num_labels: int, pad_token_id: int = 0):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=p.hidden_size, num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads, intermediate_size=p.intermediate_size,
        hidden_dropout_prob=p.dropout, attention_probs_dropout_prob=p.dropout,
        max_position_embeddings=p.max_length, num_labels=num_labels, pad_token_id=pad_token_id,
        **ngram_config(p))


def ngram_config(p: Train) -> dict:
    """The config keys of the n-gram embeddings (none without them: the plain classifier)."""
    if not p.ngram_orders:
        return {}
    return {"ngram_orders": list(p.ngram_orders), "ngram_buckets": p.ngram_buckets}


def model_class(ngrams: bool):
    if ngrams:
        from pipeline.ngrams import TFBertNgramForSequenceClassification

        return TFBertNgramForSequenceClassification
    from transformers import TFBertForSequenceClassification

    return TFBertForSequenceClassification


def build(p: Train, vocab_size: int, num_labels: int, pad_token_id: int = 0):
    """The classifier: from scratch (a small BertConfig) or from the checkpoint `p.init`."""
    cls = model_class(bool(p.ngram_orders))
    if p.init == "scratch":
        return cls(scratch_config(p, vocab_size, num_labels, pad_token_id))
    try:
        model = cls.from_pretrained(p.init, num_labels=num_labels, **ngram_config(p))
    except Exception as exc:  # OSError / HTTP / ValueError: all mean "cannot load it"
        fail(f"train.init: cannot load '{p.init}' (use 'scratch', a local TF BERT checkpoint "
             f"dir, or a hub name with TOKENMETER_ONLINE=1): {first_line(exc)[:200]}")
    if model.config.vocab_size != vocab_size:
        fail(f"train.init '{p.init}' has a {model.config.vocab_size}-token vocabulary but the "
             f"tokenizer has {vocab_size}; set tokenizer.pretrained to the same checkpoint")
    return model


def load_trained(model_dir: Path):
    """The trained model, of the class its config.json says (n-gram keys or not)."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        fail(f"{model_dir} holds no trained model; run the train stage first")
    ngrams = bool(json.loads(config_file.read_text(encoding="utf-8")).get("ngram_orders"))
    return model_class(ngrams).from_pretrained(str(model_dir))
