"""Data preparation as Ray tasks over buckets, so that the log never passes through the driver.

As the files are read, every interaction goes to one of B *user buckets* (a stable hash of the raw user id) and
every catalogue row to one of B *item buckets* (hash of the raw item id). Each step is then one Ray task per
bucket that reads and writes Parquet in a stage folder inside the output folder (local or ``s3://``, so tasks on
any node see it); the driver only passes counts around and streams the final tables out:

1. **read**: one task per input file, or per block of a large one (``data.read_block_mb``: text files cut at line
   ends, Parquet at row groups, reading only the log's columns), parses and validates it with
   :mod:`eimf.data.formats` (the same parsers, drop counts and messages, line numbers included, as the
   in-process path) and writes its rows to the buckets.
2. **catalogue** (per item bucket): repeated catalogue items, the first one wins.
3. **order, repeats, k-core**: a user bucket holds all of its users' rows, so it orders them (time, file, row),
   drops repeats and counts users exactly; item counts are summed per item bucket from each user bucket's partial
   counts. A row goes when its user or its item fell short in the same pass, as in
   :func:`eimf.data.preprocess.kcore`, so the passes and their counts are the same.
4. **re-index**: each item bucket sorts its items by (count desc, raw id); the driver merges the B sorted
   streams (one batch of each in memory), numbers them 1..N and writes ``items.parquet`` as it goes. Users the
   same, by raw id.
5. **split**: the driver shuffles the user ids 1..U exactly as :func:`eimf.data.preprocess.split_users` does (U
   ints, no rows); each user bucket cuts its users' sequences and writes them by ranges of user id, and the driver
   writes each range in turn into ``train/valid/test.parquet``.

Each task holds about one bucket (``data.buckets``; 0: one per ~2M interactions) or one block. The output is byte
for byte the in-process path's (``tests/test_data_distributed.py``). Compressed text files (``.gz``) cannot be cut
and are parsed whole by one task; catalogues too.
"""
from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from eimf import fs
from eimf.data.formats import MAX_EXAMPLES, DataError
from eimf.data.preprocess import (SPLITS, TableWriter, cut_sequences, empty_kcore_error, item_texts, list_type,
                                  not_in_catalogue_error, raw_order_key, repeats, split_codes)
from eimf.data.ingest import (ROLE_CATALOGUE, ROLE_INTERACTIONS, ReadSummary, duplicate_item_error,
                              parse_file_table, summarize)

log = logging.getLogger(__name__)

#: data.buckets=0: one bucket per this many interactions (a task holds about one bucket's rows in pandas).
ROWS_PER_BUCKET = 2_000_000
#: Bytes per row of a text log, to estimate its rows from its size (Parquet files say theirs).
TEXT_BYTES_PER_ROW = 24
#: Interactions per range of user ids in the split step (what the driver holds while writing a split table).
ROWS_PER_RANGE = 500_000
#: Rows the driver's merge of sorted buckets holds, over all buckets together.
MERGE_ROWS = 65_536
#: An interaction's position in the input, for messages: file index << 40 | row in the file.
_POS_SHIFT = 40


@dataclass(frozen=True)
class Stage:
    """The stage folder and the bucket count: all a task needs to find its inputs."""

    root: str
    buckets: int

    def path(self, *parts: str) -> str:
        return fs.join(self.root, *parts)

    def partials(self, t: int, ub: int, ib: int) -> str:
        return self.path("item_counts", f"t{t}", f"u{ub}", f"i{ib}.parquet")


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
    import pyarrow.parquet as pq

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


def bucket_of(keys, buckets: int) -> np.ndarray:
    """Bucket of each raw id: pandas' stable 64-bit hash, the same in every process and on every node."""
    return (pd.util.hash_array(np.asarray(keys, dtype=object)) % np.uint64(buckets)).astype(np.int64)


def _put(frame, path: str, row_group_rows: int = MERGE_ROWS) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_rows)
    fs.write_bytes(path, buf.getvalue())


def _get_table(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(fs.read_bytes(path)))


