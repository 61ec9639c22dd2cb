"""Typical-sample selection: which training users are worth an LLM annotation (docs/design.md section 4, point 2).

1. **Representation.** Each training user is represented by the interests the warm-up IBIM extracts from the
   last ``maxlen`` items of its training sequence (:func:`user_representations`). The K interests are made one
   vector by ``mean`` (default: mean of the L2-normalised interests, itself L2-normalised; invariant to the
   order of the interest slots, which capsule routing does not fix) or ``concat`` (the normalised interests
   side by side, divided by sqrt(K) so the result has unit norm; keeps which slot holds what).
2. **Clusters.** ``faiss.Kmeans`` (spherical by default: centroids are re-normalised, so the assignment is by
   cosine) with a fixed seed. ``distance`` is the squared L2 distance of a user to its centroid; on unit
   vectors with spherical k-means this is ``2 - 2 cos`` up to the centroid's norm.
3. **Quota per cluster.** The budget (a fraction of the users when <= 1, a count when > 1) is split across the
   clusters in proportion to their size by the largest-remainder (Hamilton) method, never above the number of
   eligible users of a cluster. When the budget is at least the number of non-empty clusters, every cluster
   first gets one user, so every region of interest space is annotated.
4. **Who in a cluster.** Typicality first, information second: the ``pool = ceil(pool_factor * q)`` users
   nearest the centroid form the candidate pool of a cluster with quota ``q``; of the pool the ``q`` with the
   longest histories are taken (ties: the nearer one, then the smaller user id). ``pool_factor = 1`` is
   "nearest only"; a large ``pool_factor`` approaches "longest only". A constraint on typicality with a
   preference inside it keeps both properties explicit, where a blended score would trade them at a rate
   nobody chose. ``rank_in_cluster`` is the 0-based order of the selected users of a cluster by distance.

Everything is deterministic given ``seed`` (faiss k-means seed and tie-breaking by user id).
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from eimf.data.sampling import eval_batches

log = logging.getLogger(__name__)

SELECTION_COLUMNS = ["user", "cluster", "distance", "history_len", "rank_in_cluster"]


# ------------------------------------------------------------------------------------ representations
def user_representations(model, train_df: pd.DataFrame, maxlen: int, batch_size: int = 1024,
                         cut: Optional[Sequence[int]] = None, device=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interests of every training user from its training sequence: ``(users [U], interests [U, K, d]
    float32, history_lens [U])``.

    The model sees the last ``maxlen`` items of ``items[:cut]`` (``cut`` per user; default the whole training
    sequence). ``history_lens`` are the lengths of ``items[:cut]`` (the information a prompt can draw on).
    """
    seqs = [np.asarray(s, dtype=np.int64) for s in train_df["items"]]
    if cut is not None:
        cut = np.asarray(cut, dtype=np.int64)
        if len(cut) != len(seqs):
            raise ValueError(f"cut has {len(cut)} entries for {len(seqs)} users")
        seqs = [s[: int(c)] for s, c in zip(seqs, cut)]
    frame = pd.DataFrame({"user": np.asarray(train_df["user"], dtype=np.int64), "history": seqs,
                          "truth": [np.zeros(0, dtype=np.int64)] * len(seqs)})
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:  # pragma: no cover - a model without parameters
            device = torch.device("cpu")
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for _, hist, mask, _, _ in eval_batches(frame, maxlen, batch_size):
                h = torch.as_tensor(hist, device=device)
                m = torch.as_tensor(mask, device=device)
                out.append(model.interests(h, m).float().cpu().numpy())
    finally:
        model.train(was_training)
    reprs = np.concatenate(out, axis=0) if out else np.zeros((0, 1, 1), dtype=np.float32)
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    return frame["user"].to_numpy(), reprs.astype(np.float32, copy=False), lens


