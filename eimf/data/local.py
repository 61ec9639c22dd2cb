"""The pandas engine (``data.engine=local``): the whole log in this process, in pandas and numpy, with the transforms
of :mod:`eimf.data.transforms`. It writes the same bytes as the Ray engine (:mod:`eimf.data.distributed`) and is the
faster one wherever the log fits in memory (docs/data.md).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa

import eimf.data.ingest as ingest_mod  # called through the module, so that a test can swap ingest_mod.ingest
from eimf import fs
from eimf.data.ingest import ReadSummary, Window
from eimf.data.transforms import (cut_sequences, empty_kcore_error, item_texts, kcore, not_in_catalogue_error,
                                  raw_order_key, reindex_by_frequency, repeats, split_codes)
from eimf.formats.prepared import write_table

log = logging.getLogger(__name__)


@dataclass
class Built:
    tables: Dict[str, "object"]  # name -> pyarrow Table
    counts: dict
    kcore_removed: List[int]
    n_items: int
    n_users: int


def build(ing, cfg, numeric_ids: bool, catalogue_item_col: str = "item") -> Built:
    """Steps 2-7 on ingested rows (pure: no I/O)."""
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


def prepare_local(cfg, inputs, out: str) -> Tuple[ReadSummary, Built, Dict[str, float]]:
    """Read, build and write the five tables of ``inputs`` into ``out`` (not the manifest) -> what the files said,
    what was built, and the time of each phase (read / build / write)."""
    timing: Dict[str, float] = {}
    t = time.perf_counter()
    ing = ingest_mod.ingest(inputs.interaction_files, inputs.interaction_spec, inputs.catalogue_files,
                            inputs.catalogue_spec, window=Window.of(cfg))
    timing["read"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    built = build(ing, cfg, inputs.interaction_spec.numeric_ids)
    timing["build"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    fs.makedirs(out)
    for name, table in built.tables.items():
        write_table(table, fs.join(out, f"{name}.parquet"))
    timing["write"] = round(time.perf_counter() - t, 3)
    summary = ReadSummary(ing.drops, ing.catalogue_drops, ing.rows_in, ing.catalogue_rows_in, ing.files,
                          ing.has_time, ing.catalogue is not None)
    return summary, built, timing