def _get(path: str) -> pd.DataFrame:
    return _get_table(path).to_pandas()


def _concat(paths: Sequence[str]) -> pd.DataFrame:
    return pd.concat([_get(p) for p in paths], ignore_index=True)


# ------------------------------------------------------------------------------------------------- tasks
def peak_rss_mb() -> float:
    """This process's peak RSS in MB: ``VmHWM``, which (unlike ``ru_maxrss``) does not carry over the parent's
    size from before an exec; ``ru_maxrss`` where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _traced(env: dict, fn, *args):
    """Run a bucket task with the driver's S3 settings (``env``); also return its worker's peak RSS so far, in MB
    (workers are reused across tasks)."""
    import os

    os.environ.update(env)
    return fn(*args), peak_rss_mb()


def _read_range(display: str, start: int, end: int) -> bytes:
    filesystem, inner = fs.resolve(display)
    with filesystem.open_input_file(inner) as f:
        return f.read_at(end - start, start)


def _count_lines(stage: Stage, display: str, start: int, end: int) -> int:
    """Newlines in bytes [start, end) of a file, read in 16 MB steps: the line numbers of the next block."""
    filesystem, inner = fs.resolve(display)
    n = 0
    with filesystem.open_input_file(inner) as f:
        for pos in range(start, end, 16 * 2**20):
            n += f.read_at(min(16 * 2**20, end - pos), pos).count(b"\n")
    return n


def _read_file(stage: Stage, display: str, role: str, spec, index: int, piece_no: int = 0, piece=None,
               line_offset: int = 0) -> dict:
    """Parse one file, or one block of it (``piece``, see :func:`plan_pieces`), and write its rows to the
    buckets; returns the parse result without rows."""
    from eimf.data.formats import interaction_columns, parse_parquet_frame, read_parquet_columns

    if piece is None:
        raw = fs.read_bytes(display)
    elif piece[0] == "text":
        _, start, end, header = piece
        raw = header + _read_range(display, start, end)
    else:  # Parquet row groups: only the log's columns of those groups are read
        _, groups, line_offset = piece
        filesystem, inner = fs.resolve(display)

        def raw():
            with filesystem.open_input_file(inner) as f:
                df = read_parquet_columns(display, f, interaction_columns(spec), row_groups=groups)
            return parse_parquet_frame(display, df, spec, line_offset)
    out, table = parse_file_table(display, raw, role, spec, line_offset)
    if table is not None:
        if role == ROLE_INTERACTIONS:
            table["row"] = table["row"].to_numpy(np.int64) | (np.int64(piece_no) << np.int64(32))  # file order
            b, cols, where = bucket_of(table["user"].to_numpy(), stage.buckets), ["user", "item", "ts", "row", "line"], "rows"
        else:
            b, cols, where = bucket_of(table["item"].to_numpy(), stage.buckets), ["item", "text", "line"], "catalogue"
        for k in range(stage.buckets):
            _put(table.loc[b == k, cols].reset_index(drop=True),
                 stage.path(where, f"b{k}", f"f{index}_p{piece_no}.parquet"))
    return out


def plan_pieces(display: str, spec, block_bytes: int) -> List[Optional[tuple]]:
    """How to cut an interaction file for parsing: ``[None]`` (whole, one task), Parquet row groups
    ``("parquet", [groups], rows before them)``, or byte ranges of a text file that start and end at a line end
    ``("text", start, end, header)`` (later blocks of a delimited file get its header line in front). Compressed
    files are not cut. A quoted field that spans lines must not straddle a cut (the parsers' line numbers
    assume none does)."""
    import pyarrow.parquet as pq

    from eimf.data.formats import detect_format

    size = int(fs.file_info(display).get("size") or 0)
    if size <= block_bytes:
        return [None]
    fmt = spec.format if spec.format != "auto" else detect_format(display)
    filesystem, inner = fs.resolve(display)
    with filesystem.open_input_file(inner) as f:
        if fmt == "parquet":
            md = pq.ParquetFile(f).metadata
            pieces, groups, held, rows = [], [], 0, 0
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                groups.append(g)
                held += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
                if held >= block_bytes or g == md.num_row_groups - 1:
                    pieces.append(("parquet", groups, rows))
                    rows += sum(md.row_group(x).num_rows for x in groups)
                    groups, held = [], 0
            return pieces if len(pieces) > 1 else [None]
        head = f.read_at(min(size, 2**20), 0)
        if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
            return [None]
        header = b""
        if fmt in ("csv", "tsv", "dat") and spec.header:
            if b"\n" not in head:
                return [None]
            header = head[:head.index(b"\n") + 1]
        cuts = [0]
        while cuts[-1] + block_bytes < size:
            pos = max(cuts[-1] + block_bytes, len(header))
            window = b""
            while b"\n" not in window and pos + len(window) < size:
                window += f.read_at(min(2**20, size - pos - len(window)), pos + len(window))
            if b"\n" not in window:
                break
            cut = pos + window.index(b"\n") + 1
            if cut >= size:
                break
            cuts.append(cut)
    cuts.append(size)
    if len(cuts) <= 2:
        return [None]
    return [("text", a, b, header if i else b"") for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]


def _combine_pieces(outs: List[dict]) -> dict:
    """One file's result from its blocks' results (in order): the first error, else sums and merged drops."""
    from eimf.data.formats import Drops

    if len(outs) == 1:
        return outs[0]
    for o in outs:
        if o["error_kind"] == "data":
            return o
    full = [o for o in outs if o["error_kind"] != "empty"]
    if not full:
        return outs[0]
    drops = Drops()
    for o in full:
        drops.merge(Drops.from_dict(o["drops"]))
    out = dict(full[0])
    for k in ("rows_in", "rows_kept", "blank_lines", "empty_sequences"):
        out[k] = sum(o[k] for o in full)
    out["drops"] = drops.to_dict()
    return out


def _catalogue_bucket(stage: Stage, ib: int, files: List[int]) -> dict:
    """Repeated catalogue items of one item bucket (first wins, in file order): count and first positions."""
    parts = []
    for j in files:
        df = _get(stage.path("catalogue", f"b{ib}", f"f{j}_p0.parquet"))
        df["file"] = np.int64(j)
        parts.append(df)
    cat = pd.concat(parts, ignore_index=True)
    dup = cat["item"].duplicated(keep="first").to_numpy()
    first = [(int(cat["file"].iat[i]), int(cat["line"].iat[i]), str(cat["item"].iat[i]))
             for i in np.flatnonzero(dup)[:MAX_EXAMPLES]]
    _put(cat.loc[~dup, ["item", "text"]].reset_index(drop=True), stage.path("catalogue_unique", f"b{ib}.parquet"))
    return {"duplicates": int(dup.sum()), "first": first}


def _user_pass(stage: Stage, ub: int, t: int, min_count: int, dedupe: str, has_time: bool,
               files: List[Tuple[int, int]]) -> dict:
    """Pass ``t`` of the k-core over one user bucket. Pass 0 gathers the bucket's rows, orders each user's
    interactions by (time, file, row) and drops repeats; later passes drop the rows whose user or item fell short
    in pass t-1. Writes the bucket's rows and its partial item counts of this pass."""
    out: dict = {}
    state_path = stage.path("kcore", f"b{ub}.parquet")
    if t == 0:
        parts = []
        for j, c in files:  # (file, block) in file order
            df = _get(stage.path("rows", f"b{ub}", f"f{j}_p{c}.parquet"))
            df["file"] = np.int64(j)
            parts.append(df)
        df = pd.concat(parts, ignore_index=True)
        # each item's first row in file order, for the catalogue check's message
        pos = (df["file"].to_numpy(np.int64) << _POS_SHIFT) | df["row"].to_numpy(np.int64)
        first = pd.DataFrame({"item": df["item"].to_numpy(dtype=object), "pos": pos, "line": df["line"].to_numpy()})
        first = first.sort_values("pos", kind="stable").drop_duplicates("item").set_index("item")
        u_codes = pd.factorize(df["user"])[0]
        time_keys = (df["ts"].to_numpy(),) if has_time else ()
        order = np.lexsort((df["row"].to_numpy(), df["file"].to_numpy(), *time_keys, u_codes))
        u, it = df["user"].to_numpy(dtype=object)[order], df["item"].to_numpy(dtype=object)[order]
        dup = repeats(u, it, dedupe)
        state = pd.DataFrame({"user": pd.array(u[~dup], dtype="str"), "item": pd.array(it[~dup], dtype="str")})
        out.update(rows=len(df), users_in=int(pd.unique(u).size), duplicates_removed=int(dup.sum()))
        changed = True
    else:
        state = _get(state_path)
        short_items = _concat([stage.path("short_items", f"t{t - 1}", f"u{ub}", f"i{ib}.parquet")
                               for ib in range(stage.buckets)])["item"]
        uc = state.groupby("user", sort=False)["user"].transform("size").to_numpy()
        bad = (uc < min_count) | state["item"].isin(short_items).to_numpy()
        out["removed"] = int(bad.sum())
        changed = bool(bad.any())
        state = state.loc[~bad].reset_index(drop=True)
    if changed:
        _put(state, state_path)
    per_user = state.groupby("user", sort=False).size()
    out.update(rows_now=len(state), short_users=int((per_user.to_numpy() < min_count).sum()))
    counts = state.groupby("item", sort=False).size()
    partial = pd.DataFrame({"item": pd.array(counts.index.to_numpy(dtype=object), dtype="str"),
                            "n": counts.to_numpy(np.int64)})
    if t == 0:
        at = first.reindex(partial["item"].to_numpy(dtype=object))
        partial["pos"], partial["line"] = at["pos"].to_numpy(np.int64), at["line"].to_numpy(np.int64)
    b = bucket_of(partial["item"].to_numpy(), stage.buckets)
    for ib in range(stage.buckets):
        _put(partial.loc[b == ib].reset_index(drop=True), stage.partials(t, ub, ib))
    return out


