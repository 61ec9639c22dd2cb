"""eimf.data.sampling: training batches (random cut) and evaluation batches."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from eimf.data.sampling import TrainSampler, eval_batches

pytestmark = pytest.mark.timeout(60)


def _seqs(lengths):
    # item value encodes (user, position): 1000 * (u + 1) + p, never 0
    return [np.arange(n, dtype=np.int64) + 1000 * (u + 1) for u, n in enumerate(lengths)]


def test_shapes_dtypes_and_exclusion():
    seqs = _seqs([3, 4, 5, 20, 100])
    s = TrainSampler(seqs, maxlen=8, batch_size=32, min_cut=4, seed=1)
    assert s.n_excluded == 2 and s.n_users == 3  # len 3 and 4 cannot make an example (len <= min_cut)
    hist, mask, target = next(iter(s))
    assert hist.shape == mask.shape == (32, 8) and target.shape == (32,)
    assert hist.dtype == np.int64 and mask.dtype == bool and target.dtype == np.int64


def test_history_is_the_last_maxlen_items_before_the_cut_right_padded():
    seqs = _seqs([5, 12, 60])
    L, min_cut = 10, 4
    s = TrainSampler(seqs, maxlen=L, batch_size=4000, min_cut=min_cut, seed=3)
    hist, mask, target = s.sample()
    users, ks = target // 1000 - 1, target % 1000
    lens = np.array([5, 12, 60])[users]
    assert (ks >= min_cut).all() and (ks < lens).all()
    assert set(np.unique(ks[users == 0])) == {4}  # len 5: only k = 4
    assert set(np.unique(ks[users == 2])) == set(range(4, 60))  # the whole range is drawn
    for h, m, u, k in zip(hist, mask, users, ks):
        expected = seqs[u][:k][-L:]
        n = len(expected)
        assert m[:n].all() and not m[n:].any()  # right padding: real items first
        assert (h[:n] == expected).all() and (h[n:] == 0).all()


def test_users_drawn_uniformly_and_seeded():
    seqs = _seqs([6] * 4)
    a = TrainSampler(seqs, maxlen=5, batch_size=20000, seed=7).sample()
    b = TrainSampler(seqs, maxlen=5, batch_size=20000, seed=7).sample()
    assert all((x == y).all() for x, y in zip(a, b))
    counts = np.bincount(a[2] // 1000 - 1)
    assert counts.min() > 4500  # 5000 expected each
    c = TrainSampler(seqs, maxlen=5, batch_size=20000, seed=8).sample()
    assert not (a[2] == c[2]).all()


def test_iteration_continues_the_stream_and_finite_mode():
    s = TrainSampler(_seqs([30, 40]), maxlen=5, batch_size=8, seed=0, num_batches=3)
    assert len(list(s)) == 3 and len(s) == 3
    s2 = TrainSampler(_seqs([30, 40]), maxlen=5, batch_size=8, seed=0)
    first = next(iter(s2))[2]
    second = next(iter(s2))[2]
    assert not (first == second).all()


def test_no_eligible_user_is_an_error():
    with pytest.raises(ValueError, match="min_cut"):
        TrainSampler(_seqs([2, 4]), maxlen=5, batch_size=8, min_cut=4)


def test_throughput():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 3000, size=n) for n in rng.integers(20, 500, size=5000)]
    s = TrainSampler(seqs, maxlen=50, batch_size=128, seed=0)
    it = iter(s)
    next(it)
    t0 = time.perf_counter()
    n = 200
    for _ in range(n):
        next(it)
    rate = n * 128 / (time.perf_counter() - t0)
    assert rate > 50_000, f"{rate:.0f} examples/s"


def test_eval_batches():
    df = pd.DataFrame({"user": [3, 5, 9], "history": [np.arange(1, 8), np.array([4]), np.arange(10, 13)],
                       "truth": [np.array([8, 9]), np.array([5]), np.array([1])]})
    batches = list(eval_batches(df, maxlen=4, batch_size=2))
    assert len(batches) == 2
    users, hist, mask, truth, history = batches[0]
    assert users.tolist() == [3, 5]
    assert hist.tolist() == [[4, 5, 6, 7], [4, 0, 0, 0]]
    assert mask.tolist() == [[True] * 4, [True, False, False, False]]
    assert [t.tolist() for t in truth] == [[8, 9], [5]] and history[0].tolist() == list(range(1, 8))
    assert batches[1][1].tolist() == [[10, 11, 12, 0]]
