"""The Ray engine's tasks: each works on one bucket (or one block of an input file) in a stage folder, so that no
process holds the whole log. :mod:`eimf.data.distributed` (the driver) runs them as Ray tasks and passes counts
between them; they read and write their buckets' Parquet files (local or ``s3://``) through :class:`Stage`.

Every interaction lives in the *user bucket* of its raw user id, every catalogue row in the *item bucket* of its raw
item id (:func:`bucket_of`, a stable hash). The tasks apply the transforms of :mod:`eimf.data.transforms` per bucket:
``read_file`` (parse and validate a file or block, write its rows to the buckets), ``catalogue_bucket`` (repeated
catalogue items), ``user_pass`` / ``item_pass`` (order, repeats, one k-core pass), ``item_final`` / ``user_final``
(sorted for the re-index merge), ``item_ids_for_users`` and ``user_split`` (new ids, split, written by user range).
"""
from __future__ import annotations

import io
import os
import resource
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from eimf import fs
from eimf.data.ingest import ROLE_INTERACTIONS, parse_file_table
from eimf.data.parsers import (MAX_EXAMPLES, Drops, detect_format, interaction_columns, parse_parquet_frame,
                               read_parquet_columns)
from eimf.data.transforms import cut_sequences, item_texts, raw_order_key, repeats

#: Rows the driver's merge of sorted buckets holds, over all buckets together.
MERGE_ROWS = 65_536
#: An interaction's position in the input, for messages: file index << 40 | row in the file.
POS_SHIFT = 40


@dataclass(frozen=True)
class Stage:
    """The stage folder and the bucket count: all a task needs to find its inputs."""

    root: str
    buckets: int

    def path(self, *parts: str) -> str:
        return fs.join(self.root, *parts)

    def partials(self, t: int, ub: int, ib: int) -> str:
        return self.path("item_counts", f"t{t}", f"u{ub}", f"i{ib}.parquet")



def bucket_of(keys, buckets: int) -> np.ndarray:
    """Bucket of each raw id: pandas' stable 64-bit hash, the same in every process and on every node."""
    return (pd.util.hash_array(np.asarray(keys, dtype=object)) % np.uint64(buckets)).astype(np.int64)


def put(frame, path: str, row_group_rows: int = MERGE_ROWS) -> None:
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_rows)
    fs.write_bytes(path, buf.getvalue())


def get_table(path: str):
    return pq.read_table(pa.BufferReader(fs.read_bytes(path)))


def get(path: str) -> pd.DataFrame:
    return get_table(path).to_pandas()


def concat(paths: Sequence[str]) -> pd.DataFrame:
    return pd.concat([get(p) for p in paths], ignore_index=True)


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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def traced(env: dict, fn, *args):
    """Run a bucket task with the driver's S3 settings (``env``); also return its worker's peak RSS so far, in MB
    (workers are reused across tasks)."""
    os.environ.update(env)
    return fn(*args), peak_rss_mb()


def _read_range(display: str, start: int, end: int) -> bytes:
    filesystem, inner = fs.resolve(display)
    with filesystem.open_input_file(inner) as f:
        return f.read_at(end - start, start)


def count_lines(stage: Stage, display: str, start: int, end: int) -> int:
    """Newlines in bytes [start, end) of a file, read in 16 MB steps: the line numbers of the next block."""
    filesystem, inner = fs.resolve(display)
    n = 0
    with filesystem.open_input_file(inner) as f:
        for pos in range(start, end, 16 * 2**20):
            n += f.read_at(min(16 * 2**20, end - pos), pos).count(b"\n")
    return n


def read_file(stage: Stage, display: str, role: str, spec, index: int, piece_no: int = 0, piece=None,
              line_offset: int = 0, window=None) -> dict:
    """Parse one file, or one block of it (``piece``, see :func:`plan_pieces`), and write its rows to the
    buckets; returns the parse result without rows. ``window``: the training window
    (:class:`eimf.data.ingest.Window`)."""
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
    out, table = parse_file_table(display, raw, role, spec, line_offset, window)
    if table is not None:
        if role == ROLE_INTERACTIONS:
            table["row"] = table["row"].to_numpy(np.int64) | (np.int64(piece_no) << np.int64(32))  # file order
            b, cols, where = bucket_of(table["user"].to_numpy(), stage.buckets), ["user", "item", "ts", "row", "line"], "rows"
        else:
            b, cols, where = bucket_of(table["item"].to_numpy(), stage.buckets), ["item", "text", "line"], "catalogue"
        for k in range(stage.buckets):
            put(table.loc[b == k, cols].reset_index(drop=True),
                stage.path(where, f"b{k}", f"f{index}_p{piece_no}.parquet"))
    return out


