"""Paired comparison of two methods over the same users and seeds: the per-user paired bootstrap.

Each arm is a table of per-user metrics (:meth:`eimf.evaluation.metrics.MetricAccumulator.per_user`) for each
seed. The difference is taken where it is paired: on the seeds both arms ran and the users both scored. Each
user's metric is first averaged over those seeds (the seed noise is averaged out per user), then users are
resampled with replacement; the 95 % interval is the 2.5th-97.5th percentile of the resampled mean differences.
Users are the unit of resampling because the test set is a sample of users: the interval says how much the gain
could move on another sample of users of the same kind, with the seeds averaged in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping

import numpy as np
import pandas as pd


@dataclass
class PairedDelta:
    metric: str
    #: mean over users of (treated - control), each user's metric averaged over the paired seeds
    delta: float
    low: float
    high: float
    n_users: int
    seeds: List[int]
    #: seed -> mean(treated) - mean(control) on that seed's common users
    per_seed: Dict[int, float] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """``gain`` or ``loss`` when the interval excludes 0, else ``no difference``."""
        return "gain" if self.low > 0 else "loss" if self.high < 0 else "no difference"

    def describe(self) -> str:
        return f"{self.delta:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def _user_means(arm: Mapping[int, pd.DataFrame], seeds: List[int], metric: str) -> pd.Series:
    cols = []
    for s in seeds:
        df = arm[s]
        if metric not in df.columns or "user" not in df.columns:
            raise KeyError(f"per-user table of seed {s} lacks 'user' or {metric!r} (has {list(df.columns)})")
        if df["user"].duplicated().any():
            raise ValueError(f"per-user table of seed {s} repeats users")
        cols.append(df.set_index("user")[metric].rename(s))
    # inner join: a user counts only where every paired seed scored it
    return pd.concat(cols, axis=1, join="inner").mean(axis=1)


def paired_bootstrap(treated: Mapping[int, pd.DataFrame], control: Mapping[int, pd.DataFrame], metric: str,
                     n_boot: int = 10_000, seed: int = 0, confidence: float = 0.95) -> PairedDelta:
    """Δ = treated - control on ``metric`` with its per-user paired bootstrap interval; see module doc.
    ``treated``/``control``: seed -> per-user table (columns ``user`` and the metric)."""
    seeds = sorted(set(treated) & set(control))
    if not seeds:
        raise ValueError(f"no seed in common: treated has {sorted(treated)}, control {sorted(control)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    t, c = _user_means(treated, seeds, metric), _user_means(control, seeds, metric)
    users = t.index.intersection(c.index)
    if len(users) == 0:
        raise ValueError("the two arms scored no user in common")
    diff = (t.loc[users] - c.loc[users]).to_numpy(dtype=np.float64)
    rng = np.random.default_rng(seed)
    n = len(diff)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)  # bounded memory: chunk x n indices at a time
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = diff[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    per_seed = {}
    for s in seeds:
        a, b = treated[s].set_index("user")[metric], control[s].set_index("user")[metric]
        common = a.index.intersection(b.index)
        per_seed[s] = float(a.loc[common].mean() - b.loc[common].mean())
    return PairedDelta(metric, float(diff.mean()), float(low), float(high), n, seeds, per_seed)


def user_features(split_df: pd.DataFrame, train_df: pd.DataFrame) -> pd.DataFrame:
    """Per user of a split: ``history_length`` (items before the cut) and ``target_popularity`` (the mean number
    of training interactions of the user's held-out items): where a method's gain lies."""
    counts = pd.Series(np.concatenate([np.asarray(s, dtype=np.int64) for s in train_df["items"]])).value_counts()
    truth_pop = [float(counts.reindex(np.asarray(t, dtype=np.int64)).fillna(0).mean()) if len(t) else np.nan
                 for t in split_df["truth"]]
    return pd.DataFrame({"user": split_df["user"].to_numpy(),
                         "history_length": split_df["history"].map(len).to_numpy(),
                         "target_popularity": truth_pop})


def delta_by_quartile(treated: Mapping[int, pd.DataFrame], control: Mapping[int, pd.DataFrame], metric: str,
                      feature: pd.Series, n_boot: int = 10_000, seed: int = 0) -> List[dict]:
    """:func:`paired_bootstrap` within each quartile of ``feature`` (a Series indexed by user): rows of
    ``{"quartile", "range", "users", "delta", "low", "high", "verdict"}``, lowest quartile first."""
    feature = feature.dropna()
    # ranks first: ties (many users of one history length) must not empty a quartile
    q = pd.qcut(feature.rank(method="first"), 4, labels=False)
    out = []
    for k in range(4):
        users = set(feature.index[q == k])
        sub = lambda arm: {s: df[df["user"].isin(users)] for s, df in arm.items()}  # noqa: E731
        d = paired_bootstrap(sub(treated), sub(control), metric, n_boot=n_boot, seed=seed)
        vals = feature[q == k]
        out.append({"quartile": k + 1, "range": f"{vals.min():.4g}-{vals.max():.4g}", "users": d.n_users,
                    "delta": d.delta, "low": d.low, "high": d.high, "verdict": d.verdict})
    return out
