"""Evaluate a multi-interest model (or the MostPopular baseline) on valid/test users.

``split_df`` has the columns of ``valid.parquet`` / ``test.parquet``: ``user``, ``history`` (chronological
item ids) and ``truth`` (held-out item ids). Items are ranked over the whole catalogue 1..N (padding row 0
excluded) and scored with :mod:`eimf.evaluation.metrics` (Recall / NDCG / HitRate at each N in ``topk``).

Users with an empty ``truth`` are skipped (not counted in ``n_users``).

An approximate index (anything but ``Flat``, e.g. what ``retrieval.index=auto`` picks for a large catalogue) never
stands alone behind the plain metric names: when the table is at hand (or an exact index is given), the plain keys
(``recall@50``, ...) are the **exact** metrics, ``ann/<metric>@N`` the same metrics through the approximate index,
and ``ann/recall_of_exact@N`` the share of the exact top-N the approximate index found (mean over users). Without
the table (the sharded training's collective index), the plain keys are the approximate ones and
``approximate_index`` = 1 says so.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from eimf.data.sampling import last_items
from eimf.evaluation.metrics import MetricAccumulator, pad_truth, row_isin, truth_sizes
from eimf.evaluation.retrieval import ItemIndex, merge_candidates

InterestFn = Callable[[torch.Tensor, torch.Tensor], "np.ndarray | torch.Tensor"]


def history_batch(histories: Sequence[Sequence[int]], maxlen: int) -> Tuple[np.ndarray, np.ndarray]:
    """Last ``maxlen`` items of each history, right-padded with 0: :func:`eimf.data.sampling.last_items`."""
    return last_items(histories, maxlen)


def _iter_batches(split_df: pd.DataFrame, batch_size: int) -> Iterator[pd.DataFrame]:
    for start in range(0, len(split_df), batch_size):
        yield split_df.iloc[start : start + batch_size]


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _check_topk(topk) -> Tuple[int, ...]:
    ks = tuple(sorted({int(n) for n in topk}))
    if not ks or ks[0] <= 0:
        raise ValueError(f"topk must hold positive cut-offs, got {topk!r}")
    return ks


def evaluate(
    interest_fn: InterestFn,
    item_embeddings,
    split_df: pd.DataFrame,
    topk: Sequence[int] = (20, 50),
    batch_size: int = 1024,
    maxlen: int = 50,
    exclude_history: bool = False,
    index: Optional[ItemIndex] = None,
    accumulator: Optional[MetricAccumulator] = None,
    exact_index: Optional[ItemIndex] = None,
) -> Dict[str, float]:
    """Full-ranking metrics of a multi-interest model on the users of ``split_df``.

    ``interest_fn(hist, mask)`` gets ``hist`` LongTensor ``[B, maxlen]`` (last ``maxlen`` history items,
    right-padded with 0) and ``mask`` BoolTensor ``[B, maxlen]`` (True = real item) and returns the interests
    ``[B, K, d]`` (or ``[B, d]``), as a numpy array or a torch tensor. ``item_embeddings`` is the ``[N + 1, d]``
    item table (row 0 = padding), numpy or torch. Each interest retrieves the top-``max(topk)`` items with
    faiss; candidates are merged by score (see :mod:`eimf.evaluation.retrieval`).

    ``exclude_history``: drop every item of the user's whole ``history`` column (not only the last
    ``maxlen``) from the recommendations. The ComiRec protocol keeps them (default False).

    ``index``: a prebuilt :class:`ItemIndex` over the same table (saves rebuilding it for valid + test).

    ``accumulator``: collect into this one, e.g. ``MetricAccumulator(topk, keep_users=True)`` for each user's
    metrics (its ``topk`` is used; with an approximate index it collects the exact metrics).

    ``exact_index``: the exact (``Flat``) index over the same table, used beside an approximate ``index`` (see the
    module doc); None: built from ``item_embeddings`` when ``index`` is approximate and the table is given.

    Returns ``{"recall@20": ..., "ndcg@20": ..., "hitrate@20": ..., "recall@50": ..., ..., "n_users": int}``.
    """
    ks = _check_topk(topk)
    if index is None:
        index = ItemIndex(item_embeddings)
    acc = accumulator if accumulator is not None else MetricAccumulator(ks)
    n = acc.max_n
    ref = None if index.exact else exact_index
    if ref is None and not index.exact and item_embeddings is not None:
        ref = ItemIndex(item_embeddings, index="Flat")
    ann = _AnnTally(acc.topk) if ref is not None else None
    for part in _iter_batches(split_df, batch_size):
        histories = list(part["history"])
        truth = pad_truth(list(part["truth"]))
        hist, mask = history_batch(histories, maxlen)
        with torch.no_grad():
            interests = _to_numpy(interest_fn(torch.from_numpy(hist), torch.from_numpy(mask)))
        if interests.shape[0] != len(part):
            raise ValueError(f"interest_fn returned {interests.shape[0]} rows for {len(part)} users")
        exclude = histories if exclude_history else None
        recs, _ = index.search_multi(interests, n, exclude=exclude)
        if ann is not None:
            exact, _ = ref.search_multi(interests, n, exclude=exclude)
            ann.add(recs, exact, truth)
            recs = exact
        acc.add(recs, truth, users=part["user"].to_numpy() if "user" in part else None)
    out = acc.result()
    if ann is not None:
        out.update(ann.result())
    elif not index.exact:
        out["approximate_index"] = 1.0
    return out


class _AnnTally:
    """The approximate index's metrics and its recall of the exact top-N, over the users with a truth."""

    def __init__(self, topk: Sequence[int]):
        self.topk = tuple(topk)
        self.metrics = MetricAccumulator(self.topk)
        self.found = {k: 0.0 for k in self.topk}
        self.users = 0

    def add(self, recs: np.ndarray, exact: np.ndarray, truth: np.ndarray) -> None:
        self.metrics.add(recs, truth)
        scored = truth_sizes(truth) > 0  # the users MetricAccumulator counts
        for k in self.topk:
            hit = row_isin(recs[scored, :k], exact[scored, :k]) & (recs[scored, :k] > 0)
            self.found[k] += float((hit.sum(1) / np.maximum(1, (exact[scored, :k] > 0).sum(1))).sum())
        self.users += int(scored.sum())

    def result(self) -> Dict[str, float]:
        out = {f"ann/{k}": v for k, v in self.metrics.result().items() if k != "n_users"}
        out.update({f"ann/recall_of_exact@{k}": v / max(1, self.users) for k, v in self.found.items()})
        return out