def plan_pieces(display: str, spec, block_bytes: int) -> List[Optional[tuple]]:
    """How to cut an interaction file for parsing: ``[None]`` (whole, one task), Parquet row groups
    ``("parquet", [groups], rows before them)``, or byte ranges of a text file that start and end at a line end
    ``("text", start, end, header)`` (later blocks of a delimited file get its header line in front). Compressed
    files are not cut. A quoted field that spans lines must not straddle a cut (the parsers' line numbers
    assume none does)."""
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


def combine_pieces(outs: List[dict]) -> dict:
    """One file's result from its blocks' results (in order): the first error, else sums and merged drops."""
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


def catalogue_bucket(stage: Stage, ib: int, files: List[int]) -> dict:
    """Repeated catalogue items of one item bucket (first wins, in file order): count and first positions."""
    parts = []
    for j in files:
        df = get(stage.path("catalogue", f"b{ib}", f"f{j}_p0.parquet"))
        df["file"] = np.int64(j)
        parts.append(df)
    cat = pd.concat(parts, ignore_index=True)
    dup = cat["item"].duplicated(keep="first").to_numpy()
    first = [(int(cat["file"].iat[i]), int(cat["line"].iat[i]), str(cat["item"].iat[i]))
             for i in np.flatnonzero(dup)[:MAX_EXAMPLES]]
    put(cat.loc[~dup, ["item", "text"]].reset_index(drop=True), stage.path("catalogue_unique", f"b{ib}.parquet"))
    return {"duplicates": int(dup.sum()), "first": first}


def user_pass(stage: Stage, ub: int, t: int, min_count: int, dedupe: str, has_time: bool,
              files: List[Tuple[int, int]]) -> dict:
    """Pass ``t`` of the k-core over one user bucket. Pass 0 gathers the bucket's rows, orders each user's
    interactions by (time, file, row) and drops repeats; later passes drop the rows whose user or item fell short
    in pass t-1. Writes the bucket's rows and its partial item counts of this pass."""
    out: dict = {}
    state_path = stage.path("kcore", f"b{ub}.parquet")
    if t == 0:
        parts = []
        for j, c in files:  # (file, block) in file order
            df = get(stage.path("rows", f"b{ub}", f"f{j}_p{c}.parquet"))
            df["file"] = np.int64(j)
            parts.append(df)
        df = pd.concat(parts, ignore_index=True)
        # each item's first row in file order, for the catalogue check's message
        pos = (df["file"].to_numpy(np.int64) << POS_SHIFT) | df["row"].to_numpy(np.int64)
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
        state = get(state_path)
        short_items = concat([stage.path("short_items", f"t{t - 1}", f"u{ub}", f"i{ib}.parquet")
                              for ib in range(stage.buckets)])["item"]
        uc = state.groupby("user", sort=False)["user"].transform("size").to_numpy()
        bad = (uc < min_count) | state["item"].isin(short_items).to_numpy()
        out["removed"] = int(bad.sum())
        changed = bool(bad.any())
        state = state.loc[~bad].reset_index(drop=True)
    if changed:
        put(state, state_path)
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
        put(partial.loc[b == ib].reset_index(drop=True), stage.partials(t, ub, ib))
    return out


def item_pass(stage: Stage, ib: int, t: int, min_count: int, catalogue: bool) -> dict:
    """Pass ``t`` over one item bucket: its items' counts summed over the user buckets; tells each user bucket
    which of its items fell short. Pass 0 also joins the catalogue (what the raw data lacks)."""
    parts = [get(stage.partials(t, ub, ib)) for ub in range(stage.buckets)]
    every = pd.concat(parts, ignore_index=True)
    total = every.groupby("item", sort=False)["n"].sum()
    short = total.index[total.to_numpy() < min_count]
    for ub, part in enumerate(parts):
        put(pd.DataFrame({"item": part.loc[part["item"].isin(short), "item"].reset_index(drop=True)}),
            stage.path("short_items", f"t{t}", f"u{ub}", f"i{ib}.parquet"))
    out = {"short_items": int(len(short)), "items": int(len(total))}
    if t == 0 and catalogue:
        known = pd.Index(get(stage.path("catalogue_unique", f"b{ib}.parquet"))["item"].astype("str"))
        interacted = pd.Index(total.index.astype("str"))
        in_cat = known.get_indexer(interacted) >= 0
        out.update(not_in_catalogue=int((~in_cat).sum()), catalogue_items=int(len(known)),
                   never_interacted=int((interacted.get_indexer(known) < 0).sum()))
        if (~in_cat).any():
            miss = every.loc[every["item"].isin(interacted[~in_cat])].sort_values("pos", kind="stable").iloc[0]
            out["first_missing"] = (int(miss["pos"]), int(miss["line"]), str(miss["item"]))
    return out


