"""Cold-start evaluation: items that arrive after training, placed by their text alone (docs/cold_start.md).

The protocol, as ``jobs/cold_start.py`` runs it:

1. **The cold items.** From the prepared dataset (``full``), the items first seen in the last ``log_share`` of the
   log's interactions (:func:`cold_by_time`: the raw log's timestamps), or, for a log without a clock, the items
   released in or after a year named in their text (:func:`cold_by_year`: MovieLens titles end in "(1999)").
2. **The warm dataset** (:func:`derive_warm`): ``full`` without the cold items, with every one of their
   interactions removed from every split; the warm items re-indexed by count, so the log-uniform sampler sees the
   same shape. The models are trained on it and have never seen a cold item.
3. **The test users** (:func:`test_frame`): ``full``'s test users, their histories without the cold items (what the
   model could know), their truth whole: the next interactions, warm and cold.
4. **The rows of the cold items** (:func:`cold_rows`): a method fills them; the warm rows are the model's.
5. **Views** (:func:`score_views`): ``cold``: the cold items alone are the catalogue and the cold targets the truth
   (how well the rows rank the new items among themselves); ``whole``: every item in the index, all targets;
   ``whole_cold``: the same ranking, cold targets only (how often cold items are reached); ``whole_warm`` and
   ``warm_only``: the warm targets, with the cold items in the index and without them (what they cost the warm
   targets).

The oracle is a model trained on ``full`` itself (the cold items' interactions in its training), scored on the same
users and truths: the ceiling.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from eimf import fs
from eimf.data.ingest import ingest
from eimf.data.inputs import resolve_inputs
from eimf.evaluation.evaluate import evaluate, history_batch
from eimf.evaluation.retrieval import ItemIndex, reserve_slots, subset_topn
from eimf.evaluation.metrics import MetricAccumulator
from eimf.formats.prepared import list_array, read_manifest, read_split, write_manifest, write_table
from eimf.models.text_map import fit_text_map, table_blocks

log = logging.getLogger(__name__)

#: How a method fills the cold items' rows (:func:`cold_rows`); ``oracle`` is a model trained with them instead.
ROW_METHODS = ("random", "text_pca", "text_map_raw", "text_map")
VIEWS = ("cold", "whole", "whole_cold", "whole_warm", "warm_only")
TOPK = (20, 50)
_YEAR = re.compile(r"\((\d{4})\)")


# ------------------------------------------------------------------------------------------- cold items
def cold_by_time(data_cfg, full_path: str, log_share: float) -> Tuple[np.ndarray, dict]:
    """Ids (in ``full``) of the items whose first interaction in the raw log is after the ``1 - log_share``
    quantile of the log's interaction times, and the rule as a dict. Reads the raw log in this process."""
    if not 0 < log_share < 1:
        raise ValueError(f"cold start: log_share must be in (0, 1), got {log_share}")
    inputs = resolve_inputs(data_cfg)
    ing = ingest(inputs.interaction_files, inputs.interaction_spec)
    if not ing.has_time:
        raise ValueError(f"cold start by time: {data_cfg.dataset} has no time column ({inputs.interaction_files[0]});"
                         " use the release-year rule or leave the dataset out")
    ts = ing.interactions["ts"].to_numpy()
    cutoff = float(np.quantile(ts, 1 - log_share))
    first = ing.interactions.groupby("item")["ts"].min()
    late = set(first.index[first.to_numpy() > cutoff].astype(str))
    items = read_split(full_path, "items")
    cold = np.sort(items.loc[items["raw_id"].astype(str).isin(late), "item"].to_numpy(np.int64))
    when = _dt.datetime.fromtimestamp(cutoff, _dt.timezone.utc).date().isoformat() if cutoff > 1e8 else str(cutoff)
    return cold, {"rule": "time", "log_share": log_share, "cutoff": cutoff, "cutoff_date": when}


