"""Per-user top-N metrics: Recall@N, HitRate@N and standard NDCG@N, vectorised over a batch of users.

Conventions (docs/architecture.md, docs/design.md section 3):

* ``recs`` is a ``[B, M]`` integer array of recommended item ids, best first, ``M >= N``. Id 0 is padding
  (a list with fewer than ``M`` real items is right-padded with 0) and is never a hit. A repeated id in one
  list counts once, at its first (best) position.
* The ground truth of a user is the **set of distinct items** of its ``truth`` list (0 ignored). A user who
  consumed the same item twice in the held-out part has it once in the truth; ``|truth|`` is the number of
  distinct items. (ComiRec counts hits against the set but divides by the list length; we do not.)
* ``Recall@N = |top-N ∩ truth| / |truth|``.
* ``HitRate@N = 1`` if ``top-N ∩ truth`` is not empty, else 0.
* ``NDCG@N = DCG / IDCG`` with ``DCG = sum over hit ranks r (1-based, r <= N) of 1 / log2(r + 1)`` and
  ``IDCG = sum_{r=1}^{min(|truth|, N)} 1 / log2(r + 1)`` (the standard definition; ComiRec's own NDCG
  normalises differently and is deliberately not reproduced).
* Users with an empty truth set have no defined recall/NDCG: :class:`MetricAccumulator` skips them (they are
  not counted in ``n_users``); the per-user functions return NaN for them.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import pandas as pd

TruthLike = Union[np.ndarray, Sequence[Sequence[int]]]

METRICS = ("recall", "ndcg", "hitrate")


def pad_truth(truth: TruthLike) -> np.ndarray:
    """Ragged truth lists -> ``[B, T]`` int64 array right-padded with 0 (a 2-D array is returned as is)."""
    if isinstance(truth, np.ndarray) and truth.ndim == 2:
        return truth.astype(np.int64, copy=False)
    rows = [np.asarray(t, dtype=np.int64).ravel() for t in truth]
    width = max((len(r) for r in rows), default=0)
    out = np.zeros((len(rows), max(width, 1)), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def first_occurrence(a: np.ndarray) -> np.ndarray:
    """``[B, M]`` bool: True where ``a[b, j]`` is non-zero and does not occur earlier in row ``b``."""
    a = np.asarray(a)
    order = np.argsort(a, axis=1, kind="stable")  # equal values keep their left-to-right order
    s = np.take_along_axis(a, order, axis=1)
    first_sorted = np.ones_like(s, dtype=bool)
    first_sorted[:, 1:] = s[:, 1:] != s[:, :-1]
    out = np.empty_like(first_sorted)
    np.put_along_axis(out, order, first_sorted, axis=1)
    return out & (a != 0)


def row_isin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[B, M]`` bool: ``a[r, j] in b[r, :]``, row by row, without a Python loop over rows.

    Both arrays hold non-negative ids; each id is shifted by its row number times ``(max id + 1)`` so one flat
    sorted ``np.isin`` answers every row at once (memory O(B * (M + T)), unlike broadcasting's O(B * M * T)).
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"row counts differ: {a.shape[0]} vs {b.shape[0]}")
    if a.size == 0 or b.size == 0:
        return np.zeros(a.shape, dtype=bool)
    base = int(max(a.max(), b.max())) + 1
    rows = np.arange(a.shape[0], dtype=np.int64)[:, None] * base
    return np.isin(a + rows, b + rows)


def hit_matrix(recs: np.ndarray, truth: TruthLike) -> np.ndarray:
    """``[B, M]`` bool: position ``j`` of user ``b``'s list is a hit (first occurrence of a truth item)."""
    recs = np.asarray(recs, dtype=np.int64)
    t = pad_truth(truth)
    return row_isin(recs, t) & first_occurrence(recs)


def truth_sizes(truth: TruthLike) -> np.ndarray:
    """``[B]`` number of distinct non-zero items per truth row."""
    t = pad_truth(truth)
    return first_occurrence(t).sum(axis=1)


_DISCOUNT_CACHE = {"d": np.zeros(0)}


def _discounts(n: int) -> np.ndarray:
    """``1 / log2(r + 1)`` for ranks r = 1..n."""
    d = _DISCOUNT_CACHE["d"]
    if len(d) < n:
        d = 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))
        _DISCOUNT_CACHE["d"] = d
    return d[:n]