def item_final(stage: Stage, ib: int, t: int, numeric: bool, catalogue: bool) -> dict:
    """One item bucket's surviving items with count and text, sorted by (count desc, raw id)."""
    every = concat([stage.partials(t, ub, ib) for ub in range(stage.buckets)])
    total = every.groupby("item", sort=False)["n"].sum()
    raw = total.index.to_numpy(dtype=object).astype(str)
    text, missing = item_texts(get(stage.path("catalogue_unique", f"b{ib}.parquet")) if catalogue else None, raw)
    df = pd.DataFrame({"neg_count": -total.to_numpy(np.int64), "key": raw_order_key(raw, numeric),
                       "raw_id": pd.array(raw, dtype="str"), "count": total.to_numpy(np.int64),
                       "text": pd.array(text, dtype="str"), "missing": missing})
    put(df.sort_values(["neg_count", "key"], kind="stable").reset_index(drop=True),
        stage.path("items", f"b{ib}.parquet"), merge_batch(stage.buckets))
    return {"items": len(df)}


def user_final(stage: Stage, ub: int, numeric: bool) -> dict:
    """One user bucket's surviving users with their interaction counts, sorted by raw id."""
    n = get(stage.path("kcore", f"b{ub}.parquet")).groupby("user", sort=False).size()
    raw = n.index.to_numpy(dtype=object).astype(str)
    df = pd.DataFrame({"key": raw_order_key(raw, numeric), "raw_id": pd.array(raw, dtype="str"),
                       "n_interactions": n.to_numpy(np.int64)})
    put(df.sort_values("key", kind="stable").reset_index(drop=True), stage.path("users", f"b{ub}.parquet"),
        merge_batch(stage.buckets))
    return {"users": len(df)}


class IdParts:
    """The new ids the driver hands out during a merge, (raw id, id) per bucket, written as small part files (a
    few thousand rows each) so that the driver holds no open writer per bucket."""

    ROWS = 8_192

    def __init__(self, stage: Stage, name: str):
        self.stage, self.name = stage, name
        self.buf: Dict[int, list] = {}
        self.held: Dict[int, int] = {}
        self.parts = [0] * stage.buckets

    def add(self, bucket: int, raw, ids: np.ndarray) -> None:
        self.buf.setdefault(bucket, []).append(pa.table({"raw_id": raw, "id": ids}))
        self.held[bucket] = self.held.get(bucket, 0) + len(ids)
        if self.held[bucket] >= self.ROWS:
            self._flush(bucket)

    def _flush(self, bucket: int) -> None:
        put(pa.concat_tables(self.buf.pop(bucket)), self.stage.path(self.name, f"b{bucket}", f"p{self.parts[bucket]}.parquet"))
        self.parts[bucket] += 1
        self.held[bucket] = 0

    def close(self) -> List[int]:
        """Flush; -> the number of parts of each bucket."""
        for bucket in list(self.buf):
            self._flush(bucket)
        return self.parts


def read_ids(stage: Stage, name: str, bucket: int, parts: int) -> pd.DataFrame:
    if parts == 0:  # a bucket that kept no user (or item)
        return pd.DataFrame({"raw_id": pd.array([], dtype="str"), "id": np.zeros(0, dtype=np.int64)})
    return concat([stage.path(name, f"b{bucket}", f"p{k}.parquet") for k in range(parts)])


def item_ids_for_users(stage: Stage, ib: int, t: int, parts: int) -> None:
    """Hand each user bucket the new ids of the items of this item bucket that it holds (a join by bucket)."""
    ids = read_ids(stage, "item_ids", ib, parts)
    by_raw = pd.Series(ids["id"].to_numpy(np.int64), index=ids["raw_id"].astype("str").to_numpy())
    for ub in range(stage.buckets):
        raw = get(stage.partials(t, ub, ib))["item"].to_numpy(dtype=object).astype(str)
        put(pd.DataFrame({"raw_id": pd.array(raw, dtype="str"), "id": by_raw.reindex(raw).to_numpy(np.int64)}),
            stage.path("item_ids_of", f"u{ub}", f"i{ib}.parquet"))


def user_split(stage: Stage, ub: int, split_of, cfg, n_users: int, ranges: int, id_parts: int) -> dict:
    """Map one user bucket's rows to the new ids, cut each user's sequence for its split, write by id range."""
    state = get(stage.path("kcore", f"b{ub}.parquet"))
    uids = read_ids(stage, "user_ids", ub, id_parts)
    iids = concat([stage.path("item_ids_of", f"u{ub}", f"i{ib}.parquet") for ib in range(stage.buckets)])
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
            put(table.filter(pa.array(r == k)), stage.path("split", name, f"r{k}", f"u{ub}.parquet"))
    return counts



def merge_batch(n_files: int) -> int:
    """Rows per file and batch in :func:`merge_sorted`: a share of :data:`MERGE_ROWS`. The sorted bucket files are
    written in row groups of this size too, since a Parquet reader decodes a whole group at once."""
    return max(1024, MERGE_ROWS // max(1, n_files))