def _item_pass(stage: Stage, ib: int, t: int, min_count: int, catalogue: bool) -> dict:
    """Pass ``t`` over one item bucket: its items' counts summed over the user buckets; tells each user bucket
    which of its items fell short. Pass 0 also joins the catalogue (what the raw data lacks)."""
    parts = [_get(stage.partials(t, ub, ib)) for ub in range(stage.buckets)]
    every = pd.concat(parts, ignore_index=True)
    total = every.groupby("item", sort=False)["n"].sum()
    short = total.index[total.to_numpy() < min_count]
    for ub, part in enumerate(parts):
        _put(pd.DataFrame({"item": part.loc[part["item"].isin(short), "item"].reset_index(drop=True)}),
             stage.path("short_items", f"t{t}", f"u{ub}", f"i{ib}.parquet"))
    out = {"short_items": int(len(short)), "items": int(len(total))}
    if t == 0 and catalogue:
        known = pd.Index(_get(stage.path("catalogue_unique", f"b{ib}.parquet"))["item"].astype("str"))
        interacted = pd.Index(total.index.astype("str"))
        in_cat = known.get_indexer(interacted) >= 0
        out.update(not_in_catalogue=int((~in_cat).sum()), catalogue_items=int(len(known)),
                   never_interacted=int((interacted.get_indexer(known) < 0).sum()))
        if (~in_cat).any():
            miss = every.loc[every["item"].isin(interacted[~in_cat])].sort_values("pos", kind="stable").iloc[0]
            out["first_missing"] = (int(miss["pos"]), int(miss["line"]), str(miss["item"]))
    return out


