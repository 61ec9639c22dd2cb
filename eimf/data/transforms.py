"""The transforms of data preparation, shared by the pandas engine (:mod:`eimf.data.local`) and the Ray engine
(:mod:`eimf.data.distributed`), so that both number, filter and cut alike and write the same bytes:

* **repeats** (:func:`repeats`, ``data.dedupe``) and **k-core** (:func:`kcore`, ``data.min_count``);
* **re-index** (:func:`reindex_by_frequency`, :func:`raw_order_key`): items 1..N by descending count (ties by raw id,
  numerically for numeric ids), users 1..U by raw id;
* **split** (:func:`split_codes`, :func:`cut_sequences`): ComiRec's user split (``random.Random(split_seed)`` shuffle,
  cut 8:1:1, history = the first ``int(len * history_fraction)`` items) or leave-one-out;
* the catalogue join (:func:`item_texts`) and the errors both engines raise alike.

The Ray engine applies them per bucket (a user bucket holds all of a user's rows), the pandas engine to the whole log.
"""
from __future__ import annotations

import array
import random
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa

from eimf.data.parsers import DataError
from eimf.formats.prepared import list_array

DEDUPE_POLICIES = ("none", "consecutive", "first")


def kcore(users: np.ndarray, items: np.ndarray, min_count: int) -> Tuple[np.ndarray, List[int]]:
    """Iterative k-core on integer codes -> (keep mask, interactions removed per pass that removed any)."""
    users, items = np.asarray(users), np.asarray(items)
    keep = np.ones(len(users), dtype=bool)
    removed: List[int] = []
    if min_count <= 1 or len(users) == 0:
        return keep, removed
    nu, ni = int(users.max()) + 1, int(items.max()) + 1
    while True:
        uc = np.bincount(users[keep], minlength=nu)
        ic = np.bincount(items[keep], minlength=ni)
        bad = keep & ((uc[users] < min_count) | (ic[items] < min_count))
        n_bad = int(bad.sum())
        if n_bad == 0:
            return keep, removed
        keep &= ~bad
        removed.append(n_bad)


def raw_order_key(raw: np.ndarray, numeric: bool) -> np.ndarray:
    """The sort key of raw ids, shared by both engines so they number alike: integers when ids are numeric."""
    if numeric:
        return pd.to_numeric(pd.Series(raw, dtype="str")).to_numpy(dtype=np.int64)
    return np.asarray(raw, dtype=object).astype(str)


def reindex_by_frequency(raw_items: Sequence[str], numeric: bool) -> Tuple[np.ndarray, pd.DataFrame]:
    """raw item id per interaction -> (new id per interaction, table item/raw_id/count).

    Ids 1..N by descending count; ties by raw id (numeric order for numeric ids).
    """
    codes, uniques = pd.factorize(pd.Series(raw_items, dtype="str"), sort=False)
    uniques = np.asarray(uniques, dtype=object)
    counts = np.bincount(codes, minlength=len(uniques))
    key = raw_order_key(uniques, numeric)
    order = np.lexsort((key, -counts))  # last key is primary
    new_of_code = np.empty(len(uniques), dtype=np.int64)
    new_of_code[order] = np.arange(1, len(uniques) + 1)
    table = pd.DataFrame({
        "item": np.arange(1, len(uniques) + 1, dtype=np.int64),
        "raw_id": pd.array(uniques[order], dtype="str"),
        "count": counts[order].astype(np.int64),
    })
    return new_of_code[codes], table


def split_cuts(n: int, ratios: Sequence[float]) -> Tuple[int, int]:
    """Where the shuffled users are cut: ``int(n*r0)`` and ``int(n*(r0+r1))``."""
    return int(round(n * ratios[0], 9)), int(round(n * (ratios[0] + ratios[1]), 9))


def split_users(user_ids: Sequence[int], seed: int, ratios: Sequence[float]) -> Tuple[list, list, list]:
    """ComiRec: ``random.Random(seed).shuffle`` of the users, cut at :func:`split_cuts`."""
    users = list(user_ids)
    random.Random(seed).shuffle(users)
    c1, c2 = split_cuts(len(users), ratios)
    return users[:c1], users[c1:c2], users[c2:]


def split_codes(n_users: int, seed: int, ratios: Sequence[float]) -> np.ndarray:
    """:func:`split_users` of the ids 1..n_users as one int8 per id (0 train, 1 valid, 2 test; index 0 unused).
    The shuffle runs on an 8-byte array: the same swaps as on a list, a quarter of its memory."""
    ids = array.array("q", range(1, n_users + 1))
    random.Random(seed).shuffle(ids)  # the permutation depends only on the length and the generator
    order = np.frombuffer(ids, dtype=np.int64)
    c1, c2 = split_cuts(n_users, ratios)
    codes = np.zeros(n_users + 1, dtype=np.int8)
    codes[order[c1:c2]], codes[order[c2:]] = 1, 2
    return codes


