"""Metrics against hand-computed cases (standard NDCG, not ComiRec's)."""
import math

import numpy as np
import pytest

from eimf.evaluation.metrics import (
    MetricAccumulator,
    hit_matrix,
    pad_truth,
    row_isin,
    truth_sizes,
    user_metrics,
)

L2 = 1 / math.log2(2)  # rank 1 -> 1.0
L3 = 1 / math.log2(3)  # rank 2 -> 0.6309297536
L4 = 1 / math.log2(4)  # rank 3 -> 0.5


def test_hand_case_truth_3_7():
    # truth {3, 7}; recs [7, 1, 3, 5]
    recs = np.array([[7, 1, 3, 5]])
    truth = [[3, 7]]
    at2 = user_metrics(recs, truth, 2)
    # top-2 = [7, 1]: one hit at rank 1. recall 1/2; DCG = 1; IDCG = 1 + 1/log2(3) = 1.6309297536
    assert at2["recall"][0] == pytest.approx(0.5)
    assert at2["hitrate"][0] == 1.0
    assert at2["ndcg"][0] == pytest.approx(1.0 / 1.6309297536)  # 0.613147
    assert at2["ndcg"][0] == pytest.approx(0.613147, abs=1e-6)
    at3 = user_metrics(recs, truth, 3)
    # top-3 = [7, 1, 3]: hits at ranks 1 and 3. recall 1; DCG = 1 + 1/log2(4) = 1.5; IDCG as above
    assert at3["recall"][0] == pytest.approx(1.0)
    assert at3["hitrate"][0] == 1.0
    assert at3["ndcg"][0] == pytest.approx(1.5 / 1.6309297536)  # 0.919721
    assert at3["ndcg"][0] == pytest.approx(0.919721, abs=1e-6)


def test_idcg_truncated_when_truth_larger_than_n():
    truth = [[1, 2, 3, 4, 5]]  # |truth| = 5 > N = 2: IDCG over 2 positions = 1 + 1/log2(3)
    m = user_metrics(np.array([[9, 1]]), truth, 2)
    assert m["recall"][0] == pytest.approx(1 / 5)
    assert m["ndcg"][0] == pytest.approx(L3 / (L2 + L3))  # 0.386853
    assert m["ndcg"][0] == pytest.approx(0.386853, abs=1e-6)
    perfect = user_metrics(np.array([[2, 1]]), truth, 2)
    assert perfect["ndcg"][0] == pytest.approx(1.0)  # a perfect top-2 scores 1 although recall is 0.4
    assert perfect["recall"][0] == pytest.approx(0.4)


def test_no_hit_and_padding_and_repeats():
    m = user_metrics(np.array([[4, 5, 6]]), [[1]], 3)
    assert (m["recall"][0], m["ndcg"][0], m["hitrate"][0]) == (0.0, 0.0, 0.0)
    # padding 0 in the list is never a hit, even if truth were padded with 0
    assert user_metrics(np.array([[0, 0, 1]]), np.array([[1, 0]]), 3)["ndcg"][0] == pytest.approx(L4 / 1.0)
    # truth is a set: [3, 3, 7] has two distinct items
    assert truth_sizes([[3, 3, 7], [5]]).tolist() == [2, 1]
    assert user_metrics(np.array([[3, 8]]), [[3, 3, 7]], 2)["recall"][0] == pytest.approx(0.5)
    # a repeated recommendation counts once, at its first position
    rep = user_metrics(np.array([[7, 7, 3]]), [[3, 7]], 3)
    assert rep["recall"][0] == pytest.approx(1.0)
    assert rep["ndcg"][0] == pytest.approx((L2 + L4) / (L2 + L3))


def test_vectorised_rows_are_independent():
    recs = np.array([[7, 1, 3], [1, 2, 3], [3, 2, 1]])
    truth = [[3, 7], [9], [1, 2, 3, 4]]
    m = user_metrics(recs, truth, 3)
    assert m["recall"] == pytest.approx([1.0, 0.0, 0.75])
    assert m["hitrate"] == pytest.approx([1.0, 0.0, 1.0])
    assert m["ndcg"] == pytest.approx([1.5 / (L2 + L3), 0.0, 1.0])
    assert hit_matrix(recs, truth).tolist() == [[True, False, True], [False] * 3, [True] * 3]


def test_row_isin_matches_python():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 30, size=(20, 15))
    b = rng.integers(0, 30, size=(20, 6))
    expect = np.array([[x in set(b[i]) for x in a[i]] for i in range(len(a))])
    assert (row_isin(a, b) == expect).all()


def test_accumulator_averages_and_skips_empty_truth():
    acc = MetricAccumulator(topk=(3, 2))
    acc.add(np.array([[7, 1, 3]]), [[3, 7]])
    acc.add(np.array([[1, 2, 3], [5, 6, 7]]), [[9], []])  # the empty-truth user is skipped
    r = acc.result()
    assert r["n_users"] == 2 and acc.n_skipped == 1
    assert set(r) == {"n_users"} | {f"{m}@{n}" for m in ("recall", "ndcg", "hitrate") for n in (2, 3)}
    assert r["recall@2"] == pytest.approx(0.25)
    assert r["recall@3"] == pytest.approx(0.5)
    assert r["hitrate@2"] == pytest.approx(0.5)
    assert r["ndcg@3"] == pytest.approx(1.5 / (L2 + L3) / 2)
    with pytest.raises(ValueError):
        MetricAccumulator(topk=(5,)).add(np.array([[1, 2]]), [[1]])  # fewer than N recommendations


def test_pad_truth():
    assert pad_truth([[1, 2], [3]]).tolist() == [[1, 2], [3, 0]]
    assert pad_truth([[], []]).shape == (2, 1)
