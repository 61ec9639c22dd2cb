"""Raw files -> validated, filtered, re-indexed, split Parquet plus a manifest (see docs/architecture.md).

``prepare(cfg.data)`` runs, in this order:

1. **read + validate** every file through Ray Data (:mod:`eimf.data.ingest`); malformed rows are dropped and
   counted by reason (``data.on_bad_rows=drop``) or stop the run naming file, line and field (``error``).
2. **order**: each user's interactions sorted stably by (time, file, row in file); without a time column
   the order is the file order.
3. **catalogue join**: interactions whose item is not in the catalogue are kept with empty text and
   counted (``items_not_in_catalogue_in`` before filtering, ``items_missing_text`` in the output); with
   ``on_bad_rows=error`` the first such row is an error. Catalogue items never interacted are counted
   (``catalogue_items_never_interacted``) and left out.
4. **repeats** (``data.dedupe``): ``none`` (default) keeps every interaction, repeats included, as ComiRec and
   BERT4Rec-style preprocessing do; ``consecutive`` drops an interaction equal to the user's previous one;
   ``first`` keeps the first interaction of each (user, item) pair. Counted as ``duplicates_removed``.
5. **k-core** (``data.min_count``): users and items with fewer than ``min_count`` interactions (repeats
   count) are removed, repeatedly, until none is left; ``kcore_rounds`` = passes that removed something.
6. **re-index**: items 1..N by descending frequency (ties: raw id, numerically for numeric ids), 0 =
   padding; users 1..U by raw id (``users.parquet`` keeps the raw ids).
7. **split**: ``user`` (ComiRec: users shuffled with ``random.Random(split_seed)``, cut 8:1:1; valid/test
   history = first ``int(len * history_fraction)`` items, truth = the rest) or ``loo``.

Output ``<output_dir>/<dataset>/<fingerprint[:16]>/``: ``train.parquet``, ``valid.parquet``,
``test.parquet``, ``items.parquet``, ``users.parquet``, ``manifest.json`` (written last: a folder with a
manifest is complete). The fingerprint is a SHA-256 over the input files (name, size, mtime), the parser
settings and the config fields that change the output; a folder that already has a manifest is reused.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from eimf import fs
from eimf.data.datasets import Inputs, ensure_dataset, resolve_inputs
from eimf.data.formats import DataError

log = logging.getLogger(__name__)

#: Bump when the output for the same inputs and config changes: old cache folders are then not reused.
PREPROCESS_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")
DEDUPE_POLICIES = ("none", "consecutive", "first")
#: DataConfig fields that change the output (besides the inputs and parser settings).
OUTPUT_FIELDS = ("on_bad_rows", "dedupe", "min_count", "split", "split_seed", "split_ratios", "history_fraction")


@dataclass
class PreparedDataset:
    path: str
    n_items: int
    #: user int64, items list<int64> (whole chronological sequence)
    train: pd.DataFrame
    #: user, history, truth
    valid: pd.DataFrame
    test: pd.DataFrame
    #: item (1..N), raw_id, count, text
    items: pd.DataFrame
    manifest: dict
    #: user (1..U), raw_id, n_interactions (not part of the training contract)
    users: Optional[pd.DataFrame] = None


# --------------------------------------------------------------------------------------- pure steps
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


def _raw_order_key(raw: np.ndarray, numeric: bool) -> np.ndarray:
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
    key = _raw_order_key(uniques, numeric)
    order = np.lexsort((key, -counts))  # last key is primary
    new_of_code = np.empty(len(uniques), dtype=np.int64)
    new_of_code[order] = np.arange(1, len(uniques) + 1)
    table = pd.DataFrame({
        "item": np.arange(1, len(uniques) + 1, dtype=np.int64),
        "raw_id": pd.array(uniques[order], dtype="str"),
        "count": counts[order].astype(np.int64),
    })
    return new_of_code[codes], table


def split_users(user_ids: Sequence[int], seed: int, ratios: Sequence[float]) -> Tuple[list, list, list]:
    """ComiRec: ``random.Random(seed).shuffle`` of the users, cut at ``int(n*r0)`` and ``int(n*(r0+r1))``."""
    users = list(user_ids)
    random.Random(seed).shuffle(users)
    n = len(users)
    c1 = int(round(n * ratios[0], 9))
    c2 = int(round(n * (ratios[0] + ratios[1]), 9))
    return users[:c1], users[c1:c2], users[c2:]


def _gather(flat: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenate ``flat[s:s+l]`` for each (s, l) -> (values, offsets)."""
    lens = np.asarray(lens, dtype=np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    if offsets[-1] == 0:
        return flat[:0], offsets
    idx = np.repeat(np.asarray(starts, dtype=np.int64) - offsets[:-1], lens) + np.arange(offsets[-1])
    return flat[idx], offsets


def _list_array(values: np.ndarray, offsets: np.ndarray):
    import pyarrow as pa

    off_type = pa.int32() if offsets[-1] < 2**31 else pa.int64()
    cls = pa.ListArray if off_type == pa.int32() else pa.LargeListArray
    return cls.from_arrays(pa.array(offsets, type=off_type), pa.array(values, type=pa.int64()))


@dataclass
class Built:
    tables: Dict[str, "object"]  # name -> pyarrow Table
    counts: dict
    kcore_removed: List[int]
    n_items: int
    n_users: int


def build(ing, cfg, numeric_ids: bool, catalogue_item_col: str = "item") -> Built:
    """Steps 2-7 on ingested rows (pure: no I/O)."""
    import pyarrow as pa

    df = ing.interactions
    counts: dict = {}
    counts["rows_in"] = int(ing.rows_in)
    counts["rows_dropped"] = int(sum(ing.drops.values()))
    counts["rows_valid"] = int(len(df))
    assert counts["rows_in"] == counts["rows_valid"] + counts["rows_dropped"], "row accounting broken"

    u_codes, u_uniques = pd.factorize(df["user"], sort=False)
    i_codes, i_uniques = pd.factorize(df["item"], sort=False)
    counts["users_in"], counts["items_in"], counts["interactions_in"] = len(u_uniques), len(i_uniques), len(df)

    # 3. catalogue join (before filtering: what the raw data lacks)
    cat = ing.catalogue
    i_uniques_arr = np.asarray(i_uniques, dtype=object)
    if cat is not None:
        known = pd.Index(cat["item"].astype("str"))
        in_cat = known.get_indexer(pd.Index(i_uniques_arr.astype(str))) >= 0
        counts["items_not_in_catalogue_in"] = int((~in_cat).sum())
        counts["catalogue_items"] = int(len(cat))
        interacted = pd.Index(i_uniques_arr.astype(str))
        counts["catalogue_items_never_interacted"] = int((interacted.get_indexer(known) < 0).sum())
        if (~in_cat).any():
            bad_rows = np.flatnonzero(~in_cat[i_codes])
            first = bad_rows[np.lexsort((df["line"].to_numpy()[bad_rows], df["file"].to_numpy()[bad_rows]))[0]]
            where = f"{ing.interaction_files[int(df['file'].iat[first])]}, line {int(df['line'].iat[first])}"
            if cfg.on_bad_rows == "error":
                raise DataError(f"{where}: item {df['item'].iat[first]!r} is not in the item catalogue "
                                f"({', '.join(ing.catalogue_files)}); use data.on_bad_rows=drop to keep such items "
                                f"with empty text (counted as items_missing_text)")
            log.warning("%d items are not in the catalogue (kept with empty text), e.g. %s at %s",
                        counts["items_not_in_catalogue_in"], df["item"].iat[first], where)
    else:
        counts["items_not_in_catalogue_in"] = int(len(i_uniques))
        counts["catalogue_items"] = 0
        counts["catalogue_items_never_interacted"] = 0
    if counts["catalogue_items_never_interacted"]:
        log.info("%d catalogue items have no interaction (left out)", counts["catalogue_items_never_interacted"])

    # 2. order: (user, time, file, row), stable
    ts = df["ts"].to_numpy()
    order = np.lexsort((df["row"].to_numpy(), df["file"].to_numpy(), ts, u_codes))
    u = u_codes[order].astype(np.int64)
    it = i_codes[order].astype(np.int64)

    # 4. repeats
    policy = cfg.dedupe
    if policy not in DEDUPE_POLICIES:
        raise DataError(f"data.dedupe must be one of {DEDUPE_POLICIES}, got {policy!r}")
    if policy == "consecutive":
        dup = np.zeros(len(u), dtype=bool)
        dup[1:] = (u[1:] == u[:-1]) & (it[1:] == it[:-1])
    elif policy == "first":
        dup = pd.DataFrame({"u": u, "i": it}).duplicated(keep="first").to_numpy()
    else:
        dup = np.zeros(len(u), dtype=bool)
    counts["duplicates_removed"] = int(dup.sum())
    u, it = u[~dup], it[~dup]

    # 5. k-core
    keep, removed = kcore(u, it, cfg.min_count)
    counts["kcore_rounds"] = len(removed)
    counts["kcore_removed_interactions"] = int(sum(removed))
    n_users_before = len(np.unique(u))
    n_items_before = len(np.unique(it))
    u, it = u[keep], it[keep]
    if len(u) == 0:
        raise DataError(f"no interaction survives the {cfg.min_count}-core filter "
                        f"({counts['interactions_in']} interactions in); lower data.min_count")
    # 6. re-index items by frequency, users by raw id
    new_items, items_table = reindex_by_frequency(np.asarray(i_uniques, dtype=object)[it].astype(str), numeric_ids)
    uu, u_dense = np.unique(u, return_inverse=True)
    u_raw = np.asarray(u_uniques, dtype=object)[uu].astype(str)
    u_order = np.argsort(_raw_order_key(u_raw, numeric_ids), kind="stable")
    new_of_dense = np.empty(len(uu), dtype=np.int64)
    new_of_dense[u_order] = np.arange(1, len(uu) + 1)
    new_users = new_of_dense[u_dense]
    # rows are grouped by user code in time order; regroup by new user id keeping the time order
    regroup = np.argsort(new_users, kind="stable")
    new_users, new_items = new_users[regroup], new_items[regroup]
    n_users, n_items = len(uu), len(items_table)
    lens = np.bincount(new_users, minlength=n_users + 1)[1:].astype(np.int64)
    starts = np.zeros(n_users, dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    counts["kcore_removed_users"] = n_users_before - n_users
    counts["kcore_removed_items"] = n_items_before - n_items
    counts["users_out"], counts["items_out"], counts["interactions_out"] = n_users, n_items, int(len(new_items))

    # item text
    if cat is not None:
        text_map = pd.Series(cat["text"].to_numpy(dtype=object), index=cat["item"].astype("str").to_numpy())
        text = text_map.reindex(items_table["raw_id"].astype("str").to_numpy())
        missing = text.isna().to_numpy()
        items_table["text"] = pd.array(text.fillna("").to_numpy(dtype=object).astype(str), dtype="str")
    else:
        missing = np.ones(n_items, dtype=bool)
        items_table["text"] = pd.array([""] * n_items, dtype="str")
    counts["items_missing_text"] = int(missing.sum())
    counts["items_empty_text"] = int((items_table["text"] == "").sum())

    users_table = pd.DataFrame({"user": np.arange(1, n_users + 1, dtype=np.int64),
                                "raw_id": pd.array(u_raw[u_order], dtype="str"),
                                "n_interactions": lens})

    # 7. split
    user_ids = np.arange(1, n_users + 1, dtype=np.int64)
    tables = {}
    if cfg.split == "user":
        ratios = list(cfg.split_ratios)
        if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1.0) > 1e-6:
            raise DataError(f"data.split_ratios must be 3 non-negative numbers summing to 1, got {ratios}")
        if not 0.0 < cfg.history_fraction < 1.0:
            raise DataError(f"data.history_fraction must be in (0, 1), got {cfg.history_fraction}")
        tr, va, te = split_users(user_ids.tolist(), cfg.split_seed, ratios)
        tr = np.sort(np.asarray(tr, dtype=np.int64))
        vals, offs = _gather(new_items, starts[tr - 1], lens[tr - 1])
        tables["train"] = pa.table({"user": pa.array(tr, pa.int64()), "items": _list_array(vals, offs)})
        counts["train_users"], counts["train_interactions"] = len(tr), int(offs[-1])
        dropped_eval = 0
        for name, us in (("valid", va), ("test", te)):
            us = np.sort(np.asarray(us, dtype=np.int64))
            L = lens[us - 1]
            h = np.array([int(x * cfg.history_fraction) for x in L.tolist()], dtype=np.int64)
            ok = h > 0  # an empty history cannot be scored
            dropped_eval += int((~ok).sum())
            us, L, h = us[ok], L[ok], h[ok]
            hv, ho = _gather(new_items, starts[us - 1], h)
            tv, to = _gather(new_items, starts[us - 1] + h, L - h)
            tables[name] = pa.table({"user": pa.array(us, pa.int64()), "history": _list_array(hv, ho),
                                     "truth": _list_array(tv, to)})
            counts[f"{name}_users"] = len(us)
            counts[f"{name}_history_interactions"], counts[f"{name}_truth_interactions"] = int(ho[-1]), int(to[-1])
        counts["eval_users_dropped_empty_history"] = dropped_eval
    elif cfg.split == "loo":
        ok = lens >= 3
        counts["users_too_short_for_loo"] = int((~ok).sum())
        us, L, s = user_ids[ok], lens[ok], starts[ok]
        tv, to = _gather(new_items, s, L - 2)
        tables["train"] = pa.table({"user": pa.array(us, pa.int64()), "items": _list_array(tv, to)})
        counts["train_users"], counts["train_interactions"] = len(us), int(to[-1])
        for name, hist_len in (("valid", L - 2), ("test", L - 1)):
            hv, ho = _gather(new_items, s, hist_len)
            gv, go = _gather(new_items, s + hist_len, np.ones(len(us), dtype=np.int64))
            tables[name] = pa.table({"user": pa.array(us, pa.int64()), "history": _list_array(hv, ho),
                                     "truth": _list_array(gv, go)})
            counts[f"{name}_users"] = len(us)
            counts[f"{name}_history_interactions"], counts[f"{name}_truth_interactions"] = int(ho[-1]), int(go[-1])
    else:
        raise DataError(f"data.split must be user or loo, got {cfg.split!r}")
    tables["items"] = pa.Table.from_pandas(items_table, preserve_index=False)
    tables["users"] = pa.Table.from_pandas(users_table, preserve_index=False)
    return Built(tables, counts, removed, n_items, n_users)


# ------------------------------------------------------------------------------------------ prepare
def output_root(cfg) -> str:
    from eimf.config import eimf_home

    d = cfg.output_dir or os.path.join(eimf_home(), "data")
    return d if fs.is_s3(d) else os.path.abspath(os.path.expanduser(d))


def input_infos(inputs: Inputs) -> List[dict]:
    out = []
    for role, files in (("interactions", inputs.interaction_files), ("catalogue", inputs.catalogue_files)):
        for p in files:
            info = fs.file_info(p)
            name = p[len(inputs.root):].lstrip("/") if inputs.root and p.startswith(inputs.root) else p
            out.append({"role": role, "name": name, "path": p, **info})
    return out


def fingerprint(cfg, inputs: Inputs, infos: List[dict]) -> str:
    payload = {
        "version": PREPROCESS_VERSION,
        "dataset": inputs.dataset,
        "source": inputs.source,
        "interaction_spec": dataclasses.asdict(inputs.interaction_spec),
        "catalogue_spec": dataclasses.asdict(inputs.catalogue_spec) if inputs.catalogue_spec else None,
        "files": [{k: f.get(k) for k in ("role", "name", "size", "mtime", "etag")} for f in infos],
        "config": {k: getattr(cfg, k) for k in OUTPUT_FIELDS},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _write_parquet(table, path: str) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()  # one PUT per file on object stores
    pq.write_table(table, buf)
    fs.write_bytes(path, buf.getvalue())


def _read_parquet(path: str) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(fs.read_bytes(path))).to_pandas()


def prepare(cfg, *, force: bool = False, engine: str = "ray", known_fingerprint: Optional[str] = None
            ) -> PreparedDataset:
    """Prepare ``cfg`` (a ``DataConfig``) or reuse the folder of the same fingerprint. See the module doc.
    ``known_fingerprint``: :func:`fingerprint` as the caller already computed it (a pipeline's plan), so the
    input files are not listed twice for a reuse."""
    t0 = time.perf_counter()
    ensure_dataset(cfg)
    inputs = resolve_inputs(cfg)
    infos = None if known_fingerprint else input_infos(inputs)
    fp = known_fingerprint or fingerprint(cfg, inputs, infos)
    out = fs.join(output_root(cfg), inputs.dataset, fp[:16])
    if not force and fs.exists(fs.join(out, MANIFEST)):
        log.info("%s/%s: reusing %s (same inputs and config)", inputs.dataset, inputs.source, out)
        return load_prepared(out)
    if infos is None:
        infos = input_infos(inputs)
    log.info("%s: reading source %r (%s)", inputs.dataset, inputs.source,
             ", ".join(f["path"] for f in infos))
    from eimf.data.ingest import ingest
    from eimf.ray_init import init_ray

    timing = {}
    if engine == "ray":
        t = time.perf_counter()
        init_ray(log_to_driver=False)
        timing["ray_start"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    ing = ingest(inputs.interaction_files, inputs.interaction_spec, inputs.catalogue_files,
                 inputs.catalogue_spec, engine=engine)
    timing["read"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    built = build(ing, cfg, inputs.interaction_spec.numeric_ids)
    timing["build"] = round(time.perf_counter() - t, 3)
    c = built.counts
    c["catalogue_rows_in"] = int(ing.catalogue_rows_in)
    c["catalogue_rows_dropped"] = int(sum(ing.catalogue_drops.values()))
    c["blank_lines"] = int(sum(f["blank_lines"] for f in ing.files))
    c["empty_sequences"] = int(sum(f["empty_sequences"] for f in ing.files))
    c["empty_files"] = len(ing.empty_files)
    if ing.drops:
        log.warning("%s: dropped %d of %d rows: %s", inputs.dataset, c["rows_dropped"], c["rows_in"], dict(ing.drops))
    log.info("%s: %d users, %d items, %d interactions in -> %d-core (%d rounds) -> %d users, %d items, "
             "%d interactions; split %s: %d/%d/%d users", inputs.dataset, c["users_in"], c["items_in"],
             c["interactions_in"], cfg.min_count, c["kcore_rounds"], c["users_out"], c["items_out"],
             c["interactions_out"], cfg.split, c["train_users"], c["valid_users"], c["test_users"])

    t_write = time.perf_counter()
    fs.makedirs(out)
    for name, table in built.tables.items():
        _write_parquet(table, fs.join(out, f"{name}.parquet"))
    manifest = {
        "format_version": 1,
        "preprocess_version": PREPROCESS_VERSION,
        "dataset": inputs.dataset,
        "source": inputs.source,
        "fingerprint": fp,
        "path": out,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "n_items": built.n_items,
        "n_users": built.n_users,
        "counts": c,
        "drops": {k: int(v) for k, v in sorted(ing.drops.items())},
        "drop_examples": {k: v for k, v in sorted(ing.drops.examples.items()) if k in ing.drops},
        "catalogue_drops": {k: int(v) for k, v in sorted(ing.catalogue_drops.items())},
        "catalogue_drop_examples": {k: v for k, v in sorted(ing.catalogue_drops.examples.items())
                                    if k in ing.catalogue_drops},
        "empty_files": ing.empty_files,
        "kcore": {"min_count": cfg.min_count, "rounds": len(built.kcore_removed),
                  "removed_per_round": built.kcore_removed},
        "split": {"method": cfg.split, "seed": cfg.split_seed, "ratios": list(cfg.split_ratios),
                  "history_fraction": cfg.history_fraction},
        "config": {k: getattr(cfg, k) for k in OUTPUT_FIELDS} | {"dataset": cfg.dataset, "source": cfg.source},
        "has_time": ing.has_time,
        "interaction_spec": dataclasses.asdict(inputs.interaction_spec),
        "catalogue_spec": dataclasses.asdict(inputs.catalogue_spec) if inputs.catalogue_spec else None,
        "inputs": infos,
        "files": ing.files,
        "timing_s": {**timing, "write": round(time.perf_counter() - t_write, 3),
                     "total": round(time.perf_counter() - t0, 3)},
    }
    fs.write_json(fs.join(out, MANIFEST), manifest)
    log.info("%s: wrote %s in %.1f s", inputs.dataset, out, time.perf_counter() - t0)
    return load_prepared(out)


#: The last prepared dataset this process read: a pipeline's prepare, annotate and evaluate steps (and a grid's
#: per-run evaluations) read it once. Keyed by folder and manifest, so a rewritten folder is read again.
_LAST: Dict[tuple, PreparedDataset] = {}


def load_prepared(path) -> PreparedDataset:
    """Read a prepared folder (local or ``s3://``); the same folder again is served from memory (treat the
    frames as read-only)."""
    path = str(path)
    if not fs.exists(fs.join(path, MANIFEST)):
        raise FileNotFoundError(f"{path} is not a prepared dataset (no {MANIFEST}); run `eimf data prepare`")
    manifest = fs.read_json(fs.join(path, MANIFEST))
    key = (path, json.dumps(manifest, sort_keys=True, default=str))  # a rewrite has new timings
    if key in _LAST:
        return _LAST[key]
    _LAST.clear()
    _LAST[key] = _read_prepared(path, manifest)
    return _LAST[key]


def _read_prepared(path: str, manifest: dict) -> PreparedDataset:
    frames = {name: _read_parquet(fs.join(path, f"{name}.parquet")) for name in (*SPLITS, "items")}
    users = _read_parquet(fs.join(path, "users.parquet")) if fs.exists(fs.join(path, "users.parquet")) else None
    return PreparedDataset(path=path, n_items=int(manifest["n_items"]), train=frames["train"],
                           valid=frames["valid"], test=frames["test"], items=frames["items"],
                           manifest=manifest, users=users)


def read_split(path, name: str) -> pd.DataFrame:
    """One table of a prepared folder (``train``, ``valid``, ``test``, ``items``, ``users``)."""
    return _read_parquet(fs.join(str(path), f"{name}.parquet"))


def read_manifest(path) -> dict:
    return fs.read_json(fs.join(str(path), MANIFEST))
