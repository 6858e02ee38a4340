"""The hashed id-n-gram embeddings (pipeline/ngrams.py) on a tiny untrained model, in
seconds: which n-grams count, padding invariance, and the same outputs after
save_pretrained + load_trained and in the exported SavedModel signature as in Keras."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import modeling
from pipeline.params import Train

tf = pytest.importorskip("tensorflow")

TINY = Train(max_length=32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
             length_buckets=[32], ngram_orders=[2, 3], ngram_buckets=97)


def _batch():
    """Two ragged rows, [CLS]=2 ... [SEP]=3 then padding (id 0, mask 0)."""
    ids = np.array([[2, 10, 11, 12, 13, 3, 0, 0], [2, 10, 11, 3, 0, 0, 0, 0]], np.int32)
    return ids, (ids > 0).astype(np.int32)


def test_an_ngram_counts_only_when_wholly_inside_the_mask():
    from pipeline.ngrams import ngram_buckets

    ids, mask = _batch()
    for order in (1, 2, 3):
        buckets, valid = ngram_buckets(tf.constant(ids), tf.constant(mask), order, 97)
        assert buckets.shape == ids.shape
        assert (0 <= buckets.numpy()).all() and (buckets.numpy() < 97).all()
        lengths = mask.sum(axis=1)
        np.testing.assert_array_equal(valid.numpy().sum(axis=1), lengths - order + 1)
    # the same n-gram hashes alike wherever it stands; the orders hash apart
    b2, _ = ngram_buckets(tf.constant(ids), tf.constant(mask), 2, 1 << 30)
    b1, _ = ngram_buckets(tf.constant(ids), tf.constant(mask), 1, 1 << 30)
    assert b2.numpy()[0, 1] == b2.numpy()[1, 1]  # (10, 11) in both rows
    assert b2.numpy()[0, 1] != b1.numpy()[0, 1]


@pytest.fixture(scope="module")
def tiny_model():
    tf.keras.utils.set_random_seed(0)
    return modeling.build(TINY, vocab_size=50, num_labels=2)


def test_padding_does_not_change_the_output(tiny_model):
    ids, mask = _batch()
    out = tiny_model(input_ids=ids, attention_mask=mask, training=False).logits.numpy()
    wide = tiny_model(input_ids=np.pad(ids, [[0, 0], [0, 5]]),
                      attention_mask=np.pad(mask, [[0, 0], [0, 5]]), training=False)
    np.testing.assert_allclose(wide.logits.numpy(), out, atol=1e-6)
    alone = tiny_model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4], training=False)
    np.testing.assert_allclose(alone.logits.numpy(), out[1:], atol=1e-6)


def test_reloaded_and_exported_models_match_keras(tiny_model, tmp_path):
    from pipeline.export import make_serving_module
    from pipeline.ngrams import TFBertNgramForSequenceClassification
    from serving.model_dir import OUTPUT_NAME, SIGNATURE

    ids, mask = _batch()
    keras = tf.nn.softmax(tiny_model(input_ids=ids, attention_mask=mask,
                                     training=False).logits, axis=-1).numpy()
    tiny_model.save_pretrained(str(tmp_path / "trained"))
    reloaded = modeling.load_trained(tmp_path / "trained")
    assert isinstance(reloaded, TFBertNgramForSequenceClassification)
    module = make_serving_module(reloaded)
    tf.saved_model.save(module, str(tmp_path / "saved"), signatures={SIGNATURE: module.serve})
    fn = tf.saved_model.load(str(tmp_path / "saved")).signatures[SIGNATURE]
    served = fn(input_ids=tf.constant(ids), attention_mask=tf.constant(mask))[OUTPUT_NAME]
    assert np.abs(served.numpy() - keras).max() < 1e-6


def test_no_orders_is_the_plain_classifier():
    from transformers import TFBertForSequenceClassification

    plain = modeling.build(TINY.model_copy(update={"ngram_orders": []}), 50, 2)
    assert type(plain) is TFBertForSequenceClassification
    assert "ngram_orders" not in plain.config.to_dict()