def cold_by_year(full_path: str, from_year: int) -> Tuple[np.ndarray, dict]:
    """Ids of the items whose text names a year ``(YYYY)`` of at least ``from_year`` (the last one in the text);
    items without a year stay warm and are counted in the rule."""
    items = read_split(full_path, "items")
    years = items["text"].fillna("").astype(str).map(lambda t: (_YEAR.findall(t) or [None])[-1])
    known = years.notna()
    cold = np.sort(items.loc[known & (years.fillna("0").astype(int) >= from_year), "item"].to_numpy(np.int64))
    return cold, {"rule": "year", "from_year": int(from_year), "items_without_year": int((~known).sum())}


# --------------------------------------------------------------------------------------- warm dataset
def _filter_lists(lists: pd.Series, keep_item: np.ndarray, new_id: np.ndarray) -> List[np.ndarray]:
    return [new_id[a[keep_item[a]]] for a in (np.asarray(x, dtype=np.int64) for x in lists)]


def _list_column(lists: List[np.ndarray]):
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lists])
    flat = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    return list_array(flat.astype(np.int64), offsets)


@dataclass
class WarmData:
    """The warm dataset and how its ids relate to ``full``'s."""

    path: str
    #: ``[N_full + 1]``: an item's id in the warm dataset, 0 for the cold items (and the padding)
    warm_id: np.ndarray
    #: ``full``'s ids of the cold items, sorted
    cold: np.ndarray


def derive_warm(full_path: str, cold: np.ndarray, out: str, rule: Optional[dict] = None) -> WarmData:
    """Write the warm dataset of ``full`` without ``cold`` to ``out`` (a prepared folder; reused when its manifest
    matches) and return it. Users left with fewer than 2 training items, or an empty valid/test history or truth,
    are dropped, as preparation drops them."""
    manifest = read_manifest(full_path)
    n = int(manifest["n_items"])
    is_cold = np.zeros(n + 1, dtype=bool)
    is_cold[np.asarray(cold, dtype=np.int64)] = True
    keep = ~is_cold
    keep[0] = False
    fp = hashlib.sha256((str(manifest["fingerprint"]) + json.dumps(np.asarray(cold).tolist())).encode()).hexdigest()
    splits = {s: read_split(full_path, s) for s in ("train", "valid", "test")}
    # counts over everything the warm dataset keeps, to re-index by frequency as preparation does
    counts = np.zeros(n + 1, dtype=np.int64)
    for s, df in splits.items():
        for col in (("items",) if s == "train" else ("history", "truth")):
            flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in df[col]]) if len(df) else np.zeros(0, int)
            counts += np.bincount(flat, minlength=n + 1)
    counts[~keep] = 0
    old = np.flatnonzero(keep)
    order = old[np.lexsort((old, -counts[old]))]
    warm_id = np.zeros(n + 1, dtype=np.int64)
    warm_id[order] = np.arange(1, len(order) + 1)
    result = WarmData(out, warm_id, np.sort(np.asarray(cold, dtype=np.int64)))
    if fs.exists(fs.join(out, "manifest.json")) and read_manifest(out).get("fingerprint") == fp:
        return result
    tables, kept_counts = {}, {}
    train = _filter_lists(splits["train"]["items"], keep, warm_id)
    ok = np.array([len(x) >= 2 for x in train], dtype=bool)
    tables["train"] = pa.table({"user": pa.array(splits["train"]["user"].to_numpy()[ok], type=pa.int64()),
                                "items": _list_column([x for x, k in zip(train, ok) if k])})
    kept_counts["train_users"] = int(ok.sum())
    for s in ("valid", "test"):
        hist = _filter_lists(splits[s]["history"], keep, warm_id)
        truth = _filter_lists(splits[s]["truth"], keep, warm_id)
        ok = np.array([len(h) > 0 and len(t) > 0 for h, t in zip(hist, truth)], dtype=bool)
        tables[s] = pa.table({"user": pa.array(splits[s]["user"].to_numpy()[ok], type=pa.int64()),
                              "history": _list_column([h for h, k in zip(hist, ok) if k]),
                              "truth": _list_column([t for t, k in zip(truth, ok) if k])})
        kept_counts[f"{s}_users"] = int(ok.sum())
    items = read_split(full_path, "items").set_index("item").loc[order].reset_index()
    items["item"] = np.arange(1, len(order) + 1, dtype=np.int64)
    items["count"] = counts[order]
    tables["items"] = pa.Table.from_pandas(items[["item", "raw_id", "count", "text"]], preserve_index=False)
    fs.makedirs(out)
    for name, table in tables.items():
        write_table(table, fs.join(out, f"{name}.parquet"))
    if fs.exists(fs.join(full_path, "users.parquet")):
        write_table(pa.Table.from_pandas(read_split(full_path, "users"), preserve_index=False),
                    fs.join(out, "users.parquet"))
    write_manifest(out, {**manifest, "fingerprint": fp, "path": out, "n_items": int(len(order)),
                         "counts": {**manifest.get("counts", {}), **kept_counts},
                         "cold_start": {"derived_from": full_path, "cold_items": int(len(cold)), **(rule or {})}})
    log.info("cold start: warm dataset of %d items (%d cold held out) at %s", len(order), len(cold), out)
    return result


