"""Tokenising texts and padding them to a few fixed bucket lengths: what the endpoint and the
pipeline's export/validate stages share. Imports only numpy and `tokenizers` (never
transformers, TF or the pipeline), so a serving process stays "SavedModel + tokenizer files".
Padding to a few bucket lengths keeps the number of distinct shapes TF traces small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np


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


def group_by_bucket(lengths: Sequence[int], buckets: Sequence[int]
                    ) -> List[Tuple[int, List[int]]]:
    """Row indices grouped by the bucket their length pads to, shortest bucket first; rows keep
    their order within a bucket. How the endpoint's batcher (and the benchmark's replay of its
    policy) cuts one collected batch into model calls of one shape each."""
    groups: Dict[int, List[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(bucket_length(n, buckets), []).append(i)
    return sorted(groups.items())


def pad(ids: Sequence[Sequence[int]], length: int) -> Tuple[np.ndarray, np.ndarray]:
    input_ids = np.zeros((len(ids), length), dtype=np.int32)  # [PAD] is id 0
    mask = np.zeros((len(ids), length), dtype=np.int32)
    for i, row in enumerate(ids):
        row = row[:length]
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return input_ids, mask


def default_buckets(max_length: int) -> List[int]:
    """Powers of two from 32 below `max_length`, then `max_length` itself."""
    return [b for b in (32, 64, 128, 256, 512) if b < max_length] + [max_length]