def _gather(flat: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenate ``flat[s:s+l]`` for each (s, l) -> (values, offsets)."""
    lens = np.asarray(lens, dtype=np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    if offsets[-1] == 0:
        return flat[:0], offsets
    idx = np.repeat(np.asarray(starts, dtype=np.int64) - offsets[:-1], lens) + np.arange(offsets[-1])
    return flat[idx], offsets


def repeats(users: np.ndarray, items: np.ndarray, policy: str) -> np.ndarray:
    """Rows (ordered by user, then time) that ``data.dedupe=policy`` drops: ``consecutive``, the same item as
    the user's previous row; ``first``, a (user, item) pair seen before; ``none``, nothing."""
    if policy not in DEDUPE_POLICIES:
        raise DataError(f"data.dedupe must be one of {DEDUPE_POLICIES}, got {policy!r}")
    dup = np.zeros(len(users), dtype=bool)
    if policy == "consecutive":
        dup[1:] = (users[1:] == users[:-1]) & (items[1:] == items[:-1])
    elif policy == "first":
        dup = pd.DataFrame({"u": users, "i": items}).duplicated(keep="first").to_numpy()
    return dup


def item_texts(catalogue: Optional[pd.DataFrame], raw_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Each raw item id's catalogue text ("" when absent) and whether it was absent; no catalogue: all absent."""
    if catalogue is None:
        return np.full(len(raw_ids), "", dtype=object), np.ones(len(raw_ids), dtype=bool)
    text = pd.Series(catalogue["text"].to_numpy(dtype=object),
                     index=catalogue["item"].astype("str").to_numpy()).reindex(np.asarray(raw_ids).astype(str))
    return text.fillna("").to_numpy(dtype=object).astype(str), text.isna().to_numpy()


def not_in_catalogue_error(where: str, item: str, catalogue_files: Sequence[str]) -> DataError:
    return DataError(f"{where}: item {item!r} is not in the item catalogue ({', '.join(catalogue_files)}); use "
                     f"data.on_bad_rows=drop to keep such items with empty text (counted as items_missing_text)")


def empty_kcore_error(min_count: int, interactions_in: int) -> DataError:
    return DataError(f"no interaction survives the {min_count}-core filter ({interactions_in} interactions in); "
                     f"lower data.min_count")


def cut_sequences(users: np.ndarray, starts: np.ndarray, lens: np.ndarray, items: np.ndarray, split_of, cfg
                  ) -> Tuple[Dict[str, "object"], dict]:
    """Users (ascending ids) whose sequences are ``items[start:start + len]`` -> the split tables (pyarrow)
    and their counts. ``split_of[user]``: 0 train, 1 valid, 2 test (``data.split=user``; None for ``loo``).
    Both engines cut here: the in-process one for all users, the distributed one per user bucket."""
    tables, counts = {}, {}
    if cfg.split == "user":
        which = split_of[users]
        sel = which == 0
        vals, offs = _gather(items, starts[sel], lens[sel])
        tables["train"] = pa.table({"user": pa.array(users[sel], pa.int64()), "items": list_array(vals, offs)})
        counts["train_users"], counts["train_interactions"] = int(sel.sum()), int(offs[-1])
        dropped_eval = 0
        for code, name in ((1, "valid"), (2, "test")):
            sel = which == code
            us, s, L = users[sel], starts[sel], lens[sel]
            h = np.array([int(x * cfg.history_fraction) for x in L.tolist()], dtype=np.int64)
            ok = h > 0  # an empty history cannot be scored
            dropped_eval += int((~ok).sum())
            us, s, L, h = us[ok], s[ok], L[ok], h[ok]
            hv, ho = _gather(items, s, h)
            tv, to = _gather(items, s + h, L - h)
            tables[name] = pa.table({"user": pa.array(us, pa.int64()), "history": list_array(hv, ho),
                                     "truth": list_array(tv, to)})
            counts[f"{name}_users"] = len(us)
            counts[f"{name}_history_interactions"], counts[f"{name}_truth_interactions"] = int(ho[-1]), int(to[-1])
        counts["eval_users_dropped_empty_history"] = dropped_eval
    elif cfg.split == "loo":
        ok = lens >= 3
        counts["users_too_short_for_loo"] = int((~ok).sum())
        us, L, s = users[ok], lens[ok], starts[ok]
        tv, to = _gather(items, s, L - 2)
        tables["train"] = pa.table({"user": pa.array(us, pa.int64()), "items": list_array(tv, to)})
        counts["train_users"], counts["train_interactions"] = len(us), int(to[-1])
        for name, hist_len in (("valid", L - 2), ("test", L - 1)):
            hv, ho = _gather(items, s, hist_len)
            gv, go = _gather(items, s + hist_len, np.ones(len(us), dtype=np.int64))
            tables[name] = pa.table({"user": pa.array(us, pa.int64()), "history": list_array(hv, ho),
                                     "truth": list_array(gv, go)})
            counts[f"{name}_users"] = len(us)
            counts[f"{name}_history_interactions"], counts[f"{name}_truth_interactions"] = int(ho[-1]), int(go[-1])
    else:
        raise DataError(f"data.split must be user or loo, got {cfg.split!r}")
    return tables, counts
