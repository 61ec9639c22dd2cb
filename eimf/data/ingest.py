"""Read interaction files and item catalogues through Ray Data: local folders and ``s3://`` run the same code.

``ray.data.read_binary_files(paths, include_paths=True, filesystem=...)`` yields one row per file; a ``map``
parses each file with :mod:`eimf.data.formats` (so errors keep the exact file and line, and files are
parsed in parallel) and returns its table as Arrow IPC bytes plus its drop counts. The driver merges them.
Each file is parsed whole by one task: split a very large log into several files to parallelise.

``engine="local"`` runs the same per-file function in this process (no Ray), for small inputs and tools.
Ray is imported only when used.
"""
from __future__ import annotations

import io
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from eimf import fs
from eimf.ray_init import init_ray
from eimf.data.formats import (
    CatalogueSpec, DataError, Drops, EmptyFileError, InteractionSpec, MAX_EXAMPLES, parse_catalogue,
    parse_interactions,
)

log = logging.getLogger(__name__)

ROLE_INTERACTIONS = "interactions"
ROLE_CATALOGUE = "catalogue"


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
    import pyarrow as pa

    table = pa.Table.from_pandas(df, preserve_index=False)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def _from_ipc(payload: bytes) -> pd.DataFrame:
    import pyarrow as pa

    return pa.ipc.open_stream(payload).read_all().to_pandas()


def parse_file(display_path: str, raw: bytes, role: str, spec) -> dict:
    """Parse one file; never raises for bad data (the error travels back as text)."""
    out = {"path": display_path, "role": role, "payload": b"", "rows_in": 0, "rows_kept": 0, "drops": {},
           "blank_lines": 0, "empty_sequences": 0, "has_time": False, "error": "", "error_kind": ""}
    try:
        res = parse_interactions(display_path, raw, spec) if role == ROLE_INTERACTIONS else \
            parse_catalogue(display_path, raw, spec)
    except EmptyFileError as e:
        out.update(error=str(e), error_kind="empty")
        return out
    except DataError as e:
        out.update(error=str(e), error_kind="data")
        return out
    out.update(payload=_to_ipc(res.table), rows_in=res.rows_in, rows_kept=len(res.table),
               drops=res.drops.to_dict(), blank_lines=res.blank_lines, empty_sequences=res.empty_sequences,
               has_time=res.has_time)
    return out


def _parse_all_ray(jobs: List[tuple]) -> List[dict]:
    """jobs: (display path, role, spec). Files are grouped by file system (local, s3)."""
    import ray

    init_ray(log_to_driver=False)
    groups: Dict[bool, List[tuple]] = defaultdict(list)
    for job in jobs:
        groups[fs.is_s3(job[0])].append(job)
    results: List[dict] = []
    for _, group in groups.items():
        filesystem, _ = fs.resolve(group[0][0])
        by_inner: Dict[str, List[tuple]] = defaultdict(list)  # a file may be read in two roles
        for display, role, spec in group:
            by_inner[fs.resolve(display)[1].lstrip("/")].append((display, role, spec))

        def parse_row(row: dict, _by_inner=by_inner) -> List[dict]:
            raw = bytes(row["bytes"])
            return [parse_file(display, raw, role, spec) for display, role, spec in _by_inner[str(row["path"]).lstrip("/")]]

        inner_paths = list(dict.fromkeys(fs.resolve(d)[1] for d, _, _ in group))
        ds = ray.data.read_binary_files(inner_paths, include_paths=True, filesystem=filesystem)
        results.extend(ds.flat_map(parse_row).take_all())
    return results


def _parse_all_local(jobs: List[tuple]) -> List[dict]:
    return [parse_file(display, fs.read_bytes(display), role, spec) for display, role, spec in jobs]


def ingest(interaction_files: Sequence[str], spec: InteractionSpec, catalogue_files: Sequence[str] = (),
           catalogue_spec: Optional[CatalogueSpec] = None, *, engine: str = "ray") -> Ingested:
    """Parse and validate all files (``engine``: ``ray`` or ``local``).

    Raises :class:`DataError` on the first bad row in ``error`` mode, for an empty file in ``error`` mode
    (empty files are listed and skipped in ``drop`` mode), and when no interaction is left at all.
    """
    interaction_files = list(interaction_files)
    catalogue_files = list(catalogue_files) if catalogue_spec is not None else []
    if not interaction_files:
        raise DataError("no interaction files to read")
    jobs = [(p, ROLE_INTERACTIONS, spec) for p in interaction_files] + \
           [(p, ROLE_CATALOGUE, catalogue_spec) for p in catalogue_files]
    if engine == "ray":
        results = _parse_all_ray(jobs)
    elif engine == "local":
        results = _parse_all_local(jobs)
    else:
        raise ValueError(f"engine must be ray or local, got {engine!r}")
    by_path = {(r["path"], r["role"]): r for r in results}
    missing = [(p, role) for p, role, _ in jobs if (p, role) not in by_path]
    if missing:  # pragma: no cover - Ray returns one row per file
        raise RuntimeError(f"no parse result for {missing}")
    ordered = [by_path[(p, role)] for p, role, _ in jobs]

    # errors first, in file order: the first bad file is reported
    for r in ordered:
        if r["error_kind"] == "data" or (r["error_kind"] == "empty" and spec.on_bad_rows == "error"):
            raise (EmptyFileError if r["error_kind"] == "empty" else DataError)(r["error"])
    files_meta = []
    inter_parts, cat_parts = [], []
    drops, cat_drops = Drops(), Drops()
    rows_in = cat_rows_in = 0
    file_idx = {ROLE_INTERACTIONS: 0, ROLE_CATALOGUE: 0}
    has_time = True
    for r in ordered:
        role = r["role"]
        idx = file_idx[role]
        file_idx[role] += 1
        meta = {k: r[k] for k in ("path", "role", "rows_in", "rows_kept", "blank_lines", "empty_sequences")}
        meta["drops"] = r["drops"].get("counts", {})
        meta["empty"] = r["error_kind"] == "empty"
        files_meta.append(meta)
        if meta["empty"]:
            log.warning("skipping %s (on_bad_rows=drop)", r["error"])
            continue
        d = Drops.from_dict(r["drops"])
        if d:
            log.warning("%s: dropped %d of %d rows: %s (e.g. %s)", r["path"], sum(d.values()), r["rows_in"],
                        dict(d), "; ".join(x for v in d.examples.values() for x in v[:1]))
        df = _from_ipc(r["payload"])
        df["file"] = np.int64(idx)
        if role == ROLE_INTERACTIONS:
            has_time = has_time and bool(r["has_time"])
            inter_parts.append(df)
            drops.merge(d)
            rows_in += r["rows_in"]
        else:
            cat_parts.append(df)
            cat_drops.merge(d)
            cat_rows_in += r["rows_in"]
    if not inter_parts or sum(len(p) for p in inter_parts) == 0:
        raise DataError(f"no valid interactions in {', '.join(interaction_files)} "
                        f"({rows_in} rows read, dropped: {dict(drops) or 'none'})")
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
                raise DataError(f"{where[0].rsplit(':', 1)[0]}, line {int(catalogue['line'].iat[first])}: field "
                                f"{catalogue_spec.item_col!r} repeats item {catalogue['item'].iat[first]!r} listed "
                                f"in an earlier catalogue file (duplicate_item)")
            cat_drops.add("duplicate_item", int(dup.sum()), where)
            catalogue = catalogue[~dup].reset_index(drop=True)
    return Ingested(inter, catalogue, drops, cat_drops, rows_in, cat_rows_in, files_meta,
                    interaction_files, catalogue_files, has_time)