def _item_final(stage: Stage, ib: int, t: int, numeric: bool, catalogue: bool) -> dict:
    """One item bucket's surviving items with count and text, sorted by (count desc, raw id)."""
    every = _concat([stage.partials(t, ub, ib) for ub in range(stage.buckets)])
    total = every.groupby("item", sort=False)["n"].sum()
    raw = total.index.to_numpy(dtype=object).astype(str)
    text, missing = item_texts(_get(stage.path("catalogue_unique", f"b{ib}.parquet")) if catalogue else None, raw)
    df = pd.DataFrame({"neg_count": -total.to_numpy(np.int64), "key": raw_order_key(raw, numeric),
                       "raw_id": pd.array(raw, dtype="str"), "count": total.to_numpy(np.int64),
                       "text": pd.array(text, dtype="str"), "missing": missing})
    _put(df.sort_values(["neg_count", "key"], kind="stable").reset_index(drop=True),
         stage.path("items", f"b{ib}.parquet"), _merge_batch(stage.buckets))
    return {"items": len(df)}


def _user_final(stage: Stage, ub: int, numeric: bool) -> dict:
    """One user bucket's surviving users with their interaction counts, sorted by raw id."""
    n = _get(stage.path("kcore", f"b{ub}.parquet")).groupby("user", sort=False).size()
    raw = n.index.to_numpy(dtype=object).astype(str)
    df = pd.DataFrame({"key": raw_order_key(raw, numeric), "raw_id": pd.array(raw, dtype="str"),
                       "n_interactions": n.to_numpy(np.int64)})
    _put(df.sort_values("key", kind="stable").reset_index(drop=True), stage.path("users", f"b{ub}.parquet"),
         _merge_batch(stage.buckets))
    return {"users": len(df)}


