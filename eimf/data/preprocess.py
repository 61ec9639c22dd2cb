"""Raw files -> validated, filtered, re-indexed, split Parquet plus a manifest (see docs/architecture.md).

``prepare(cfg.data)`` runs the steps below on one of two engines that write the same bytes (``data.engine``):
``local`` runs them in pandas in this process (:func:`build`); ``ray`` runs them as Ray tasks over user and item
buckets, so that no process holds the whole log (:mod:`eimf.data.distributed`); ``auto`` picks local for logs up
to about 2M interactions. This module owns the prepared layout: it writes the tables (:class:`TableWriter`, in
fixed row groups) and the manifest, and reads them back (:func:`load_prepared`, lazily). The steps:

1. **read + validate** every file (:mod:`eimf.data.ingest`); malformed rows are dropped and
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

import array
import dataclasses
import functools
import datetime as _dt
import hashlib
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
from eimf.data.ingest import ReadSummary

log = logging.getLogger(__name__)

#: Bump when the output for the same inputs and config changes: old cache folders are then not reused.
PREPROCESS_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")
DEDUPE_POLICIES = ("none", "consecutive", "first")
#: DataConfig fields that change the output (besides the inputs and parser settings).
OUTPUT_FIELDS = ("on_bad_rows", "dedupe", "min_count", "split", "split_seed", "split_ratios", "history_fraction")


class PreparedDataset:
    """A prepared folder: the manifest at once, each table read when first used (then kept), so that preparing or
    opening a large dataset costs the driver nothing until a table is asked for.

    ``train``: user int64, items list<int64> (whole chronological sequence); ``valid``/``test``: user, history,
    truth; ``items``: item (1..N), raw_id, count, text; ``users``: user (1..U), raw_id, n_interactions, or None in
    folders written before it existed (not part of the training contract)."""

    def __init__(self, path: str, manifest: dict):
        self.path, self.manifest = path, manifest
        self.n_items = int(manifest["n_items"])

    def _table(self, name: str) -> pd.DataFrame:
        return _read_parquet(fs.join(self.path, f"{name}.parquet"))

    train = functools.cached_property(lambda self: self._table("train"))
    valid = functools.cached_property(lambda self: self._table("valid"))
    test = functools.cached_property(lambda self: self._table("test"))
    items = functools.cached_property(lambda self: self._table("items"))

    @functools.cached_property
    def users(self) -> Optional[pd.DataFrame]:
        return self._table("users") if fs.exists(fs.join(self.path, "users.parquet")) else None

    def __repr__(self) -> str:
        return f"PreparedDataset({self.path!r}, n_items={self.n_items})"


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


def list_type(total: int):
    """The Arrow type of an id-list column holding ``total`` ids: 32-bit offsets while they fit."""
    import pyarrow as pa

    return pa.list_(pa.int64()) if total < 2**31 else pa.large_list(pa.int64())


def _list_array(values: np.ndarray, offsets: np.ndarray):
    import pyarrow as pa

    large = offsets[-1] >= 2**31
    cls = pa.LargeListArray if large else pa.ListArray
    return cls.from_arrays(pa.array(offsets, type=pa.int64() if large else pa.int32()), pa.array(values, type=pa.int64()))


def cut_sequences(users: np.ndarray, starts: np.ndarray, lens: np.ndarray, items: np.ndarray, split_of, cfg
                  ) -> Tuple[Dict[str, "object"], dict]:
    """Users (ascending ids) whose sequences are ``items[start:start + len]`` -> the split tables (pyarrow)
    and their counts. ``split_of[user]``: 0 train, 1 valid, 2 test (``data.split=user``; None for ``loo``).
    Both engines cut here: the in-process one for all users, the distributed one per user bucket."""
    import pyarrow as pa

    tables, counts = {}, {}
    if cfg.split == "user":
        which = split_of[users]
        sel = which == 0
        vals, offs = _gather(items, starts[sel], lens[sel])
        tables["train"] = pa.table({"user": pa.array(users[sel], pa.int64()), "items": _list_array(vals, offs)})
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
            tables[name] = pa.table({"user": pa.array(us, pa.int64()), "history": _list_array(hv, ho),
                                     "truth": _list_array(tv, to)})
            counts[f"{name}_users"] = len(us)
            counts[f"{name}_history_interactions"], counts[f"{name}_truth_interactions"] = int(ho[-1]), int(to[-1])
        counts["eval_users_dropped_empty_history"] = dropped_eval
    elif cfg.split == "loo":
        ok = lens >= 3
        counts["users_too_short_for_loo"] = int((~ok).sum())
        us, L, s = users[ok], lens[ok], starts[ok]
        tv, to = _gather(items, s, L - 2)
        tables["train"] = pa.table({"user": pa.array(us, pa.int64()), "items": _list_array(tv, to)})
        counts["train_users"], counts["train_interactions"] = len(us), int(to[-1])
        for name, hist_len in (("valid", L - 2), ("test", L - 1)):
            hv, ho = _gather(items, s, hist_len)
            gv, go = _gather(items, s + hist_len, np.ones(len(us), dtype=np.int64))
            tables[name] = pa.table({"user": pa.array(us, pa.int64()), "history": _list_array(hv, ho),
                                     "truth": _list_array(gv, go)})
            counts[f"{name}_users"] = len(us)
            counts[f"{name}_history_interactions"], counts[f"{name}_truth_interactions"] = int(ho[-1]), int(go[-1])
    else:
        raise DataError(f"data.split must be user or loo, got {cfg.split!r}")
    return tables, counts


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
                raise not_in_catalogue_error(where, df["item"].iat[first], ing.catalogue_files)
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
    dup = repeats(u, it, cfg.dedupe)
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
        raise empty_kcore_error(cfg.min_count, counts["interactions_in"])
    # 6. re-index items by frequency, users by raw id
    new_items, items_table = reindex_by_frequency(np.asarray(i_uniques, dtype=object)[it].astype(str), numeric_ids)
    uu, u_dense = np.unique(u, return_inverse=True)
    u_raw = np.asarray(u_uniques, dtype=object)[uu].astype(str)
    u_order = np.argsort(raw_order_key(u_raw, numeric_ids), kind="stable")
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
    text, missing = item_texts(cat, items_table["raw_id"].to_numpy())
    items_table["text"] = pd.array(text, dtype="str")
    counts["items_missing_text"] = int(missing.sum())
    counts["items_empty_text"] = int((items_table["text"] == "").sum())

    users_table = pd.DataFrame({"user": np.arange(1, n_users + 1, dtype=np.int64),
                                "raw_id": pd.array(u_raw[u_order], dtype="str"),
                                "n_interactions": lens})

    # 7. split
    split_of = split_codes(n_users, cfg.split_seed, list(cfg.split_ratios)) if cfg.split == "user" else None
    tables, split_counts = cut_sequences(np.arange(1, n_users + 1, dtype=np.int64), starts, lens, new_items,
                                         split_of, cfg)
    counts.update(split_counts)
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


#: Rows per Parquet row group of the prepared tables. Both engines cut the same groups, whatever the chunks they
#: hand over, so they write the same bytes; a writer holds one group (8,192 users' sequences, a few MB).
ROW_GROUP_ROWS = 8_192


class TableWriter:
    """A prepared table written chunk by chunk (local or ``s3://``), in row groups of :data:`ROW_GROUP_ROWS`.
    ``schema``: the file's schema; None takes the first chunk's. Memory: one row group."""

    def __init__(self, path: str, schema=None):
        self.path, self.schema = path, schema
        self._buf: list = []
        self._rows = 0
        self._writer = None
        self._stream = None

    def _open(self):
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        filesystem, inner = fs.resolve(self.path)
        if isinstance(filesystem, pafs.LocalFileSystem):
            filesystem.create_dir(os.path.dirname(inner), recursive=True)
        self._stream = filesystem.open_output_stream(inner)
        self._writer = pq.ParquetWriter(self._stream, self.schema)

    def _flush(self, rows: int) -> None:
        import pyarrow as pa

        if self._writer is None:
            self._open()
        table = pa.concat_tables(self._buf).combine_chunks()  # one chunk: page cuts do not depend on the input
        self._writer.write_table(table.slice(0, rows), row_group_size=rows)
        rest = table.slice(rows)
        self._buf, self._rows = ([rest] if len(rest) else []), len(rest)

    def write(self, table) -> None:
        if self.schema is None:
            self.schema = table.schema
        table = table.cast(self.schema) if table.schema != self.schema else table
        if len(table) == 0:
            return
        self._buf.append(table)
        self._rows += len(table)
        while self._rows >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def close(self) -> None:
        if self._rows:
            self._flush(self._rows)
        if self._writer is None:  # no row at all: a file with the schema and no row group
            self._open()
        self._writer.close()
        self._stream.close()


def _write_parquet(table, path: str) -> None:
    w = TableWriter(path, table.schema)
    w.write(table)
    w.close()


def _read_parquet(path: str) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(fs.read_bytes(path))).to_pandas()


#: data.engine=auto: logs up to this many interactions (estimated) are prepared in this process, where pandas
#: beats starting Ray tasks (docs/data.md).
LOCAL_ENGINE_MAX_ROWS = 2_000_000


def choose_engine(engine: str, rows: Optional[int]) -> str:
    """``local`` or ``ray`` for ``data.engine`` (``auto``: by ``rows``, the log's estimated interactions); both
    write the same bytes."""
    if engine == "auto":
        return "local" if rows <= LOCAL_ENGINE_MAX_ROWS else "ray"
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be auto, local or ray, got {engine!r}")
    return engine


def prepare(cfg, *, force: bool = False, engine: Optional[str] = None, known_fingerprint: Optional[str] = None
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
    engine = engine or cfg.engine
    rows = None
    if engine == "auto" or (engine == "ray" and cfg.buckets <= 0):  # footers or sizes, read once
        from eimf.data.distributed import estimate_rows

        rows = estimate_rows(inputs.interaction_files)
    engine = choose_engine(engine, rows)
    timing = {}
    if engine == "ray":  # Ray tasks over buckets: no process holds the log (eimf.data.distributed)
        from eimf.data.distributed import prepare_bucketed

        res = prepare_bucketed(cfg, inputs, out, rows=rows)
        summary, c, kcore_removed, n_items, n_users = res.summary, res.counts, res.kcore_removed, res.n_items, res.n_users
        timing.update(res.timing)
        engine_info = {"buckets": res.buckets, "read_blocks": res.read_blocks,
                       "worker_peak_rss_mb": res.worker_peak_rss_mb}
    else:  # pandas in this process: the same bytes, faster on small inputs
        engine_info = {}
        from eimf.data.ingest import ingest

        t = time.perf_counter()
        ing = ingest(inputs.interaction_files, inputs.interaction_spec, inputs.catalogue_files,
                     inputs.catalogue_spec)
        timing["read"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        built = build(ing, cfg, inputs.interaction_spec.numeric_ids)
        timing["build"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        fs.makedirs(out)
        for name, table in built.tables.items():
            _write_parquet(table, fs.join(out, f"{name}.parquet"))
        timing["write"] = round(time.perf_counter() - t, 3)
        summary = ReadSummary(ing.drops, ing.catalogue_drops, ing.rows_in, ing.catalogue_rows_in, ing.files,
                              ing.has_time, ing.catalogue is not None)
        c, kcore_removed, n_items, n_users = built.counts, built.kcore_removed, built.n_items, built.n_users
    c["catalogue_rows_in"] = int(summary.catalogue_rows_in)
    c["catalogue_rows_dropped"] = int(sum(summary.catalogue_drops.values()))
    c["blank_lines"] = int(sum(f["blank_lines"] for f in summary.files))
    c["empty_sequences"] = int(sum(f["empty_sequences"] for f in summary.files))
    empty_files = [f["path"] for f in summary.files if f.get("empty")]
    c["empty_files"] = len(empty_files)
    drops, cat_drops = summary.drops, summary.catalogue_drops
    if drops:
        log.warning("%s: dropped %d of %d rows: %s", inputs.dataset, c["rows_dropped"], c["rows_in"], dict(drops))
    log.info("%s: %d users, %d items, %d interactions in -> %d-core (%d rounds) -> %d users, %d items, "
             "%d interactions; split %s: %d/%d/%d users", inputs.dataset, c["users_in"], c["items_in"],
             c["interactions_in"], cfg.min_count, c["kcore_rounds"], c["users_out"], c["items_out"],
             c["interactions_out"], cfg.split, c["train_users"], c["valid_users"], c["test_users"])
    manifest = {
        "format_version": 1,
        "preprocess_version": PREPROCESS_VERSION,
        "dataset": inputs.dataset,
        "source": inputs.source,
        "fingerprint": fp,
        "path": out,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "n_items": n_items,
        "n_users": n_users,
        "counts": c,
        "drops": {k: int(v) for k, v in sorted(drops.items())},
        "drop_examples": {k: v for k, v in sorted(drops.examples.items()) if k in drops},
        "catalogue_drops": {k: int(v) for k, v in sorted(cat_drops.items())},
        "catalogue_drop_examples": {k: v for k, v in sorted(cat_drops.examples.items()) if k in cat_drops},
        "empty_files": empty_files,
        "kcore": {"min_count": cfg.min_count, "rounds": len(kcore_removed), "removed_per_round": kcore_removed},
        "split": {"method": cfg.split, "seed": cfg.split_seed, "ratios": list(cfg.split_ratios),
                  "history_fraction": cfg.history_fraction},
        "config": {k: getattr(cfg, k) for k in OUTPUT_FIELDS} | {"dataset": cfg.dataset, "source": cfg.source},
        "has_time": summary.has_time,
        "interaction_spec": dataclasses.asdict(inputs.interaction_spec),
        "catalogue_spec": dataclasses.asdict(inputs.catalogue_spec) if inputs.catalogue_spec else None,
        "inputs": infos,
        "files": summary.files,
        "engine": {"name": engine, **engine_info},
        "timing_s": {**timing, "total": round(time.perf_counter() - t0, 3)},
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
    return PreparedDataset(path, manifest)


def read_split(path, name: str) -> pd.DataFrame:
    """One table of a prepared folder (``train``, ``valid``, ``test``, ``items``, ``users``)."""
    return _read_parquet(fs.join(str(path), f"{name}.parquet"))


def read_manifest(path) -> dict:
    return fs.read_json(fs.join(str(path), MANIFEST))
