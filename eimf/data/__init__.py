"""Data: read and validate raw logs (local or s3://), k-core, re-index, split, sample batches.

Entry points (imported lazily, so ``import eimf.data.sampling`` does not pull in Ray or pyarrow):

* :func:`prepare` (``DataConfig`` -> :class:`PreparedDataset`), :func:`load_prepared` (folder -> dataset)
* :class:`TrainSampler`, :func:`eval_batches`
* :func:`ingest`, :func:`resolve_inputs`, :data:`DATASETS`
* :class:`DataError` (bad input, with file/line/field in the message)
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare": "eimf.data.preprocess",
    "load_prepared": "eimf.data.preprocess",
    "PreparedDataset": "eimf.data.preprocess",
    "TrainSampler": "eimf.data.sampling",
    "eval_batches": "eimf.data.sampling",
    "ingest": "eimf.data.ingest",
    "Ingested": "eimf.data.ingest",
    "resolve_inputs": "eimf.data.datasets",
    "DATASETS": "eimf.data.datasets",
    "DatasetNotFoundError": "eimf.data.datasets",
    "DataError": "eimf.data.formats",
    "Drops": "eimf.data.formats",
    "InteractionSpec": "eimf.data.formats",
    "CatalogueSpec": "eimf.data.formats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'eimf.data' has no attribute {name!r}")