def metrics_from_hits(hits: np.ndarray, n_truth: np.ndarray, n: int) -> Dict[str, np.ndarray]:
    """Per-user recall/ndcg/hitrate at ``n`` from a hit matrix (``[B, M]``, ``M >= n``) and truth sizes."""
    hits = np.asarray(hits, dtype=bool)
    if hits.shape[1] < n:
        raise ValueError(f"need at least {n} recommendations per user, got {hits.shape[1]}")
    h = hits[:, :n]
    n_truth = np.asarray(n_truth, dtype=np.float64)
    k = h.sum(axis=1).astype(np.float64)
    disc = _discounts(n)
    dcg = (h * disc).sum(axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(disc)])  # ideal[m] = IDCG with m relevant items in the top n
    idcg = ideal[np.minimum(n_truth, n).astype(np.int64)]
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(n_truth > 0, k / n_truth, np.nan)
        ndcg = np.where(n_truth > 0, dcg / idcg, np.nan)
    hitrate = np.where(n_truth > 0, (k > 0).astype(np.float64), np.nan)
    return {"recall": recall, "ndcg": ndcg, "hitrate": hitrate}


def user_metrics(recs: np.ndarray, truth: TruthLike, n: int) -> Dict[str, np.ndarray]:
    """Per-user ``{"recall", "ndcg", "hitrate"}`` arrays ``[B]`` at cut-off ``n`` (NaN for empty truth)."""
    return metrics_from_hits(hit_matrix(recs, truth), truth_sizes(truth), n)


def recall_at_n(recs, truth, n: int) -> np.ndarray:
    return user_metrics(recs, truth, n)["recall"]


def ndcg_at_n(recs, truth, n: int) -> np.ndarray:
    return user_metrics(recs, truth, n)["ndcg"]


def hitrate_at_n(recs, truth, n: int) -> np.ndarray:
    return user_metrics(recs, truth, n)["hitrate"]


class MetricAccumulator:
    """Sums per-user metrics over batches; :meth:`result` gives the user averages.

    >>> acc = MetricAccumulator(topk=(20, 50))
    >>> acc.add(recs, truth)          # any number of batches; recs has >= 50 columns
    >>> acc.result()                  # {"recall@20": ..., "ndcg@20": ..., "hitrate@20": ..., ..., "n_users": 600}
    """

    def __init__(self, topk: Iterable[int] = (20, 50), keep_users: bool = False):
        self.topk = tuple(sorted({int(n) for n in topk}))
        if not self.topk or self.topk[0] <= 0:
            raise ValueError(f"topk must hold positive cut-offs, got {topk!r}")
        self.sums = {f"{m}@{n}": 0.0 for n in self.topk for m in METRICS}
        self.n_users = 0
        self.n_skipped = 0  # users with an empty truth set
        #: ``keep_users``: each user's metrics too (paired comparisons resample users), see :meth:`per_user`.
        self._rows: Optional[List[Dict[str, np.ndarray]]] = [] if keep_users else None

    @property
    def max_n(self) -> int:
        return self.topk[-1]

    def add(self, recs: np.ndarray, truth: TruthLike, users: Optional[Sequence[int]] = None) -> None:
        """``users``: the rows' user ids (needed with ``keep_users``)."""
        recs = np.asarray(recs, dtype=np.int64)
        if recs.ndim != 2:
            raise ValueError(f"recs must be [B, M], got shape {recs.shape}")
        if len(recs) == 0:
            return
        hits = hit_matrix(recs, truth)
        sizes = truth_sizes(truth)
        valid = sizes > 0
        self.n_skipped += int((~valid).sum())
        self.n_users += int(valid.sum())
        kept = None
        if self._rows is not None:
            if users is None or len(users) != len(recs):
                raise ValueError("MetricAccumulator(keep_users=True).add needs one user id per row of recs")
            kept = {"user": np.asarray(users, dtype=np.int64)[valid]}
        for n in self.topk:
            per_user = metrics_from_hits(hits[valid], sizes[valid], n)
            for m in METRICS:
                self.sums[f"{m}@{n}"] += float(per_user[m].sum())
                if kept is not None:
                    kept[f"{m}@{n}"] = np.asarray(per_user[m], dtype=np.float64)
        if kept is not None:
            self._rows.append(kept)

    def per_user(self) -> "pd.DataFrame":
        """One row per scored user: ``user`` and every ``metric@n`` (their means are :meth:`result`)."""
        if self._rows is None:
            raise RuntimeError("per_user() needs MetricAccumulator(keep_users=True)")
        cols = ["user"] + [f"{m}@{n}" for n in self.topk for m in METRICS]
        if not self._rows:
            return pd.DataFrame({c: [] for c in cols})
        return pd.DataFrame({c: np.concatenate([r[c] for r in self._rows]) for c in cols})

    def result(self) -> Dict[str, float]:
        denom = max(self.n_users, 1)
        out = {k: v / denom for k, v in self.sums.items()}
        out["n_users"] = self.n_users
        return out
