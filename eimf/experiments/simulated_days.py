"""Simulated days: does warm-starting each retraining from the last model pay, against retraining from scratch?

The protocol, as ``jobs/simulated_days.py`` runs it (docs/cold_start.md, "Retraining on new logs"):

1. **Slices** (:func:`day_cutoffs`): the raw log's interactions cut in time at quantiles of their timestamps, e.g.
   ``0.55 0.70 0.85`` gives four slices: the first 55 % of the log, then three of 15 %.
2. **Day 0**: a model trained on the first slice (``data.until`` = the first cutoff).
3. **Day d** (d = 1, 2, ...): the log grows by slice d + 1. Each arm trains on it:

   * ``scratch``: everything up to the new cutoff, from random weights;
   * ``warm``: ``pipeline.from_model`` = the previous day's warm model (day 1: day 0's), on the scratch arm's data
     (``--replay 1``), or on the new slice (``data.since``/``data.until``) plus a replayed share of the older log
     (``data.replay``);
   * ``stale``: day 0's model, not retrained: the floor.

4. **Quality on the next slice** (:func:`next_slice_frame`, :func:`score_folder`): the users active in the slice
   after the day's cutoff who have a history before it; their history is the log before the cutoff, their truth
   every distinct item they interact with in that next slice. Each model ranks its own catalogue (exact search);
   items it does not know cannot be retrieved but still count in the truth, which is what serving it would give.
   Ids are matched by raw id, since every preparation numbers its items anew.

Training time is the training's wall clock (Ray Train, early stopping on each preparation's own valid users) and its
steps; the comparison is the per-user paired bootstrap over seeds (eimf.evaluation.compare).
"""
from __future__ import annotations

import datetime as _dt
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pandas as pd

from eimf.data.ingest import ingest
from eimf.data.inputs import resolve_inputs
from eimf.evaluation.evaluate import evaluate
from eimf.evaluation.metrics import MetricAccumulator

TOPK = (20, 50)


def read_log(data_cfg) -> pd.DataFrame:
    """The raw log's interactions (``user``, ``item`` as raw-id strings, ``ts``), read in this process."""
    inputs = resolve_inputs(data_cfg)
    ing = ingest(inputs.interaction_files, inputs.interaction_spec)
    if not ing.has_time:
        raise ValueError(f"simulated days: {data_cfg.dataset} has no time column ({inputs.interaction_files[0]}), "
                         "so its log cannot be cut into days")
    df = ing.interactions
    return pd.DataFrame({"user": df["user"].astype(str).to_numpy(), "item": df["item"].astype(str).to_numpy(),
                         "ts": df["ts"].to_numpy(dtype=np.float64)})


def day_cutoffs(ts: np.ndarray, shares: Sequence[float]) -> List[float]:
    """The timestamps that cut the log at each share of its interactions (strictly increasing shares in (0, 1)).
    A cutoff is a bound ``since <= ts < until``, so an interaction at the cutoff belongs to the later slice."""
    shares = [float(s) for s in shares]
    if not shares or any(not 0 < s < 1 for s in shares) or any(b <= a for a, b in zip(shares, shares[1:])):
        raise ValueError(f"simulated days: shares must increase strictly within (0, 1), got {shares}")
    cuts = [float(np.quantile(ts, s)) for s in shares]
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"simulated days: the shares {shares} give cutoffs {cuts}, not increasing (timestamps too "
                         "coarse for slices this thin)")
    return cuts


def date_of(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).date().isoformat() if ts > 1e8 else str(ts)


def next_slice_frame(log: pd.DataFrame, start: float, end: float, maxlen: int) -> pd.DataFrame:
    """The users active in ``[start, end)`` with a history before ``start``: ``user`` (a number for the bootstrap),
    ``history`` (their last ``maxlen`` raw items before ``start``, oldest first) and ``truth`` (the distinct raw
    items of ``[start, end)``)."""
    log = log.sort_values(["ts"], kind="stable")
    before, window = log[log["ts"] < start], log[(log["ts"] >= start) & (log["ts"] < end)]
    hist = before.groupby("user", sort=True)["item"].apply(lambda s: list(s.to_numpy()[-maxlen:]))
    truth = window.groupby("user", sort=True)["item"].apply(lambda s: list(dict.fromkeys(s.to_numpy())))
    users = hist.index.intersection(truth.index)
    return pd.DataFrame({"user": np.arange(len(users), dtype=np.int64), "raw_user": users.to_numpy(),
                         "history": [hist[u] for u in users], "truth": [truth[u] for u in users]})


def to_model_ids(frame: pd.DataFrame, raw_ids: np.ndarray) -> pd.DataFrame:
    """``frame`` (raw ids) in a model's ids: ``raw_ids[i - 1]`` is the raw id of model item ``i``. History items
    the model does not know are dropped (users left with none too); truth items it does not know get ids past its
    table, so they count and are never retrieved."""
    id_of = {str(r): i + 1 for i, r in enumerate(raw_ids)}
    n = len(raw_ids)
    unknown: Dict[str, int] = {}

    def truth_id(r: str) -> int:
        return id_of.get(r) or unknown.setdefault(r, n + 1 + len(unknown))

    hist = [np.array([id_of[r] for r in h if r in id_of], dtype=np.int64) for h in frame["history"]]
    ok = np.array([len(h) > 0 for h in hist], dtype=bool)
    return pd.DataFrame({"user": frame["user"].to_numpy()[ok], "history": [h for h, k in zip(hist, ok) if k],
                         "truth": [np.array([truth_id(r) for r in t], dtype=np.int64)
                                   for t, k in zip(frame["truth"], ok) if k]})


def score_folder(folder, frame: pd.DataFrame, maxlen: int, topk: Sequence[int] = TOPK,
                 exclude_history: bool = False) -> Tuple[pd.DataFrame, dict]:
    """Per-user metrics of a model folder (eimf.serving.folder.ModelFolder) on a :func:`next_slice_frame`, over its
    own catalogue with exact search, and what was scored: users, catalogue size, the share of truth items it knows."""
    raw_ids = folder.items.sort_values("item")["raw_id"].astype(str).to_numpy()
    sub = to_model_ids(frame, raw_ids)
    table = folder.model.item_embeddings().detach().float().numpy()
    acc = MetricAccumulator(topk, keep_users=True)
    evaluate(lambda h, m: folder.model.interests(h, m), table, sub, topk=topk, maxlen=maxlen,
             exclude_history=exclude_history, accumulator=acc)
    known = np.concatenate([t <= len(raw_ids) for t in sub["truth"]]) if len(sub) else np.zeros(0, bool)
    return acc.per_user(), {"users": int(len(sub)), "users_without_known_history": int(len(frame) - len(sub)),
                            "catalogue": int(len(raw_ids)), "truth_known_share": float(known.mean()) if len(known)
                            else 0.0}

