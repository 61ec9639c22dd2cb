"""``custom``: your own files, described by ``DataConfig`` (``data.interactions``, ``data.items``, format and column
names). ``eimf data synth`` (:mod:`eimf.data.synthetic`) writes a synthetic log in this layout.
"""
from __future__ import annotations

from typing import List

from eimf import fs
from eimf.data.datasets.base import DatasetNotFoundError, DatasetSpec, Inputs
from eimf.data.parsers import CatalogueSpec, DataError, InteractionSpec

CUSTOM = DatasetSpec(
    "custom", "your own files: data.interactions (+ data.items), format and column names from data.*",
    (),
)


def custom_inputs(cfg) -> Inputs:
    """The files and parser settings ``cfg`` (a ``DataConfig`` with ``dataset=custom``) names."""
    if not cfg.interactions:
        raise DataError("data.dataset=custom needs data.interactions=<file, folder or glob> (local or s3://)")
    try:
        files = fs.expand(cfg.interactions)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"data.interactions={cfg.interactions}: no such file, folder or glob") from None
    fmt = cfg.format
    ispec = InteractionSpec(format=fmt, user_col=cfg.user_col, item_col=cfg.item_col, time_col=cfg.time_col,
                            numeric_ids=cfg.numeric_ids, on_bad_rows=cfg.on_bad_rows)
    cat_files: List[str] = []
    cspec = None
    if cfg.items:
        try:
            cat_files = fs.expand(cfg.items)
        except FileNotFoundError:
            raise DatasetNotFoundError(f"data.items={cfg.items}: no such file, folder or glob") from None
        items_format = getattr(cfg, "items_format", "auto")
        cspec = CatalogueSpec(format=items_format, item_col=getattr(cfg, "items_item_col", None) or cfg.item_col,
                              text_cols=list(cfg.text_cols), numeric_ids=cfg.numeric_ids,
                              on_bad_rows=cfg.on_bad_rows)
    return Inputs("custom", "files", None, files, ispec, cat_files, cspec)
