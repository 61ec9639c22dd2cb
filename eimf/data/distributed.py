"""Data preparation as Ray tasks over buckets, so that the log never passes through the driver.

As the files are read, every interaction goes to one of B *user buckets* (a stable hash of the raw user id) and
every catalogue row to one of B *item buckets* (hash of the raw item id). Each step is then one Ray task per
bucket that reads and writes Parquet in a stage folder inside the output folder (local or ``s3://``, so tasks on
any node see it); the driver (this module) only passes counts around and streams the final tables out, the tasks are
in :mod:`eimf.data.buckets`:

1. **read**: one task per input file, or per block of a large one (``data.read_block_mb``: text files cut at line
   ends, Parquet at row groups, reading only the log's columns), parses and validates it with
   :mod:`eimf.data.parsers` (the same parsers, drop counts and messages, line numbers included, as the
   in-process path) and writes its rows to the buckets.
2. **catalogue** (per item bucket): repeated catalogue items, the first one wins.
3. **order, repeats, k-core**: a user bucket holds all of its users' rows, so it orders them (time, file, row),
   drops repeats and counts users exactly; item counts are summed per item bucket from each user bucket's partial
   counts. A row goes when its user or its item fell short in the same pass, as in
   :func:`eimf.data.transforms.kcore`, so the passes and their counts are the same.
4. **re-index**: each item bucket sorts its items by (count desc, raw id); the driver merges the B sorted
   streams (one batch of each in memory), numbers them 1..N and writes ``items.parquet`` as it goes. Users the
   same, by raw id.
5. **split**: the driver shuffles the user ids 1..U exactly as :func:`eimf.data.transforms.split_users` does (U
   ints, no rows); each user bucket cuts its users' sequences and writes them by ranges of user id, and the driver
   writes each range in turn into ``train/valid/test.parquet``.

Each task holds about one bucket (``data.buckets``; 0: one per ~2M interactions) or one block. The output is byte
for byte the in-process path's (``tests/test_data_distributed.py``). Compressed text files (``.gz``) cannot be cut
and are parsed whole by one task; catalogues too.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from eimf import fs
from eimf.data.buckets import (POS_SHIFT, IdParts, Stage, catalogue_bucket, combine_pieces, count_lines, get_table,
                               item_final, item_ids_for_users, item_pass, merge_batch, plan_pieces, read_file, traced,
                               user_final, user_pass, user_split)
from eimf.data.ingest import (ROLE_CATALOGUE, ROLE_INTERACTIONS, ReadSummary, Window, duplicate_item_error,
                              summarize)
from eimf.data.parsers import MAX_EXAMPLES
from eimf.data.transforms import empty_kcore_error, not_in_catalogue_error, split_codes
from eimf.formats.prepared import SPLITS, TableWriter, list_type
from eimf.ray_init import init_ray

log = logging.getLogger(__name__)

ROWS_PER_BUCKET = 2_000_000
#: Bytes per row of a text log, to estimate its rows from its size (Parquet files say theirs).
TEXT_BYTES_PER_ROW = 24
#: Interactions per range of user ids in the split step (what the driver holds while writing a split table).
ROWS_PER_RANGE = 500_000


@dataclass
class BucketedResult:
    summary: ReadSummary
    counts: dict
    kcore_removed: List[int]
    n_items: int
    n_users: int
    timing: Dict[str, float] = field(default_factory=dict)
    buckets: int = 0
    #: the largest peak RSS of a worker process that ran a bucket task
    worker_peak_rss_mb: float = 0.0
    #: read tasks over the interaction files (more than the files where large ones were cut into blocks)
    read_blocks: int = 0


def estimate_rows(paths: Sequence[str]) -> int:
    """Interactions in the log files: Parquet footers, else the size over :data:`TEXT_BYTES_PER_ROW` (x4 when
    compressed)."""
    rows = 0
    for p in paths:
        if p.endswith(".parquet"):
            filesystem, inner = fs.resolve(p)
            with filesystem.open_input_file(inner) as f:
                rows += pq.ParquetFile(f).metadata.num_rows
        else:
            size = int(fs.file_info(p).get("size") or 0)
            rows += size * (4 if p.endswith((".gz", ".bz2", ".xz")) else 1) // TEXT_BYTES_PER_ROW
    return rows


def bucket_count(rows: int) -> int:
    """One bucket per :data:`ROWS_PER_BUCKET` interactions, between 2 and 256."""
    return int(min(256, max(2, math.ceil(rows / ROWS_PER_BUCKET))))


def merge_sorted(paths: Sequence[str], keys: Sequence[str], batch_rows: int = 0
                 ) -> Iterator[Tuple["object", np.ndarray]]:
    """Merge Parquet files that are each sorted by ``keys`` (unique across files) -> (rows in order, index of the
    source file of each row), batch by batch; memory: one batch of ``batch_rows`` per file (0: a share of
    :data:`eimf.data.buckets.MERGE_ROWS`, so the total does not grow with the number of files)."""
    batch_rows = batch_rows or merge_batch(len(paths))
    readers = []
    for p in paths:
        filesystem, inner = fs.resolve(p)
        readers.append(pq.ParquetFile(filesystem.open_input_file(inner)).iter_batches(batch_size=batch_rows))
    n = len(paths)
    bufs: List = [None] * n
    done = [False] * n

    def refill(i: int) -> None:
        while not done[i] and (bufs[i] is None or len(bufs[i]) == 0):
            try:
                bufs[i] = pa.Table.from_batches([next(readers[i])])
            except StopIteration:
                done[i], bufs[i] = True, None

    for i in range(n):
        refill(i)
    sort_keys = [(k, "ascending") for k in keys]
    while True:
        live = [i for i in range(n) if bufs[i] is not None and len(bufs[i])]
        if not live:
            return
        union = pa.concat_tables([bufs[i] for i in live])
        src = np.concatenate([np.full(len(bufs[i]), i) for i in live])
        order = pc.sort_indices(union, sort_keys=sort_keys).to_numpy()
        open_ = [i for i in live if not done[i]]
        if open_:  # safe up to the smallest last key of a stream that may hold more
            last = {i: tuple(bufs[i].column(k)[-1].as_py() for k in keys) for i in open_}
            f = min(open_, key=last.__getitem__)
            g = sum(len(bufs[i]) for i in live[:live.index(f)]) + len(bufs[f]) - 1
            cut = int(np.flatnonzero(order == g)[0]) + 1
        else:
            cut = len(order)
        take = order[:cut]
        yield union.take(take), src[take]
        emitted = np.bincount(src[take], minlength=n)
        for i in live:
            bufs[i] = bufs[i].slice(int(emitted[i]))
            refill(i)


def _delete(path: str) -> None:
    filesystem, inner = fs.resolve(path)
    try:
        filesystem.delete_dir(inner)
    except (FileNotFoundError, OSError):
        pass


def prepare_bucketed(cfg, inputs, out: str, *, rows: Optional[int] = None) -> BucketedResult:
    """Run the steps of the module doc for ``cfg`` (a ``DataConfig``) and ``inputs``; writes the five tables
    into ``out`` (not the manifest) and returns what the manifest says. ``rows``: :func:`estimate_rows` of the
    log if the caller has it (needed only when ``data.buckets=0``)."""
    import ray  # only this engine needs Ray: importing eimf.data (and the local engine) stays light

    init_ray(log_to_driver=False)
    timing: Dict[str, float] = {}
    t0 = time.perf_counter()
    if cfg.buckets > 0:
        B = cfg.buckets
    else:
        B = bucket_count(rows if rows is not None else estimate_rows(inputs.interaction_files))
    stage = Stage(fs.join(out, "_stage"), B)
    _delete(stage.root)
    task = ray.remote(num_cpus=1)(traced)
    env = fs.s3_env()
    worker_rss: List[float] = []

    def run(fn, calls: List[tuple]) -> list:
        got = ray.get([task.remote(env, fn, stage, *args) for args in calls])
        worker_rss.extend(rss for _, rss in got)
        return [out for out, _ in got]

    spec, cat_spec = inputs.interaction_spec, inputs.catalogue_spec
    cat_files = list(inputs.catalogue_files) if cat_spec is not None else []
    block = max(1, int(cfg.read_block_mb * 2**20))
    plans = [plan_pieces(p, spec, block) for p in inputs.interaction_files]
    # a text block's line numbers start after the newlines of the blocks before it
    texts = [(j, c, piece) for j, plan in enumerate(plans) for c, piece in enumerate(plan)
             if piece is not None and piece[0] == "text" and c + 1 < len(plan)]
    newlines = dict(zip([(j, c) for j, c, _ in texts],
                        run(count_lines, [(inputs.interaction_files[j], piece[1], piece[2]) for j, c, piece in texts])))
    window = Window.of(cfg)  # applied by each read task to its rows, as the local engine does
    jobs = []  # (path, role, spec, file index, block index, block, line offset, window)
    for j, (p, plan) in enumerate(zip(inputs.interaction_files, plans)):
        before = 0
        for c, piece in enumerate(plan):
            offset = 0
            if piece is not None and piece[0] == "text" and c:
                offset = before - (1 if piece[3] else 0)  # the header put in front is the parser's line 1
            jobs.append((p, ROLE_INTERACTIONS, spec, j, c, piece, offset, window))
            before += newlines.get((j, c), 0)
    n_pieces = len(jobs)
    jobs += [(p, ROLE_CATALOGUE, cat_spec, j) for j, p in enumerate(cat_files)]
    got = run(read_file, jobs)
    pieces = list(zip(jobs[:n_pieces], got[:n_pieces]))
    results = [combine_pieces([o for job, o in pieces if job[3] == j])
               for j in range(len(inputs.interaction_files))] + got[n_pieces:]
    summary = summarize(results, spec, inputs.interaction_files)
    files = [(job[3], job[4]) for job, o in pieces if o["error_kind"] != "empty"]
    cfiles = [j for j, r in enumerate(got[n_pieces:]) if r["error_kind"] != "empty"]
    timing["read"] = round(time.perf_counter() - t0, 3)
    log.info("%s: read %d files (%d blocks) into %d buckets in %.1f s", inputs.dataset, len(results),
             len(jobs), B, timing["read"])

    t = time.perf_counter()
    c: dict = {"rows_in": int(summary.rows_in), "rows_dropped": int(sum(summary.drops.values()))}
    has_cat = cat_spec is not None and summary.has_catalogue
    if has_cat:  # repeated catalogue items: first wins, as the in-process path
        dups = run(catalogue_bucket, [(ib, cfiles) for ib in range(B)])
        n_dup = sum(d["duplicates"] for d in dups)
        if n_dup:
            first = sorted(x for d in dups for x in d["first"])[:MAX_EXAMPLES]
            if cat_spec.on_bad_rows == "error":
                j, line, item = first[0]
                raise duplicate_item_error(cat_files[j], line, cat_spec.item_col, item)
            summary.catalogue_drops.add("duplicate_item", n_dup, [f"{cat_files[j]}:{line}" for j, line, _ in first])

    k = cfg.min_count
    ups = run(user_pass, [(ub, 0, k, cfg.dedupe, summary.has_time, files) for ub in range(B)])
    c["rows_valid"] = sum(u["rows"] for u in ups)
    assert c["rows_in"] == c["rows_valid"] + c["rows_dropped"], "row accounting broken"
    ips = run(item_pass, [(ib, 0, k, has_cat) for ib in range(B)])
    c["users_in"], c["items_in"] = sum(u["users_in"] for u in ups), sum(i["items"] for i in ips)
    c["interactions_in"] = c["rows_valid"]
    if has_cat:
        c["items_not_in_catalogue_in"] = sum(i["not_in_catalogue"] for i in ips)
        c["catalogue_items"] = sum(i["catalogue_items"] for i in ips)
        c["catalogue_items_never_interacted"] = sum(i["never_interacted"] for i in ips)
        misses = [i["first_missing"] for i in ips if "first_missing" in i]
        if misses:
            pos, line, item = min(misses)
            where = f"{inputs.interaction_files[pos >> POS_SHIFT]}, line {line}"
            if cfg.on_bad_rows == "error":
                raise not_in_catalogue_error(where, item, cat_files)
            log.warning("%d items are not in the catalogue (kept with empty text), e.g. %s at %s",
                        c["items_not_in_catalogue_in"], item, where)
    else:
        c["items_not_in_catalogue_in"], c["catalogue_items"], c["catalogue_items_never_interacted"] = c["items_in"], 0, 0
    if c["catalogue_items_never_interacted"]:
        log.info("%d catalogue items have no interaction (left out)", c["catalogue_items_never_interacted"])
    c["duplicates_removed"] = sum(u["duplicates_removed"] for u in ups)

    removed: List[int] = []
    step = 0
    while k > 1 and (sum(u["short_users"] for u in ups) or sum(i["short_items"] for i in ips)):
        step += 1
        ups = run(user_pass, [(ub, step, k, cfg.dedupe, summary.has_time, files) for ub in range(B)])
        removed.append(sum(u["removed"] for u in ups))
        ips = run(item_pass, [(ib, step, k, False) for ib in range(B)])
    c["kcore_rounds"], c["kcore_removed_interactions"] = len(removed), int(sum(removed))
    n_rows = sum(u["rows_now"] for u in ups)
    if n_rows == 0:
        raise empty_kcore_error(k, c["interactions_in"])
    timing["kcore"] = round(time.perf_counter() - t, 3)
    log.info("%s: %d-core in %d rounds, %.1f s", inputs.dataset, k, len(removed), timing["kcore"])

    # re-index: items by (count desc, raw id), users by raw id, merged from the sorted buckets
    t = time.perf_counter()
    run(item_final, [(ib, step, inputs.interaction_spec.numeric_ids, has_cat) for ib in range(B)])
    run(user_final, [(ub, inputs.interaction_spec.numeric_ids) for ub in range(B)])
    items_out = TableWriter(fs.join(out, "items.parquet"))
    id_out = IdParts(stage, "item_ids")
    n_items = missing_text = empty_text = 0
    for chunk, src in merge_sorted([stage.path("items", f"b{ib}.parquet") for ib in range(B)], ["neg_count", "key"]):
        ids = np.arange(n_items + 1, n_items + len(chunk) + 1, dtype=np.int64)
        n_items += len(chunk)
        text = chunk.column("text").to_numpy(zero_copy_only=False).astype(object)
        missing_text += int(chunk.column("missing").to_numpy().sum())
        empty_text += int((text == "").sum())
        items_out.write(pa.Table.from_pandas(pd.DataFrame({
            "item": ids, "raw_id": pd.array(chunk.column("raw_id").to_numpy(zero_copy_only=False), dtype="str"),
            "count": chunk.column("count").to_numpy(), "text": pd.array(text, dtype="str")}), preserve_index=False))
        raw = chunk.column("raw_id")
        for ib in np.unique(src):
            sel = src == ib
            id_out.add(int(ib), raw.filter(pa.array(sel)), ids[sel])
    items_out.close()
    item_parts = id_out.close()
    users_out = TableWriter(fs.join(out, "users.parquet"))
    uid_out = IdParts(stage, "user_ids")
    n_users = 0
    for chunk, src in merge_sorted([stage.path("users", f"b{ub}.parquet") for ub in range(B)], ["key"]):
        ids = np.arange(n_users + 1, n_users + len(chunk) + 1, dtype=np.int64)
        n_users += len(chunk)
        raw = chunk.column("raw_id")
        users_out.write(pa.Table.from_pandas(pd.DataFrame({
            "user": ids, "raw_id": pd.array(raw.to_numpy(zero_copy_only=False), dtype="str"),
            "n_interactions": chunk.column("n_interactions").to_numpy()}), preserve_index=False))
        for ub in np.unique(src):
            sel = src == ub
            uid_out.add(int(ub), raw.filter(pa.array(sel)), ids[sel])
    users_out.close()
    user_parts = uid_out.close()
    c["kcore_removed_users"], c["kcore_removed_items"] = c["users_in"] - n_users, c["items_in"] - n_items
    c["users_out"], c["items_out"], c["interactions_out"] = n_users, n_items, n_rows
    c["items_missing_text"], c["items_empty_text"] = missing_text, empty_text
    run(item_ids_for_users, [(ib, step, item_parts[ib]) for ib in range(B)])
    timing["reindex"] = round(time.perf_counter() - t, 3)
    log.info("%s: %d items and %d users re-indexed in %.1f s", inputs.dataset, n_items, n_users, timing["reindex"])

    # split: the shuffle on U ids here, the cut in the user buckets, the tables written range by range
    t = time.perf_counter()
    split_of = split_codes(n_users, cfg.split_seed, list(cfg.split_ratios)) if cfg.split == "user" else None
    ranges = max(1, math.ceil(n_rows / ROWS_PER_RANGE))
    split_ref = ray.put(split_of)
    parts = run(user_split, [(ub, split_ref, cfg, n_users, ranges, user_parts[ub]) for ub in range(B)])
    log.info("%s: sequences cut in %.1f s", inputs.dataset, time.perf_counter() - t)
    for key in parts[0]:
        c[key] = int(sum(p[key] for p in parts))
    for name in SPLITS:
        lists = ["items"] if name == "train" else ["history", "truth"]
        totals = {"items": c["train_interactions"], "history": c.get(f"{name}_history_interactions", 0),
                  "truth": c.get(f"{name}_truth_interactions", 0)}
        schema = pa.schema([("user", pa.int64())] + [(col, list_type(totals[col])) for col in lists])
        writer = TableWriter(fs.join(out, f"{name}.parquet"), schema)
        for r in range(ranges):
            got = pa.concat_tables([get_table(stage.path("split", name, f"r{r}", f"u{ub}.parquet")).cast(schema)
                                    for ub in range(B)])
            writer.write(got.take(got.column("user").to_numpy().argsort(kind="stable")))
        writer.close()
    timing["split"] = round(time.perf_counter() - t, 3)
    log.info("%s: split and written in %.1f s", inputs.dataset, timing["split"])
    _delete(stage.root)
    return BucketedResult(summary, c, removed, n_items, n_users, timing, B, round(max(worker_rss), 1), n_pieces)
