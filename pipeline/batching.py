"""Cutting token ids into length-bucketed, padded batches for training and batch inference.

Used by `train` and `validate`; the tokenizer and padding primitives live in
`serving.tokenization` (the endpoint uses the same ones). Imports only numpy.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

from serving.tokenization import bucket_length, pad

Batch = Tuple[np.ndarray, np.ndarray, np.ndarray]  # input_ids, attention_mask, row indices


def make_batches(ids: Sequence[Sequence[int]], batch_size: int, buckets: Sequence[int],
                 rng: Optional[np.random.Generator] = None, pool: int = 50) -> Iterator[Batch]:
    """Group similar lengths into batches, each padded to its bucket.

    With `rng`: shuffle, sort within pools of `pool` batches by length, shuffle batch
    order (training). Without: sort all by length, keep that order (inference).
    """
    order = np.arange(len(ids))
    lengths = np.array([len(r) for r in ids])
    if rng is None:
        order = order[np.argsort(lengths, kind="stable")]
        chunks = [order]
    else:
        rng.shuffle(order)
        size = batch_size * pool
        chunks = [c[np.argsort(lengths[c], kind="stable")]
                  for c in (order[i: i + size] for i in range(0, len(order), size))]
    batches = [c[i: i + batch_size] for c in chunks for i in range(0, len(c), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    for rows in batches:
        length = bucket_length(int(lengths[rows].max()), buckets)
        input_ids, mask = pad([ids[i] for i in rows], length)
        yield input_ids, mask, rows