def item_popularity(train_df: pd.DataFrame, n_items: Optional[int] = None) -> np.ndarray:
    """``[N + 1]`` occurrence counts of each item id over the train split's ``items`` sequences (0 = padding,
    always 0)."""
    seqs = [np.asarray(s, dtype=np.int64) for s in train_df["items"]]
    flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    flat = flat[flat > 0]
    counts = np.bincount(flat, minlength=(n_items or 0) + 1).astype(np.int64)
    counts[0] = 0
    return counts


def most_popular(
    train_df: pd.DataFrame,
    split_df: pd.DataFrame,
    topk: Sequence[int] = (20, 50),
    exclude_history: bool = False,
    batch_size: int = 1024,
) -> Dict[str, float]:
    """MostPopular baseline: every user gets the ``max(topk)`` items most frequent in the **train split**
    (popularity from the train sequences, not from the global re-indexing, so valid/test truth does not leak
    in; ties go to the smaller id, i.e. the globally more frequent item). Items never seen in training are
    never recommended. Same metric keys as :func:`evaluate`.
    """
    ks = _check_topk(topk)
    n = ks[-1]
    counts = item_popularity(train_df)
    seen = np.nonzero(counts)[0]
    order = seen[np.argsort(-counts[seen], kind="stable")]  # seen is ascending: ties keep the smaller id
    acc = MetricAccumulator(ks)
    for part in _iter_batches(split_df, batch_size):
        truth = pad_truth(list(part["truth"]))
        b = len(part)
        if exclude_history:
            histories = list(part["history"])
            extra = max((len(h) for h in histories), default=0)
            cand = order[: n + extra]
            ids = np.broadcast_to(cand, (b, len(cand)))
            scores = np.broadcast_to(counts[cand].astype(np.float32), (b, len(cand)))
            recs, _ = merge_candidates(ids, scores, n, exclude=histories)
        else:
            top = np.zeros(n, dtype=np.int64)
            top[: min(n, len(order))] = order[:n]
            recs = np.broadcast_to(top, (b, n))
        acc.add(recs, truth)
    return acc.result()
