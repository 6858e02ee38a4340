"""Length-bucketed batching: every row once, padded to its bucket, with the right mask."""

from __future__ import annotations

import numpy as np

from pipeline import batching
from serving import tokenization


def _ids(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(5, 100, size=int(k))) for k in rng.integers(1, 120, size=n)]


def test_every_row_appears_once_padded_to_its_bucket():
    ids = _ids(257)
    buckets = [32, 64, 128]
    seen = []
    for input_ids, mask, rows in batching.make_batches(ids, 16, buckets,
                                                       np.random.default_rng(1)):
        assert input_ids.shape == mask.shape and input_ids.shape[1] in buckets
        assert len(rows) <= 16
        for r, row in enumerate(rows):
            n = len(ids[row])
            assert mask[r].sum() == n and mask[r, :n].all()
            assert list(input_ids[r, :n]) == ids[row]
            assert not input_ids[r, n:].any()
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(257))


def test_shuffle_is_seeded_and_inference_order_is_by_length():
    ids = _ids(100)
    a = [r.tolist() for *_, r in batching.make_batches(ids, 8, [128], np.random.default_rng(5))]
    b = [r.tolist() for *_, r in batching.make_batches(ids, 8, [128], np.random.default_rng(5))]
    c = [r.tolist() for *_, r in batching.make_batches(ids, 8, [128], np.random.default_rng(6))]
    assert a == b and a != c
    order = [i for *_, r in batching.make_batches(ids, 8, [128]) for i in r]
    lengths = [len(ids[i]) for i in order]
    assert lengths == sorted(lengths)


def test_default_buckets_end_at_max_length():
    assert tokenization.default_buckets(256) == [32, 64, 128, 256]
    assert tokenization.default_buckets(100) == [32, 64, 100]
    assert tokenization.bucket_length(65, [32, 64, 128]) == 128
    assert tokenization.bucket_length(500, [32, 64, 128]) == 128  # truncated upstream