class _IdParts:
    """The new ids the driver hands out during a merge, (raw id, id) per bucket, written as small part files (a
    few thousand rows each) so that the driver holds no open writer per bucket."""

    ROWS = 8_192

    def __init__(self, stage: Stage, name: str):
        self.stage, self.name = stage, name
        self.buf: Dict[int, list] = {}
        self.held: Dict[int, int] = {}
        self.parts = [0] * stage.buckets

    def add(self, bucket: int, raw, ids: np.ndarray) -> None:
        import pyarrow as pa

        self.buf.setdefault(bucket, []).append(pa.table({"raw_id": raw, "id": ids}))
        self.held[bucket] = self.held.get(bucket, 0) + len(ids)
        if self.held[bucket] >= self.ROWS:
            self._flush(bucket)

    def _flush(self, bucket: int) -> None:
        import pyarrow as pa

        _put(pa.concat_tables(self.buf.pop(bucket)), self.stage.path(self.name, f"b{bucket}", f"p{self.parts[bucket]}.parquet"))
        self.parts[bucket] += 1
        self.held[bucket] = 0

    def close(self) -> List[int]:
        """Flush; -> the number of parts of each bucket."""
        for bucket in list(self.buf):
            self._flush(bucket)
        return self.parts


def _read_ids(stage: Stage, name: str, bucket: int, parts: int) -> pd.DataFrame:
    if parts == 0:  # a bucket that kept no user (or item)
        return pd.DataFrame({"raw_id": pd.array([], dtype="str"), "id": np.zeros(0, dtype=np.int64)})
    return _concat([stage.path(name, f"b{bucket}", f"p{k}.parquet") for k in range(parts)])


def _item_ids_for_users(stage: Stage, ib: int, t: int, parts: int) -> None:
    """Hand each user bucket the new ids of the items of this item bucket that it holds (a join by bucket)."""
    ids = _read_ids(stage, "item_ids", ib, parts)
    by_raw = pd.Series(ids["id"].to_numpy(np.int64), index=ids["raw_id"].astype("str").to_numpy())
    for ub in range(stage.buckets):
        raw = _get(stage.partials(t, ub, ib))["item"].to_numpy(dtype=object).astype(str)
        _put(pd.DataFrame({"raw_id": pd.array(raw, dtype="str"), "id": by_raw.reindex(raw).to_numpy(np.int64)}),
             stage.path("item_ids_of", f"u{ub}", f"i{ib}.parquet"))


