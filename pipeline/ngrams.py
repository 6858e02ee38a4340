"""Hashed token-id n-gram embeddings inside the classifier, added to the token embeddings.

Owns the in-graph hashing of id n-grams into a fixed embedding table (`ngram_buckets`),
the layer that looks them up (`HashedNgramEmbeddings`), and
`TFBertNgramForSequenceClassification`, which adds, at each position, the embeddings of
the n-grams starting there to that token's own embedding before the BERT encoder.

Why: on this corpus the TF-IDF character 1-3-gram + logistic regression baseline beats a
small from-scratch transformer; the n-gram embeddings hand the encoder that local
evidence from the first layer on. The tokenizer makes most CJK characters one token, so
id n-grams are mostly character n-grams. Everything is computed from `input_ids` and
`attention_mask` in the graph, so the exported signature is unchanged, and only core ops
(cast, pad, slice, floormod, gather) are used: a SavedModel TF 2.9 loads.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import tensorflow as tf
from transformers import TFBertForSequenceClassification
from transformers.modeling_tf_outputs import TFSequenceClassifierOutput
from transformers.modeling_tf_utils import get_initializer, unpack_inputs

# Odd multipliers below 2**31: one for the order (so n-grams of different orders do not
# share a hash by construction), then one per position in the n-gram (orders up to 5,
# as train.ngram_orders allows). Ids are < 2**21, so the sum stays far below 2**63: no
# overflow, the same buckets on every platform.
_MULTIPLIERS = (1_000_003, 2_147_483_629, 1_610_612_741, 805_306_457, 402_653_189,
                201_326_611)


def ngram_buckets(input_ids: tf.Tensor, attention_mask: tf.Tensor, order: int,
                  buckets: int) -> Tuple[tf.Tensor, tf.Tensor]:
    """The bucket of the `order`-gram starting at each position ([batch, seq] int64) and
    whether it lies wholly inside the mask ([batch, seq] float32)."""
    ids = tf.cast(input_ids, tf.int64)
    mask = tf.cast(attention_mask, tf.float32)
    seq = tf.shape(ids)[1]
    # Padded by order-1 so every position has a window (those past the end are masked out).
    ids = tf.pad(ids, [[0, 0], [0, order - 1]])
    mask = tf.pad(mask, [[0, 0], [0, order - 1]])
    key = tf.fill(tf.shape(ids[:, :seq]), tf.constant(order * _MULTIPLIERS[0], tf.int64))
    valid = tf.ones_like(mask[:, :seq])
    for j in range(order):
        key += ids[:, j:j + seq] * _MULTIPLIERS[j + 1]
        valid *= mask[:, j:j + seq]
    return tf.math.floormod(key, buckets), valid


class HashedNgramEmbeddings(tf.keras.layers.Layer):
    """At each position, the sum of the embeddings of the n-grams (orders `orders`) that
    start there and lie inside the mask: [batch, seq, size]."""

    def __init__(self, orders: Sequence[int], buckets: int, size: int,
                 initializer_range: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.orders = tuple(orders)
        self.buckets = buckets
        self.size = size
        self.initializer_range = initializer_range

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        with tf.name_scope("embeddings"):
            self.embeddings = self.add_weight(
                name="weight", shape=[self.buckets, self.size],
                initializer=get_initializer(self.initializer_range))

    def call(self, input_ids: tf.Tensor, attention_mask: tf.Tensor) -> tf.Tensor:
        total = 0.0
        for order in self.orders:
            bucket, valid = ngram_buckets(input_ids, attention_mask, order, self.buckets)
            total += tf.gather(self.embeddings, bucket) * valid[:, :, None]
        return total


class TFBertNgramForSequenceClassification(TFBertForSequenceClassification):
    """TFBertForSequenceClassification whose encoder input is token embedding + hashed
    n-gram embeddings (position and token-type embeddings, LayerNorm: BERT's own).

    The config carries `ngram_orders` and `ngram_buckets` (saved in config.json by
    `save_pretrained`, so `from_pretrained` rebuilds the same model).
    """

    def __init__(self, config, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        self.ngrams = HashedNgramEmbeddings(config.ngram_orders, config.ngram_buckets,
                                            config.hidden_size, config.initializer_range,
                                            name="ngrams")

    @unpack_inputs
    def call(self, input_ids=None, attention_mask=None, token_type_ids=None,
             position_ids=None, head_mask=None, inputs_embeds=None, output_attentions=None,
             output_hidden_states=None, return_dict=None, labels=None, training=False):
        if input_ids is None:
            raise ValueError("the n-gram embeddings are computed from input_ids; pass them")
        if attention_mask is None:
            attention_mask = tf.ones_like(input_ids)
        embeds = tf.gather(self.bert.embeddings.weight, input_ids) \
            + self.ngrams(input_ids, attention_mask)
        outputs = self.bert(input_ids=None, inputs_embeds=embeds,
                            attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, head_mask=head_mask,
                            output_attentions=output_attentions,
                            output_hidden_states=output_hidden_states, return_dict=True,
                            training=training)
        logits = self.classifier(self.dropout(outputs.pooler_output, training=training))
        loss = None if labels is None else self.hf_compute_loss(labels=labels, logits=logits)
        if not return_dict:
            return (logits,) if loss is None else (loss, logits)
        return TFSequenceClassifierOutput(loss=loss, logits=logits,
                                          hidden_states=outputs.hidden_states,
                                          attentions=outputs.attentions)

    def build(self, input_shape=None):
        if self.built:
            return
        self.built = True
        # The parent's name scopes: save_pretrained/from_pretrained match weights by them.
        # Built in this order (encoder, n-grams, classifier) for the seeded initial values.
        with tf.name_scope(self.bert.name):
            self.bert.build(None)
        with tf.name_scope(self.ngrams.name):
            self.ngrams.build(None)
        with tf.name_scope(self.classifier.name):
            self.classifier.build([None, None, self.config.hidden_size])
