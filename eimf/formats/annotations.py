"""The annotation set: what the annotation step writes under its folder (local or ``s3://``), read by EIMF training
and by export (the interest phrase table of a model folder).

* ``annotations.parquet``: one row per interest of an annotated user (schema: :func:`annotations_table`): ``user``,
  ``interest_idx`` (0..M-1), ``name``, ``description``, ``evidence`` (prompt item numbers, 1-based),
  ``evidence_items`` (the same as item ids), ``vector`` (unit, encoder dim), ``status`` (``ok``), ``cached``,
  ``history_hash``, ``model``, ``prompt_version``, ``window_start``/``window_end`` (the positions of the training
  sequence the prompt listed). A user whose annotation failed keeps one row with ``interest_idx = -1``,
  ``status = failed``, null name/description/vector and ``error``/``raw_text`` set: failures are never dropped.
* ``selection.parquet``: the typical users the set was made for.
* ``prompts.jsonl``: each user's prompt, one JSON object per line.
* ``stats.json``: counts, tokens, timings and what produced the set; written last, so its presence means complete.
"""
from __future__ import annotations

import io
from typing import Dict, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from eimf import fs as efs

ANNOTATIONS_FILE = "annotations.parquet"
STATS_FILE = "stats.json"
SELECTION_FILE = "selection.parquet"
PROMPTS_FILE = "prompts.jsonl"
#: ``status`` of a row: the user's interests, or the one row of a user whose annotation failed.
STATUS_OK = "ok"
STATUS_FAILED = "failed"


def annotations_table(df: pd.DataFrame) -> pa.Table:
    schema = pa.schema([
        ("user", pa.int64()), ("interest_idx", pa.int64()), ("name", pa.string()), ("description", pa.string()),
        ("evidence", pa.list_(pa.int64())), ("evidence_items", pa.list_(pa.int64())),
        ("vector", pa.list_(pa.float32())), ("status", pa.string()), ("error", pa.string()),
        ("raw_text", pa.string()), ("cached", pa.bool_()), ("history_hash", pa.string()), ("model", pa.string()),
        ("prompt_version", pa.string()), ("window_start", pa.int64()), ("window_end", pa.int64()),
    ])
    def clean(v):
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else v

    data = {c: [clean(v) for v in df[c].tolist()] if c in df.columns else [None] * len(df) for c in schema.names}
    for c in ("window_start", "window_end"):  # pandas turns an int column with a gap into floats
        data[c] = [None if v is None else int(v) for v in data[c]]
    data["vector"] = [None if v is None else np.asarray(v, dtype=np.float32) for v in data["vector"]]
    return pa.Table.from_pydict(data, schema=schema)


def write_parquet(df_or_table, path: str) -> None:
    table = df_or_table if isinstance(df_or_table, pa.Table) else pa.Table.from_pandas(df_or_table,
                                                                                         preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    efs.write_bytes(path, buf.getvalue())


def read_annotations(path: str) -> pd.DataFrame:
    """``annotations.parquet`` (a file or the folder holding it) -> DataFrame."""
    if not str(path).endswith(".parquet"):
        path = efs.join(path, ANNOTATIONS_FILE)
    return pq.read_table(io.BytesIO(efs.read_bytes(path))).to_pandas()


def semantic_vectors(annotations: pd.DataFrame) -> Dict[int, np.ndarray]:
    """``{user: [M, dim] float32}`` from the ``ok`` rows (interest order kept)."""
    ok = annotations[annotations["status"] == STATUS_OK].sort_values(["user", "interest_idx"])
    return {int(u): np.stack([np.asarray(v, dtype=np.float32) for v in g["vector"]])
            for u, g in ok.groupby("user", sort=True)}


def semantic_windows(annotations: pd.DataFrame) -> Dict[int, Tuple[int, int]]:
    """``{user: (start, end)}``: the positions of the training sequence each user's prompt listed. Raises for an
    annotation set written before the windows were recorded."""
    ok = annotations[annotations["status"] == STATUS_OK]
    if "window_start" not in ok.columns or ok["window_start"].isna().any():
        raise ValueError("these annotations do not record which part of each sequence the prompt showed "
                         "(window_start/window_end): re-run the annotation step")
    first = ok.groupby("user", sort=True)[["window_start", "window_end"]].first()
    return {int(u): (int(r.window_start), int(r.window_end)) for u, r in first.iterrows()}


def semantic_evidence(annotations: pd.DataFrame) -> Dict[int, np.ndarray]:
    """``{user: [M, E] int64}``: the item ids each interest cites (``evidence_items``), right-padded with 0, in
    the interest order of :func:`semantic_vectors`."""
    ok = annotations[annotations["status"] == STATUS_OK].sort_values(["user", "interest_idx"])
    out = {}
    for u, g in ok.groupby("user", sort=True):
        lists = [np.asarray(x if x is not None else [], dtype=np.int64) for x in g["evidence_items"]]
        table = np.zeros((len(lists), max([len(x) for x in lists] + [1])), dtype=np.int64)
        for i, x in enumerate(lists):
            table[i, :len(x)] = x
        out[int(u)] = table
    return out


def merge_annotations(base: str, overlay: str, out_dir: str) -> dict:
    """One annotation set from two: every user of ``base`` (e.g. the metadata annotator on all training users),
    with the users that ``overlay`` answered (e.g. the LLM on the typical users) taking the overlay's interests.
    An overlay user whose annotation failed keeps the base's. Writes ``annotations.parquet`` and ``stats.json``
    (written last, as the annotation step does) under ``out_dir``; returns the stats."""
    a, b = read_annotations(base), read_annotations(overlay)
    answered = set(b.loc[b["status"] == STATUS_OK, "user"].astype(int))
    merged = pd.concat([a[~a["user"].isin(answered)], b[b["user"].isin(answered)]], ignore_index=True)
    merged = merged.sort_values(["user", "interest_idx"], kind="stable").reset_index(drop=True)
    write_parquet(annotations_table(merged), efs.join(out_dir, ANNOTATIONS_FILE))
    stats = {"merged_from": {"base": str(base), "overlay": str(overlay)},
             "users": int(merged["user"].nunique()), "overlay_users": len(answered),
             "base_users": int(a["user"].nunique()),
             "ok_users": int(merged.loc[merged["status"] == STATUS_OK, "user"].nunique())}
    efs.write_json(efs.join(out_dir, STATS_FILE), stats)
    return stats