def _user_split(stage: Stage, ub: int, split_of, cfg, n_users: int, ranges: int, id_parts: int) -> dict:
    """Map one user bucket's rows to the new ids, cut each user's sequence for its split, write by id range."""
    import pyarrow as pa

    state = _get(stage.path("kcore", f"b{ub}.parquet"))
    uids = _read_ids(stage, "user_ids", ub, id_parts)
    iids = _concat([stage.path("item_ids_of", f"u{ub}", f"i{ib}.parquet") for ib in range(stage.buckets)])
    users = pd.Series(uids["id"].to_numpy(np.int64), index=uids["raw_id"].astype("str").to_numpy()).reindex(
        state["user"].to_numpy(dtype=object).astype(str)).to_numpy(np.int64)
    items = pd.Series(iids["id"].to_numpy(np.int64), index=iids["raw_id"].astype("str").to_numpy()).reindex(
        state["item"].to_numpy(dtype=object).astype(str)).to_numpy(np.int64)
    regroup = np.argsort(users, kind="stable")  # a user's rows are in time order: keep it
    users, items = users[regroup], items[regroup]
    present, starts, lens = np.unique(users, return_index=True, return_counts=True)
    tables, counts = cut_sequences(present, starts, lens, items, split_of, cfg)
    for name, table in tables.items():
        r = (table.column("user").to_numpy() - 1) * ranges // n_users
        for k in range(ranges):
            _put(table.filter(pa.array(r == k)), stage.path("split", name, f"r{k}", f"u{ub}.parquet"))
    return counts