# ------------------------------------------------------------------------------------------ test users
def test_frame(full_path: str, cold: np.ndarray, split: str = "test") -> pd.DataFrame:
    """``full``'s ``split`` users in ``full``'s ids: ``history`` without the cold items (users left with none are
    dropped), ``truth`` whole."""
    df = read_split(full_path, split)
    cold_set = np.zeros(int(read_manifest(full_path)["n_items"]) + 1, dtype=bool)
    cold_set[np.asarray(cold, dtype=np.int64)] = True
    hist = [np.asarray(h, dtype=np.int64) for h in df["history"]]
    hist = [h[~cold_set[h]] for h in hist]
    ok = np.array([len(h) > 0 for h in hist], dtype=bool)
    return pd.DataFrame({"user": df["user"].to_numpy()[ok], "history": [h for h, k in zip(hist, ok) if k],
                         "truth": [np.asarray(t, dtype=np.int64) for t, k in zip(df["truth"], ok) if k]})


def _sub_catalogue(frame: pd.DataFrame, items: np.ndarray) -> pd.DataFrame:
    """``frame`` with its truth restricted to ``items`` (full ids) and renumbered 1..len(items) in their order;
    users left without a truth are dropped (histories stay in full ids)."""
    pos = np.zeros(int(max(items.max(), max((t.max() for t in frame["truth"] if len(t)), default=0))) + 1,
                   dtype=np.int64)
    pos[items] = np.arange(1, len(items) + 1)
    truth = [pos[t[t < len(pos)]] for t in frame["truth"]]
    truth = [t[t > 0] for t in truth]
    ok = np.array([len(t) > 0 for t in truth], dtype=bool)
    return pd.DataFrame({"user": frame["user"].to_numpy()[ok],
                         "history": [h for h, k in zip(frame["history"], ok) if k],
                         "truth": [t for t, k in zip(truth, ok) if k]})