def combine_interests(user_reprs: np.ndarray, how: str = "mean") -> np.ndarray:
    """``[U, K, d]`` (or ``[U, d]``) -> ``[U, D]`` float32 unit vectors (see module doc)."""
    x = np.asarray(user_reprs, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3:
        raise ValueError(f"user representations must be [U, K, d] or [U, d], got {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    if how == "mean":
        v = x.mean(axis=1)
    elif how == "concat":
        v = x.reshape(len(x), -1) / math.sqrt(x.shape[1])
    else:
        raise ValueError(f"unknown user representation {how!r} (mean | concat)")
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(v, dtype=np.float32)


# ------------------------------------------------------------------------------------------- budget
def resolve_budget(budget: float, n_users: int) -> int:
    """A fraction (<= 1; 1.0 is every user) or a count (> 1) -> a count in ``[0, n_users]``."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if budget > 1 and budget != int(budget):
        raise ValueError(f"budget {budget}: a fraction must be <= 1, a count a whole number")
    n = int(round(budget * n_users)) if budget <= 1 else int(budget)
    if 0 < budget <= 1:
        n = max(n, 1)
    return min(n, n_users)


def apportion(sizes: Sequence[int], total: int, min_one: bool = True) -> np.ndarray:
    """Split ``total`` across groups in proportion to ``sizes`` (largest remainder), each capped at its size.

    With ``min_one`` and ``total >= number of non-empty groups``, a non-empty group left at 0 then takes one
    from the group with the largest quota, so every group gets at least one. Ties in the remainders go to the
    larger group, then the lower index.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(min(total, sizes.sum()))
    quota = np.zeros(len(sizes), dtype=np.int64)
    if total <= 0:
        return quota
    while quota.sum() < total:
        room = sizes - quota
        left = total - int(quota.sum())
        w = np.where(room > 0, sizes, 0).astype(np.float64)
        share = left * w / w.sum()
        add = np.minimum(np.floor(share + 1e-9).astype(np.int64), room)
        rest = left - int(add.sum())
        if rest > 0:
            rem = np.where(room - add > 0, share - np.floor(share + 1e-9), -1.0)
            order = np.lexsort((np.arange(len(sizes)), -sizes, -rem))
            for i in order[:rest]:
                if rem[i] >= 0:
                    add[i] += 1
        if add.sum() == 0:  # pragma: no cover - cannot happen while room remains, kept as a guard
            break
        quota += add
    if min_one and total >= int((sizes > 0).sum()):
        for i in np.nonzero((sizes > 0) & (quota == 0))[0]:
            donor = int(np.lexsort((np.arange(len(sizes)), -sizes, -quota))[0])
            quota[donor] -= 1
            quota[i] += 1
    return quota


# ---------------------------------------------------------------------------------------- selection
def _kmeans(x: np.ndarray, n_clusters: int, seed: int, spherical: bool, niter: int):
    import faiss  # after torch (imported above): the faiss-cpu wheels can crash when imported first

    km = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=int(seed), spherical=spherical,
                      max_points_per_centroid=max(256, math.ceil(len(x) / n_clusters)), verbose=False)
    # OpenMP threads cost far more than they save on small problems (and spin on a busy machine)
    before = faiss.omp_get_max_threads()
    if len(x) * x.shape[1] * n_clusters < 50_000_000:
        faiss.omp_set_num_threads(1)
    try:
        km.train(x)
    finally:
        faiss.omp_set_num_threads(before)
    centroids = km.centroids.reshape(n_clusters, -1).astype(np.float32)
    # squared L2 to every centroid; assignment by the nearest (equal to the IP assignment when spherical)
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    if spherical:
        assign = np.argmax(x @ centroids.T, axis=1)
    else:
        assign = np.argmin(d2, axis=1)
    dist = np.maximum(d2[np.arange(len(x)), assign], 0.0)
    return assign.astype(np.int64), dist.astype(np.float32), centroids


def select_typical_users(user_reprs: np.ndarray, user_ids: Sequence[int], history_lens: Sequence[int],
                         n_clusters: int, budget: float, seed: int = 0, *, how: str = "mean",
                         spherical: bool = True, pool_factor: float = 3.0, niter: int = 25,
                         min_history_len: int = 1) -> pd.DataFrame:
    """Typical, information-rich users (see module doc).

    Returns a DataFrame ``user, cluster, distance, history_len, rank_in_cluster`` sorted by cluster then rank;
    ``distance`` is the squared L2 distance to the cluster centroid.
    """
    users = np.asarray(user_ids, dtype=np.int64)
    lens = np.asarray(history_lens, dtype=np.int64)
    x = combine_interests(user_reprs, how)
    if not (len(x) == len(users) == len(lens)):
        raise ValueError(f"{len(x)} representations, {len(users)} user ids, {len(lens)} lengths")
    if pool_factor < 1:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
    eligible = lens >= min_history_len
    n_total = int(eligible.sum())
    n_select = resolve_budget(budget, n_total)
    if n_total == 0 or n_select == 0:
        return _empty_selection()
    xe, ue, le = x[eligible], users[eligible], lens[eligible]
    c = max(1, min(int(n_clusters), len(xe)))
    assign, dist, _ = _kmeans(xe, c, seed, spherical, niter)
    return _pick(assign, dist, ue, le, c, n_select, pool_factor)


def cluster_users(user_reprs: np.ndarray, n_clusters: int, seed: int = 0, *, how: str = "mean",
                  spherical: bool = True, niter: int = 25) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k-means step alone: ``(cluster [U], squared distance to its centroid [U], centroids [C, D])``."""
    x = combine_interests(user_reprs, how)
    return _kmeans(x, max(1, min(int(n_clusters), len(x))), seed, spherical, niter)


def _pick(assign, dist, ue, le, c, n_select, pool_factor) -> pd.DataFrame:
    sizes = np.bincount(assign, minlength=c)
    quota = apportion(sizes, n_select)
    rows = []
    for k in range(c):
        q = int(quota[k])
        if q == 0:
            continue
        idx = np.nonzero(assign == k)[0]
        by_dist = idx[np.lexsort((ue[idx], dist[idx]))]
        pool = by_dist[: min(len(by_dist), max(q, math.ceil(pool_factor * q)))]
        pool_rank = np.arange(len(pool))  # distance order, for tie-breaking
        chosen = pool[np.lexsort((pool_rank, -le[pool]))][:q]
        chosen = chosen[np.lexsort((ue[chosen], dist[chosen]))]
        for r, i in enumerate(chosen):
            rows.append((int(ue[i]), k, float(dist[i]), int(le[i]), r))
    out = pd.DataFrame(rows, columns=SELECTION_COLUMNS)
    out = out.astype({"user": "int64", "cluster": "int64", "distance": "float32", "history_len": "int64",
                      "rank_in_cluster": "int64"})
    log.info("typical users: %d of %d eligible (%d clusters, sizes %s..%s)", len(out), len(ue), c,
             int(sizes.min()), int(sizes.max()))
    return out.reset_index(drop=True)


def select_random_users(user_ids: Sequence[int], history_lens: Sequence[int], budget: float, seed: int = 0,
                        min_history_len: int = 1) -> pd.DataFrame:
    """The ablation: the same budget drawn uniformly at random (``cluster = -1``, ``distance = NaN``)."""
    users = np.asarray(user_ids, dtype=np.int64)
    lens = np.asarray(history_lens, dtype=np.int64)
    idx = np.nonzero(lens >= min_history_len)[0]
    n = resolve_budget(budget, len(idx))
    if n == 0:
        return _empty_selection()
    pick = np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))
    return pd.DataFrame({"user": users[pick], "cluster": np.full(n, -1, dtype=np.int64),
                         "distance": np.full(n, np.nan, dtype=np.float32), "history_len": lens[pick],
                         "rank_in_cluster": np.arange(n, dtype=np.int64)})


def select_users(cfg, user_reprs, user_ids, history_lens) -> pd.DataFrame:
    """Dispatch on ``cfg.selection`` (``typical`` | ``random``) with a :class:`eimf.config.SemanticConfig`."""
    if cfg.selection == "typical":
        return select_typical_users(user_reprs, user_ids, history_lens, cfg.n_clusters, cfg.budget, cfg.seed,
                                    how=cfg.user_repr, spherical=cfg.spherical, pool_factor=cfg.pool_factor,
                                    niter=cfg.kmeans_iters, min_history_len=cfg.min_history_len)
    if cfg.selection == "random":
        return select_random_users(user_ids, history_lens, cfg.budget, cfg.seed, cfg.min_history_len)
    raise ValueError(f"unknown selection {cfg.selection!r} (typical | random)")


def _empty_selection() -> pd.DataFrame:
    return pd.DataFrame({"user": np.zeros(0, np.int64), "cluster": np.zeros(0, np.int64),
                         "distance": np.zeros(0, np.float32), "history_len": np.zeros(0, np.int64),
                         "rank_in_cluster": np.zeros(0, np.int64)})