# ------------------------------------------------------------------------------------------------ driver
def _merge_batch(n_files: int) -> int:
    """Rows per file and batch in :func:`merge_sorted`: a share of :data:`MERGE_ROWS`. The sorted bucket files are
    written in row groups of this size too, since a Parquet reader decodes a whole group at once."""
    return max(1024, MERGE_ROWS // max(1, n_files))


def merge_sorted(paths: Sequence[str], keys: Sequence[str], batch_rows: int = 0
                 ) -> Iterator[Tuple["object", np.ndarray]]:
    """Merge Parquet files that are each sorted by ``keys`` (unique across files) -> (rows in order, index of the
    source file of each row), batch by batch; memory: one batch of ``batch_rows`` per file (0: a share of
    :data:`MERGE_ROWS`, so the total does not grow with the number of files)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    batch_rows = batch_rows or _merge_batch(len(paths))
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
    import pyarrow as pa
    import ray

    from eimf.ray_init import init_ray

    init_ray(log_to_driver=False)
    timing: Dict[str, float] = {}
    t0 = time.perf_counter()
    if cfg.buckets > 0:
        B = cfg.buckets
    else:
        B = bucket_count(rows if rows is not None else estimate_rows(inputs.interaction_files))
    stage = Stage(fs.join(out, "_stage"), B)
    _delete(stage.root)
    traced = ray.remote(num_cpus=1)(_traced)
    env = fs.s3_env()
    worker_rss: List[float] = []

    def run(fn, calls: List[tuple]) -> list:
        got = ray.get([traced.remote(env, fn, stage, *args) for args in calls])
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
                        run(_count_lines, [(inputs.interaction_files[j], piece[1], piece[2]) for j, c, piece in texts])))
    jobs = []  # (path, role, spec, file index, block index, block, line offset)
    for j, (p, plan) in enumerate(zip(inputs.interaction_files, plans)):
        before = 0
        for c, piece in enumerate(plan):
            offset = 0
            if piece is not None and piece[0] == "text" and c:
                offset = before - (1 if piece[3] else 0)  # the header put in front is the parser's line 1
            jobs.append((p, ROLE_INTERACTIONS, spec, j, c, piece, offset))
            before += newlines.get((j, c), 0)
    n_pieces = len(jobs)
    jobs += [(p, ROLE_CATALOGUE, cat_spec, j) for j, p in enumerate(cat_files)]
    got = run(_read_file, jobs)
    pieces = list(zip(jobs[:n_pieces], got[:n_pieces]))
    results = [_combine_pieces([o for job, o in pieces if job[3] == j])
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
        dups = run(_catalogue_bucket, [(ib, cfiles) for ib in range(B)])
        n_dup = sum(d["duplicates"] for d in dups)
        if n_dup:
            first = sorted(x for d in dups for x in d["first"])[:MAX_EXAMPLES]
            if cat_spec.on_bad_rows == "error":
                j, line, item = first[0]
                raise duplicate_item_error(cat_files[j], line, cat_spec.item_col, item)
            summary.catalogue_drops.add("duplicate_item", n_dup, [f"{cat_files[j]}:{line}" for j, line, _ in first])

    k = cfg.min_count
    ups = run(_user_pass, [(ub, 0, k, cfg.dedupe, summary.has_time, files) for ub in range(B)])
    c["rows_valid"] = sum(u["rows"] for u in ups)
    assert c["rows_in"] == c["rows_valid"] + c["rows_dropped"], "row accounting broken"
    ips = run(_item_pass, [(ib, 0, k, has_cat) for ib in range(B)])
    c["users_in"], c["items_in"] = sum(u["users_in"] for u in ups), sum(i["items"] for i in ips)
    c["interactions_in"] = c["rows_valid"]
    if has_cat:
        c["items_not_in_catalogue_in"] = sum(i["not_in_catalogue"] for i in ips)
        c["catalogue_items"] = sum(i["catalogue_items"] for i in ips)
        c["catalogue_items_never_interacted"] = sum(i["never_interacted"] for i in ips)
        misses = [i["first_missing"] for i in ips if "first_missing" in i]
        if misses:
            pos, line, item = min(misses)
            where = f"{inputs.interaction_files[pos >> _POS_SHIFT]}, line {line}"
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
        ups = run(_user_pass, [(ub, step, k, cfg.dedupe, summary.has_time, files) for ub in range(B)])
        removed.append(sum(u["removed"] for u in ups))
        ips = run(_item_pass, [(ib, step, k, False) for ib in range(B)])
    c["kcore_rounds"], c["kcore_removed_interactions"] = len(removed), int(sum(removed))
    n_rows = sum(u["rows_now"] for u in ups)
    if n_rows == 0:
        raise empty_kcore_error(k, c["interactions_in"])
    timing["kcore"] = round(time.perf_counter() - t, 3)
    log.info("%s: %d-core in %d rounds, %.1f s", inputs.dataset, k, len(removed), timing["kcore"])

    # re-index: items by (count desc, raw id), users by raw id, merged from the sorted buckets
    t = time.perf_counter()
    run(_item_final, [(ib, step, inputs.interaction_spec.numeric_ids, has_cat) for ib in range(B)])
    run(_user_final, [(ub, inputs.interaction_spec.numeric_ids) for ub in range(B)])
    items_out = TableWriter(fs.join(out, "items.parquet"))
    id_out = _IdParts(stage, "item_ids")
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
    uid_out = _IdParts(stage, "user_ids")
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
    run(_item_ids_for_users, [(ib, step, item_parts[ib]) for ib in range(B)])
    timing["reindex"] = round(time.perf_counter() - t, 3)
    log.info("%s: %d items and %d users re-indexed in %.1f s", inputs.dataset, n_items, n_users, timing["reindex"])

    # split: the shuffle on U ids here, the cut in the user buckets, the tables written range by range
    t = time.perf_counter()
    split_of = split_codes(n_users, cfg.split_seed, list(cfg.split_ratios)) if cfg.split == "user" else None
    ranges = max(1, math.ceil(n_rows / ROWS_PER_RANGE))
    split_ref = ray.put(split_of)
    parts = run(_user_split, [(ub, split_ref, cfg, n_users, ranges, user_parts[ub]) for ub in range(B)])
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
            got = pa.concat_tables([_get_table(stage.path("split", name, f"r{r}", f"u{ub}.parquet")).cast(schema)
                                    for ub in range(B)])
            writer.write(got.take(got.column("user").to_numpy().argsort(kind="stable")))
        writer.close()
    timing["split"] = round(time.perf_counter() - t, 3)
    log.info("%s: split and written in %.1f s", inputs.dataset, timing["split"])
    _delete(stage.root)
    return BucketedResult(summary, c, removed, n_items, n_users, timing, B, round(max(worker_rss), 1), n_pieces)