# ------------------------------------------------------------------------------------------ cold rows
def cold_rows(method: str, warm_rows: np.ndarray, text: np.ndarray, warm_items: np.ndarray, cold: np.ndarray,
              warm_counts: np.ndarray, encoder: str, seed: int = 0) -> Tuple[np.ndarray, dict]:
    """The cold items' rows ``[C, d]`` by ``method`` and what was fitted. ``warm_rows``: ``[len(warm_items), d]``
    the trained rows of ``warm_items`` (full ids); ``text``: ``[N_full + 1, D]`` text embeddings in full ids;
    ``warm_counts``: the warm items' training counts.

    * ``random``: Gaussian rows with the spread of the trained rows (each dimension's mean and std);
    * ``text_pca``: the text embedding used directly: its top principal directions (fitted on the warm items'
      texts) scaled to the trained rows' spread; no map is learned from the rows;
    * ``text_map``: the ridge map fitted on the warm items (eimf.models.text_map), its rows stretched to the
      median trained norm (the map's default); ``text_map_raw``: as mapped; ``text_map_p75``: stretched to the 75th
      percentile of the trained norms (any of text_map.NORM_PERCENTILES).
    """
    d = warm_rows.shape[1]
    mean, std = warm_rows.mean(axis=0), warm_rows.std(axis=0)
    if method == "random":
        rng = np.random.default_rng(seed)
        return (mean + std * rng.standard_normal((len(cold), d))).astype(np.float32), {}
    has_text = np.abs(text[warm_items]).sum(axis=1) > 0
    if method == "text_pca":
        x = text[warm_items[has_text]]
        centre = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - centre, full_matrices=False)
        proj = (x - centre) @ vt[:d].T
        scale = float(np.linalg.norm(warm_rows - mean, axis=1).mean() / max(np.linalg.norm(proj, axis=1).mean(), 1e-12))
        return ((text[cold] - centre) @ vt[:d].T * scale + mean).astype(np.float32), {"scale": scale}
    if method.startswith("text_map"):
        row_of = np.zeros(len(text), dtype=np.int64)
        row_of[warm_items] = np.arange(len(warm_items))
        count_of = np.zeros(len(text), dtype=np.int64)
        count_of[warm_items] = warm_counts
        m = fit_text_map(table_blocks(text, lambda ids: warm_rows[row_of[ids]], count_of,
                                      ids=warm_items[has_text]), encoder, seed=seed)
        if method == "text_map":
            return m.apply(text[cold]), m.fit
        percentile = None if method == "text_map_raw" else int(method[len("text_map_p"):])
        return m.apply(text[cold], norm_percentile=percentile), m.fit
    raise ValueError(f"cold start: row method {method!r}, expected one of {ROW_METHODS}")


# ----------------------------------------------------------------------------------------------- scoring
InterestFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def score_views(interest_fn: InterestFn, table: np.ndarray, frame: pd.DataFrame, cold: np.ndarray,
                maxlen: int, topk: Sequence[int] = TOPK) -> Dict[str, pd.DataFrame]:
    """Per-user metrics of each view (module doc). ``table``: ``[N_full + 1, d]``, every item's row in full ids
    (the cold items' from a method); ``interest_fn`` takes histories in full ids. Exact search."""
    n = len(table) - 1
    is_cold = np.zeros(n + 1, dtype=bool)
    is_cold[cold] = True
    warm = np.flatnonzero(~is_cold[1:]) + 1
    everything = np.arange(1, n + 1)

    def view(items: np.ndarray, truth_items: np.ndarray) -> pd.DataFrame:
        sub = _sub_catalogue(frame, truth_items)
        if len(sub) == 0:
            return MetricAccumulator(topk, keep_users=True).per_user()
        # truth renumbered over truth_items; the ranking is over items: map one onto the other
        rank_table = np.concatenate([np.zeros((1, table.shape[1]), np.float32), table[items]])
        pos = np.zeros(n + 1, dtype=np.int64)
        pos[items] = np.arange(1, len(items) + 1)
        sub["truth"] = [pos[truth_items[t - 1]] for t in sub["truth"]]
        acc = MetricAccumulator(topk, keep_users=True)
        evaluate(interest_fn, rank_table, sub, topk=topk, maxlen=maxlen, accumulator=acc)
        return acc.per_user()

    return {"cold": view(cold, cold), "whole": view(everything, everything), "whole_cold": view(everything, cold),
            "whole_warm": view(everything, warm), "warm_only": view(warm, warm)}


