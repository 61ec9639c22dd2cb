"""The prepared dataset: the folder ``eimf.data`` writes and training, evaluation and annotation read.

``<output_dir>/<dataset>/<fingerprint[:16]>/`` (:func:`folder`) holds

==================  ===============================================================================================
``train.parquet``   ``user`` int64, ``items`` list<int64>: each training user's whole chronological sequence
``valid.parquet``   ``user``, ``history`` list<int64>, ``truth`` list<int64>
``test.parquet``    the same as ``valid``
``items.parquet``   ``item`` (1..N; 0 is padding), ``raw_id``, ``count``, ``text``
``users.parquet``   ``user`` (1..U), ``raw_id``, ``n_interactions`` (absent in folders written before it existed)
``manifest.json``   written last: a folder with a manifest is complete (counts, drops, split, inputs, timings)
==================  ===============================================================================================

Id lists are ``list<int64>`` with 32-bit offsets while they fit (:func:`list_type`). The tables are written in row
groups of :data:`ROW_GROUP_ROWS` (:class:`TableWriter`), whatever the chunks handed over, so that both engines of
``eimf.data`` write the same bytes.

The fingerprint (:func:`fingerprint`) is a SHA-256 over the input files (name, size, mtime), the parser settings, the
config fields that change the output (:data:`OUTPUT_FIELDS`) and :data:`PREPROCESS_VERSION`; a folder that already
has a manifest is reused. :func:`load_prepared` reads a folder lazily (a table when first used).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Dict, List, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from eimf import fs
from eimf.config import eimf_home

#: Bump when the output for the same inputs and config changes: old cache folders are then not reused.
PREPROCESS_VERSION = 1
#: The manifest's ``format_version``: bump when the folder's layout changes.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")
#: Every table of a prepared folder, in the order the engines write them.
TABLES = SPLITS + ("items", "users")
#: DataConfig fields that change the output (besides the inputs and parser settings).
OUTPUT_FIELDS = ("on_bad_rows", "dedupe", "min_count", "split", "split_seed", "split_ratios", "history_fraction",
                 "since", "until", "replay", "replay_seed")
#: Rows per Parquet row group of the prepared tables. Both engines cut the same groups, whatever the chunks they
#: hand over, so they write the same bytes; a writer holds one group (8,192 users' sequences, a few MB).
ROW_GROUP_ROWS = 8_192


# ------------------------------------------------------------------------------------------ where and what
def output_root(cfg) -> str:
    """``data.output_dir``, else ``<EIMF_HOME>/data`` (local paths made absolute)."""
    d = cfg.output_dir or os.path.join(eimf_home(), "data")
    return d if fs.is_s3(d) else os.path.abspath(os.path.expanduser(d))


def folder(root: str, dataset: str, fp: str) -> str:
    """The prepared folder of ``dataset`` with fingerprint ``fp`` under ``root`` (:func:`output_root`)."""
    return fs.join(root, dataset, fp[:16])


def input_infos(inputs) -> List[dict]:
    """Role, name (relative to the dataset folder), path, size, mtime (etag on S3) of each input file of
    ``inputs`` (``eimf.data.inputs.Inputs``)."""
    out = []
    for role, files in (("interactions", inputs.interaction_files), ("catalogue", inputs.catalogue_files)):
        for p in files:
            info = fs.file_info(p)
            name = p[len(inputs.root):].lstrip("/") if inputs.root and p.startswith(inputs.root) else p
            out.append({"role": role, "name": name, "path": p, **info})
    return out


def fingerprint(cfg, inputs, infos: List[dict]) -> str:
    """The prepared folder's fingerprint for ``cfg`` (a ``DataConfig``), ``inputs`` and their :func:`input_infos`."""
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


# ------------------------------------------------------------------------------------------------ tables
def list_type(total: int):
    """The Arrow type of an id-list column holding ``total`` ids: 32-bit offsets while they fit."""
    return pa.list_(pa.int64()) if total < 2**31 else pa.large_list(pa.int64())


def list_array(values: np.ndarray, offsets: np.ndarray):
    """An id-list column from the flat ids and the offsets of each list (:func:`list_type`'s offsets)."""
    large = offsets[-1] >= 2**31
    cls = pa.LargeListArray if large else pa.ListArray
    return cls.from_arrays(pa.array(offsets, type=pa.int64() if large else pa.int32()), pa.array(values, type=pa.int64()))


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
        filesystem, inner = fs.resolve(self.path)
        if isinstance(filesystem, pafs.LocalFileSystem):
            filesystem.create_dir(os.path.dirname(inner), recursive=True)
        self._stream = filesystem.open_output_stream(inner)
        self._writer = pq.ParquetWriter(self._stream, self.schema)

    def _flush(self, rows: int) -> None:
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


def write_table(table, path: str) -> None:
    """One whole table (pyarrow) to ``path``, in the row groups of :class:`TableWriter`."""
    w = TableWriter(path, table.schema)
    w.write(table)
    w.close()


def read_table(path: str) -> pd.DataFrame:
    return pq.read_table(pa.BufferReader(fs.read_bytes(path))).to_pandas()


# --------------------------------------------------------------------------------------------- manifest
def write_manifest(path: str, manifest: dict) -> None:
    """The manifest, last: from then on the folder counts as complete."""
    fs.write_json(fs.join(str(path), MANIFEST), manifest)


def read_manifest(path) -> dict:
    return fs.read_json(fs.join(str(path), MANIFEST))


def read_split(path, name: str) -> pd.DataFrame:
    """One table of a prepared folder (``train``, ``valid``, ``test``, ``items``, ``users``)."""
    return read_table(fs.join(str(path), f"{name}.parquet"))


# ---------------------------------------------------------------------------------------------- reading
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
        return read_table(fs.join(self.path, f"{name}.parquet"))

    train = functools.cached_property(lambda self: self._table("train"))
    valid = functools.cached_property(lambda self: self._table("valid"))
    test = functools.cached_property(lambda self: self._table("test"))
    items = functools.cached_property(lambda self: self._table("items"))

    @functools.cached_property
    def users(self) -> Optional[pd.DataFrame]:
        return self._table("users") if fs.exists(fs.join(self.path, "users.parquet")) else None

    def __repr__(self) -> str:
        return f"PreparedDataset({self.path!r}, n_items={self.n_items})"


#: The last prepared dataset this process read: a pipeline's prepare, annotate and evaluate steps (and a grid's
#: per-run evaluations) read it once. Keyed by folder and manifest, so a rewritten folder is read again.
_LAST: Dict[tuple, PreparedDataset] = {}


def is_prepared(path) -> bool:
    """Whether ``path`` holds a complete prepared dataset (its manifest)."""
    return fs.exists(fs.join(str(path), MANIFEST))


def load_prepared(path) -> PreparedDataset:
    """Read a prepared folder (local or ``s3://``); the same folder again is served from memory (treat the
    frames as read-only)."""
    path = str(path)
    if not is_prepared(path):
        raise FileNotFoundError(f"{path} is not a prepared dataset (no {MANIFEST}); run `eimf data prepare`")
    manifest = read_manifest(path)
    key = (path, json.dumps(manifest, sort_keys=True, default=str))  # a rewrite has new timings
    if key in _LAST:
        return _LAST[key]
    _LAST.clear()
    _LAST[key] = PreparedDataset(path, manifest)
    return _LAST[key]
