"""Read interaction files and item catalogues (local folders and ``s3://`` alike), one file at a time.

:func:`parse_file_table` parses one file with :mod:`eimf.data.parsers` (catalogues in a dataset's own layout with
the parser of its family in :mod:`eimf.data.datasets`, :func:`parse_catalogue`), so errors keep the exact file and line;
it never raises for bad data, the error travels back as text and :func:`summarize` raises the first one in file
order. The Ray engine (:mod:`eimf.data.distributed`) runs it in one task per file and keeps the rows in buckets;
:func:`ingest` runs it here and returns one table, for the local engine.

A training window (``data.since`` / ``data.until`` / ``data.replay``, :class:`Window`) is applied here too, to each
parsed file or block, so both engines see the same rows: interactions outside it are counted as dropped
(``before_window``, ``after_window``), a replayed share of those before it is kept.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd

import pyarrow as pa

from eimf import fs
from eimf.data.datasets import CATALOGUE_PARSERS
from eimf.data.parsers import (MAX_EXAMPLES, TABLE_FORMATS, CatalogueSpec, DataError, Drops, EmptyFileError,
                               InteractionSpec, ParseResult, detect_format, parse_catalogue_table, parse_interactions)

log = logging.getLogger(__name__)

ROLE_INTERACTIONS = "interactions"
ROLE_CATALOGUE = "catalogue"
#: Every catalogue format: the generic tables, then the datasets' own layouts.
CATALOGUE_FORMATS = TABLE_FORMATS + tuple(CATALOGUE_PARSERS)


def parse_catalogue(path: str, raw: bytes, spec: CatalogueSpec) -> ParseResult:
    """Parse one item catalogue: a dataset's own layout (``ml1m-movies``, ``ml100k-items``, ``p5-datamaps``) or a
    generic table; ``auto``: the format from the file name."""
    fmt = spec.format if spec.format != "auto" else detect_format(path)
    if fmt in CATALOGUE_PARSERS:
        return CATALOGUE_PARSERS[fmt](path, raw, spec)
    if fmt in TABLE_FORMATS:
        return parse_catalogue_table(path, raw, spec, fmt)
    raise DataError(f"{path}: unknown catalogue format {fmt!r}; use one of {', '.join(CATALOGUE_FORMATS)}")


@dataclass
class Ingested:
    """Validated rows of all files, in file order."""

    #: user (str), item (str), ts (order key), file (int, index in ``interaction_files``), row, line
    interactions: pd.DataFrame
    #: item (str), text (str), file, line; None without catalogue
    catalogue: Optional[pd.DataFrame]
    drops: Drops
    catalogue_drops: Drops
    rows_in: int
    catalogue_rows_in: int
    #: Per file: path, role, rows_in, rows_kept, drops, blank_lines, empty_sequences, empty
    files: List[dict] = field(default_factory=list)
    interaction_files: List[str] = field(default_factory=list)
    catalogue_files: List[str] = field(default_factory=list)
    #: False when the order is the file order (no time column).
    has_time: bool = True

    @property
    def empty_files(self) -> List[str]:
        return [f["path"] for f in self.files if f.get("empty")]


def _to_ipc(df: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(df, preserve_index=False)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def _from_ipc(payload: bytes) -> pd.DataFrame:
    return pa.ipc.open_stream(payload).read_all().to_pandas()


#: Drop reasons of the training window (:class:`Window`): not bad rows, so logged without a warning.
WINDOW_REASONS = ("before_window", "after_window")


@dataclass(frozen=True)
class Window:
    """The training window of ``data.since`` / ``data.until`` (``since <= time < until``, either open) and the
    replayed share ``replay`` of the interactions before ``since``. A row is replayed when a hash of its (user,
    item, time) and ``seed`` falls under ``replay``: the same rows whatever the engine, the blocks or the order."""

    since: Optional[float] = None
    until: Optional[float] = None
    replay: float = 0.0
    seed: int = 0

    @classmethod
    def of(cls, cfg) -> Optional["Window"]:
        """The window of a ``DataConfig``, or None when it sets none."""
        if getattr(cfg, "since", None) is None and getattr(cfg, "until", None) is None:
            return None
        return cls(cfg.since, cfg.until, float(cfg.replay), int(cfg.replay_seed))

    def apply(self, path: str, table: pd.DataFrame) -> tuple:
        """``(rows kept, Drops)`` of a parsed interaction table (``ts`` the time)."""
        ts = table["ts"].to_numpy().astype(np.float64)  # a block may parse as int64 where the whole file is float
        before = ts < self.since if self.since is not None else np.zeros(len(ts), dtype=bool)
        after = ts >= self.until if self.until is not None else np.zeros(len(ts), dtype=bool)
        if self.replay > 0 and before.any():
            idx = np.flatnonzero(before)
            drawn = replay_draw(table["user"].to_numpy()[idx], table["item"].to_numpy()[idx], ts[idx], self.seed)
            before[idx[drawn < self.replay]] = False
        drops = Drops()
        lines = table["line"].to_numpy()
        for reason, mask in (("before_window", before), ("after_window", after)):
            drops.add(reason, int(mask.sum()), [f"{path}:{int(x)}" for x in lines[mask][:MAX_EXAMPLES]])
        keep = ~(before | after)
        return (table if keep.all() else table.loc[keep].reset_index(drop=True)), drops


def replay_draw(users, items, ts: np.ndarray, seed: int) -> np.ndarray:
    """A number in [0, 1) per row from (user, item, time) and ``seed``: pandas' keyed SipHash of the ids and a mix
    of the time's float64, so every process and engine draws the same."""
    key = f"{int(seed) & 0xFFFFFFFFFFFF:016x}"
    h = pd.util.hash_array(np.asarray(users, dtype=object), hash_key=key, categorize=False)
    h = (h * np.uint64(0x9E3779B97F4A7C15)) ^ pd.util.hash_array(np.asarray(items, dtype=object), hash_key=key,
                                                                  categorize=False)
    h = (h * np.uint64(0xBF58476D1CE4E5B9)) ^ pd.util.hash_array(np.asarray(ts, dtype=np.float64))
    return (h >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def parse_file_table(display_path: str, raw, role: str, spec, line_offset: int = 0,
                     window: Optional[Window] = None) -> tuple:
    """Parse one file -> (result dict without payload, table or None); never raises for bad data (the error
    travels back as text, so that the first bad file in file order is the one reported). ``raw``: the file's
    bytes, or a callable that parses (a block of a file read another way, e.g. Parquet row groups);
    ``line_offset``: for a block of a text file, see :func:`eimf.data.parsers.parse_interactions`; ``window``:
    the training window, applied to an interaction file's rows (:class:`Window`)."""
    out = {"path": display_path, "role": role, "payload": b"", "rows_in": 0, "rows_kept": 0, "drops": {},
           "blank_lines": 0, "empty_sequences": 0, "has_time": False, "error": "", "error_kind": ""}
    try:
        if callable(raw):
            res = raw()
        elif role == ROLE_INTERACTIONS:
            res = parse_interactions(display_path, raw, spec, line_offset)
        else:
            res = parse_catalogue(display_path, raw, spec)
    except EmptyFileError as e:
        out.update(error=str(e), error_kind="empty")
        return out, None
    except DataError as e:
        out.update(error=str(e), error_kind="data")
        return out, None
    if window is not None and role == ROLE_INTERACTIONS:
        if not res.has_time:
            out.update(error=f"{display_path}: data.since/data.until need a time column, and this file has none "
                             f"(format {spec.format}, time column {spec.time_col!r})", error_kind="data")
            return out, None
        res.table, cut = window.apply(display_path, res.table)
        res.drops.merge(cut)
    out.update(rows_in=res.rows_in, rows_kept=len(res.table), drops=res.drops.to_dict(),
               blank_lines=res.blank_lines, empty_sequences=res.empty_sequences, has_time=res.has_time)
    return out, res.table


def parse_file(display_path: str, raw: bytes, role: str, spec, window: Optional[Window] = None) -> dict:
    """:func:`parse_file_table` with the table as Arrow IPC bytes in ``payload``."""
    out, table = parse_file_table(display_path, raw, role, spec, window=window)
    if table is not None:
        out["payload"] = _to_ipc(table)
    return out


@dataclass
class ReadSummary:
    """What the per-file results say together: counts, drops, file metadata; the rows stay where they are."""

    drops: Drops
    catalogue_drops: Drops
    rows_in: int
    catalogue_rows_in: int
    #: Per file: path, role, rows_in, rows_kept, drops, blank_lines, empty_sequences, empty
    files: List[dict]
    has_time: bool
    #: False when every catalogue file was empty (or none was given)
    has_catalogue: bool


def summarize(ordered: List[dict], spec: InteractionSpec, interaction_files: Sequence[str]) -> ReadSummary:
    """Per-file results in job order (interaction files, then catalogue files) -> :class:`ReadSummary`.

    Raises the first file's error in file order: a bad row (``DataError``), or an empty file in ``error`` mode;
    and ``DataError`` when no interaction is left at all. Logs each file's drops."""
    for r in ordered:
        if r["error_kind"] == "data" or (r["error_kind"] == "empty" and spec.on_bad_rows == "error"):
            raise (EmptyFileError if r["error_kind"] == "empty" else DataError)(r["error"])
    files_meta: List[dict] = []
    drops, cat_drops = Drops(), Drops()
    rows_in = cat_rows_in = kept = 0
    has_time, has_catalogue = True, False
    for r in ordered:
        meta = {k: r[k] for k in ("path", "role", "rows_in", "rows_kept", "blank_lines", "empty_sequences")}
        meta["drops"] = r["drops"].get("counts", {})
        meta["empty"] = r["error_kind"] == "empty"
        files_meta.append(meta)
        if meta["empty"]:
            log.warning("skipping %s (on_bad_rows=drop)", r["error"])
            continue
        d = Drops.from_dict(r["drops"])
        windowed = {k: d[k] for k in WINDOW_REASONS if d.get(k)}
        if windowed:
            log.info("%s: %s of %d rows outside the training window", r["path"], windowed, r["rows_in"])
        if sum(d.values()) > sum(windowed.values()):
            log.warning("%s: dropped %d of %d rows: %s (e.g. %s)", r["path"], sum(d.values()), r["rows_in"],
                        dict(d), "; ".join(x for v in d.examples.values() for x in v[:1]))
        if r["role"] == ROLE_INTERACTIONS:
            has_time = has_time and bool(r["has_time"])
            drops.merge(d)
            rows_in += r["rows_in"]
            kept += r["rows_kept"]
        else:
            has_catalogue = True
            cat_drops.merge(d)
            cat_rows_in += r["rows_in"]
    if kept == 0:
        raise DataError(f"no valid interactions in {', '.join(interaction_files)} "
                        f"({rows_in} rows read, dropped: {dict(drops) or 'none'})")
    return ReadSummary(drops, cat_drops, rows_in, cat_rows_in, files_meta, has_time, has_catalogue)


def duplicate_item_error(path: str, line: int, item_col: str, item: str) -> DataError:
    return DataError(f"{path}, line {line}: field {item_col!r} repeats item {item!r} listed in an earlier "
                     f"catalogue file (duplicate_item)")


def _parse_all_local(jobs: List[tuple], window: Optional[Window] = None) -> List[dict]:
    return [parse_file(display, fs.read_bytes(display), role, spec, window) for display, role, spec in jobs]


def ingest(interaction_files: Sequence[str], spec: InteractionSpec, catalogue_files: Sequence[str] = (),
           catalogue_spec: Optional[CatalogueSpec] = None, window: Optional[Window] = None) -> Ingested:
    """Parse and validate all files in this process, into one table (the local engine); ``window``: the training
    window (:class:`Window`).

    Raises :class:`DataError` on the first bad row in ``error`` mode, for an empty file in ``error`` mode
    (empty files are listed and skipped in ``drop`` mode), and when no interaction is left at all.
    """
    interaction_files = list(interaction_files)
    catalogue_files = list(catalogue_files) if catalogue_spec is not None else []
    if not interaction_files:
        raise DataError("no interaction files to read")
    jobs = [(p, ROLE_INTERACTIONS, spec) for p in interaction_files] + \
           [(p, ROLE_CATALOGUE, catalogue_spec) for p in catalogue_files]
    ordered = _parse_all_local(jobs, window)

    summary = summarize(ordered, spec, interaction_files)
    inter_parts, cat_parts = [], []
    file_idx = {ROLE_INTERACTIONS: 0, ROLE_CATALOGUE: 0}
    for r in ordered:
        idx = file_idx[r["role"]]
        file_idx[r["role"]] += 1
        if r["error_kind"] == "empty":
            continue
        df = _from_ipc(r["payload"])
        df["file"] = np.int64(idx)
        (inter_parts if r["role"] == ROLE_INTERACTIONS else cat_parts).append(df)
    drops, cat_drops, has_time = summary.drops, summary.catalogue_drops, summary.has_time
    inter = pd.concat(inter_parts, ignore_index=True)
    inter = inter[["user", "item", "ts", "file", "row", "line"]]
    if not has_time:  # order = file order, then row order
        inter["ts"] = np.arange(len(inter), dtype=np.int64)
    catalogue = None
    if catalogue_spec is not None and cat_parts:
        catalogue = pd.concat(cat_parts, ignore_index=True)[["item", "text", "file", "line"]]
        dup = catalogue["item"].duplicated(keep="first").to_numpy()
        if dup.any():
            first = int(np.flatnonzero(dup)[0])
            where = [f"{catalogue_files[int(catalogue['file'].iat[i])]}:{int(catalogue['line'].iat[i])}"
                     for i in np.flatnonzero(dup)[:MAX_EXAMPLES]]
            if catalogue_spec.on_bad_rows == "error":
                raise duplicate_item_error(where[0].rsplit(':', 1)[0], int(catalogue['line'].iat[first]),
                                           catalogue_spec.item_col, catalogue['item'].iat[first])
            cat_drops.add("duplicate_item", int(dup.sum()), where)
            catalogue = catalogue[~dup].reset_index(drop=True)
    return Ingested(inter, catalogue, drops, cat_drops, summary.rows_in, summary.catalogue_rows_in, summary.files,
                    interaction_files, catalogue_files, has_time)
