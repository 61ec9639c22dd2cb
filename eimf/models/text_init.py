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
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

ITEM_INITS = ("random", "text")


def text_init_path(data_path: str, dim: int, encoder: str, home: Optional[str] = None) -> Path:
    from eimf.config import eimf_home
    from eimf.data.preprocess import read_manifest

    fingerprint = str(read_manifest(data_path).get("fingerprint", "unknown"))
    safe = encoder.replace("/", "_")
    return Path(home or eimf_home()) / "cache" / "text_init" / f"{fingerprint}-{safe}-d{dim}.npy"


def text_init_table(data_path: str, dim: int, encoder: str, seed: int = 0, fit_sample: int = 100_000,
                    chunk: int = 4096) -> str:
    """The ``[N + 1, dim]`` float32 table for ``model.item_init=text`` (see module doc); returns its path.
    Memory: the encoder's embeddings in chunks, and the PCA fitted on at most ``fit_sample`` items."""
    from eimf.data.preprocess import _read_parquet, read_manifest
    from eimf import fs
    from eimf.semantic.encoder import SemanticEncoder

    path = text_init_path(data_path, dim, encoder)
    if path.exists():
        return str(path)
    n_items = int(read_manifest(data_path)["n_items"])
    items = _read_parquet(fs.join(data_path, "items.parquet"))
    if "text" not in items.columns:
        raise ValueError(f"{data_path}/items.parquet has no text column: model.item_init=text needs item texts "
                         f"(data.text_cols)")
    texts = np.full(n_items + 1, "", dtype=object)
    texts[np.asarray(items["item"], dtype=np.int64)] = items["text"].fillna("").astype(str).to_numpy()
    has_text = np.array([bool(t.strip()) for t in texts])
    has_text[0] = False
    ids = np.flatnonzero(has_text)
    if len(ids) < dim:
        raise ValueError(f"{data_path}: only {len(ids)} items have text, fewer than model.dim={dim}")
    enc = SemanticEncoder(encoder)
    rng = np.random.default_rng(seed)
    fit_ids = np.sort(rng.choice(ids, size=min(fit_sample, len(ids)), replace=False))
    fit = enc.encode(list(texts[fit_ids]))
    mean = fit.mean(axis=0)
    # the top-dim principal directions of the sample
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    basis = vt[:dim].T.astype(np.float32)  # [D, dim]
    projected_std = float(((fit - mean) @ basis).std())
    # Glorot-uniform's std for an [N + 1, dim] table (the backbones' init)
    target_std = math.sqrt(6.0 / (n_items + 1 + dim)) / math.sqrt(3.0)
    scale = target_std / max(projected_std, 1e-12)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_items + 1, dim))
    table[:] = 0.0
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        table[part] = ((enc.encode(list(texts[part])) - mean) @ basis) * scale
    missing = np.flatnonzero(~has_text[1:]) + 1
    if len(missing):  # no text to place them by: the random init's rows, so they stay distinct
        bound = math.sqrt(3.0) * target_std
        table[missing] = rng.uniform(-bound, bound, size=(len(missing), dim)).astype(np.float32)
    table.flush()
    del table
    os.replace(tmp, path)
    log.info("item_init=text: %d of %d items have text; PCA %d -> %d, scaled to std %.4g; cached at %s",
             len(ids), n_items, fit.shape[1], dim, target_std, path)
    return str(path)