def slot_views(interest_fn: InterestFn, table: np.ndarray, frame: pd.DataFrame, cold: np.ndarray, maxlen: int,
               slots: int, topk: Sequence[int] = TOPK, batch: int = 1024) -> Dict[str, pd.DataFrame]:
    """Serving with ``slots`` places of each top list reserved for the cold items (eimf.serving.recommender's
    ``new_item_slots``): ``whole_s<slots>`` every target, ``whole_s<slots>_cold`` the cold targets (reach),
    ``whole_s<slots>_warm`` the warm ones (what the reserved places cost them). Exact search, as :func:`score_views`."""
    n, top = len(table) - 1, max(topk)
    is_cold = np.zeros(n + 1, dtype=bool)
    is_cold[cold] = True
    cold_table = np.concatenate([np.zeros((1, table.shape[1]), np.float32), table[cold]])
    index = ItemIndex(table)
    accs = {part: MetricAccumulator(topk, keep_users=True) for part in ("", "_cold", "_warm")}
    for start in range(0, len(frame), batch):
        part = frame.iloc[start:start + batch]
        hist, mask = history_batch(list(part["history"]), maxlen)
        with torch.no_grad():
            x = np.asarray(interest_fn(torch.from_numpy(hist), torch.from_numpy(mask)), dtype=np.float32)
        ids, scores = index.search_multi(x, top)
        new, new_scores = subset_topn(cold_table, cold, x, slots)
        recs, _ = reserve_slots(ids, scores, new, new_scores, is_cold, slots)
        users = part["user"].to_numpy()
        truths = [np.asarray(t, dtype=np.int64) for t in part["truth"]]
        accs[""].add(recs, truths, users=users)
        accs["_cold"].add(recs, [t[is_cold[t]] for t in truths], users=users)
        accs["_warm"].add(recs, [t[~is_cold[t]] for t in truths], users=users)
    return {f"whole_s{slots}{part}": acc.per_user() for part, acc in accs.items()}


def fixed_ranking_views(order: np.ndarray, frame: pd.DataFrame, cold: np.ndarray,
                        topk: Sequence[int] = TOPK) -> Dict[str, pd.DataFrame]:
    """The ``cold`` view of one ranking of the cold items (full ids, best first) given to every user: the
    category-popularity baseline, which has no scores to mix with a model's."""
    sub = _sub_catalogue(frame, cold)
    pos = np.zeros(int(cold.max()) + 1, dtype=np.int64)
    pos[cold] = np.arange(1, len(cold) + 1)
    ranked = np.zeros(max(topk), dtype=np.int64)  # 0 (no item) pads a catalogue shorter than the cut-off
    ranked[:min(len(order), max(topk))] = pos[order[:max(topk)]]
    recs = np.tile(ranked, (len(sub), 1))
    acc = MetricAccumulator(topk, keep_users=True)
    acc.add(recs, list(sub["truth"]), users=sub["user"].to_numpy())
    return {"cold": acc.per_user()}


def category_popularity(categories: Dict[str, List[str]], items: pd.DataFrame, warm_counts: Dict[int, int],
                        cold: np.ndarray) -> Tuple[np.ndarray, dict]:
    """The cold items (full ids) ordered by the mean training popularity of their categories (the interactions of
    the warm items in each category); items without a known category last. ``items``: ``full``'s items
    (``item``, ``raw_id``); ``categories``: raw id -> category names."""
    raw = dict(zip(items["item"].to_numpy(), items["raw_id"].astype(str)))
    pop: Dict[str, float] = {}
    for item, c in warm_counts.items():
        for cat in categories.get(raw[item], ()):
            pop[cat] = pop.get(cat, 0.0) + c
    score = np.array([np.mean([pop.get(c, 0.0) for c in categories.get(raw[i], ())] or [-1.0]) for i in cold])
    known = sum(1 for i in cold if categories.get(raw[i]))
    order = cold[np.lexsort((cold, -score))]
    return order, {"categories": len(pop), "cold_items_with_category": known}


def categories_from_text(items: pd.DataFrame, sep: str = "|") -> Dict[str, List[str]]:
    """MovieLens: an item text ``Title (1995) | Comedy, Drama`` -> its genres."""
    out = {}
    for raw, text in zip(items["raw_id"].astype(str), items["text"].fillna("").astype(str)):
        if sep in text:
            out[raw] = [g.strip() for g in text.rsplit(sep, 1)[1].split(",") if g.strip()]
    return out
