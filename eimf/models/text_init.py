"""An item table initialised from the item texts: the simplest way to use the text EIMF uses, as a baseline.

``model.item_init=text``: each item's text (``items.parquet``'s ``text``) goes through the sentence encoder,
PCA maps the embeddings to ``model.dim``, and the rows are scaled to the spread of the random (Glorot) init, so
that only the geometry changes and the learning rate means the same. Row 0 (padding) stays zero; an item without
text gets a row of the random init. Training then proceeds as for the backbone. The table is computed once per (dataset,
encoder, dim) and cached as ``.npy`` under ``<EIMF_HOME>/cache/text_init``; workers read it memory-mapped.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from eimf.config import eimf_home
from eimf.formats.prepared import read_manifest, read_split
from eimf.semantic.encoder import SemanticEncoder

log = logging.getLogger(__name__)

ITEM_INITS = ("random", "text")


def _cache_path(data_path: str, encoder: str, suffix: str) -> Path:
    fingerprint = str(read_manifest(data_path).get("fingerprint", "unknown"))
    return Path(eimf_home()) / "cache" / "text_init" / f"{fingerprint}-{encoder.replace('/', '_')}-{suffix}.npy"


def item_text_embeddings(data_path: str, encoder: str, chunk: int = 4096) -> str:
    """``[N + 1, D]`` float32: each item's text through the sentence encoder (unit rows; zero for the padding row
    and for items without text), cached; returns the path. Encoded in chunks into a memory-mapped file."""

    path = _cache_path(data_path, encoder, "raw")
    if path.exists():
        return str(path)
    n_items = int(read_manifest(data_path)["n_items"])
    items = read_split(data_path, "items")
    if "text" not in items.columns:
        raise ValueError(f"{data_path}/items.parquet has no text column: item texts are needed (data.text_cols)")
    texts = np.full(n_items + 1, "", dtype=object)
    texts[np.asarray(items["item"], dtype=np.int64)] = items["text"].fillna("").astype(str).to_numpy()
    ids = np.array([i for i in range(1, n_items + 1) if texts[i].strip()], dtype=np.int64)
    if len(ids) == 0:
        raise ValueError(f"{data_path}: no item has text")
    enc = SemanticEncoder(encoder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_items + 1, enc.dim))
    table[:] = 0.0
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        table[part] = enc.encode(list(texts[part]))
    table.flush()
    del table
    os.replace(tmp, path)
    log.info("item texts: %d of %d items encoded with %s, cached at %s", len(ids), n_items, encoder, path)
    return str(path)


def text_init_table(data_path: str, dim: int, encoder: str, seed: int = 0, fit_sample: int = 100_000,
                    chunk: int = 65_536) -> str:
    """The ``[N + 1, dim]`` float32 table for ``model.item_init=text`` (see module doc); returns its path.
    Reads :func:`item_text_embeddings` memory-mapped; the PCA is fitted on at most ``fit_sample`` items."""
    path = _cache_path(data_path, encoder, f"d{dim}")
    if path.exists():
        return str(path)
    raw = np.load(item_text_embeddings(data_path, encoder), mmap_mode="r")
    n_items = raw.shape[0] - 1
    has_text = np.zeros(n_items + 1, dtype=bool)
    for start in range(1, n_items + 1, chunk):
        has_text[start:start + chunk] = np.abs(raw[start:start + chunk]).sum(axis=1) > 0
    ids = np.flatnonzero(has_text)
    if len(ids) < dim:
        raise ValueError(f"{data_path}: only {len(ids)} items have text, fewer than model.dim={dim}")
    rng = np.random.default_rng(seed)
    fit = np.asarray(raw[np.sort(rng.choice(ids, size=min(fit_sample, len(ids)), replace=False))])
    mean = fit.mean(axis=0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)  # the top-dim principal directions of the sample
    basis = vt[:dim].T.astype(np.float32)  # [D, dim]
    projected_std = float(((fit - mean) @ basis).std())
    # Glorot-uniform's std for an [N + 1, dim] table (the backbones' init)
    target_std = math.sqrt(6.0 / (n_items + 1 + dim)) / math.sqrt(3.0)
    scale = target_std / max(projected_std, 1e-12)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_items + 1, dim))
    table[:] = 0.0
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        table[part] = (np.asarray(raw[part]) - mean) @ basis * scale
    missing = np.flatnonzero(~has_text[1:]) + 1
    if len(missing):  # no text to place them by: the random init's rows, so they stay distinct
        bound = math.sqrt(3.0) * target_std
        table[missing] = rng.uniform(-bound, bound, size=(len(missing), dim)).astype(np.float32)
    table.flush()
    del table
    os.replace(tmp, path)
    log.info("item_init=text: %d of %d items have text; PCA %d -> %d, scaled to std %.4g; cached at %s",
             len(ids), n_items, raw.shape[1], dim, target_std, path)
    return str(path)
