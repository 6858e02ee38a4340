"""Tokenising texts and cutting them into length-bucketed, padded batches.

Shared by `train`, `export` and `validate`; imports only numpy and `tokenizers` (never
transformers or TF) so the validate process stays "SavedModel + tokenizer files only".
Padding to a few fixed bucket lengths keeps the number of distinct shapes TF traces small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

Batch = Tuple[np.ndarray, np.ndarray, np.ndarray]  # input_ids, attention_mask, row indices


def load_tokenizer(tokenizer_file: Path, max_length: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def encode(tokenizer, texts: Sequence[str]) -> List[List[int]]:
    return [e.ids for e in tokenizer.encode_batch(list(texts))]


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return buckets[-1]


def pad(ids: Sequence[Sequence[int]], length: int) -> Tuple[np.ndarray, np.ndarray]:
    input_ids = np.zeros((len(ids), length), dtype=np.int32)  # [PAD] is id 0
    mask = np.zeros((len(ids), length), dtype=np.int32)
    for i, row in enumerate(ids):
        row = row[:length]
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return input_ids, mask


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


def default_buckets(max_length: int) -> List[int]:
    """Powers of two from 32 below `max_length`, then `max_length` itself."""
    return [b for b in (32, 64, 128, 256, 512) if b < max_length] + [max_length]
