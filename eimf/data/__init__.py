"""Data: read and validate raw logs (local or s3://), k-core, re-index, split, sample batches.

Around two formats: the raw inputs, described by the dataset catalogue (:mod:`eimf.data.datasets`: one module per
family with its files, download and catalogue parsers) and read by :mod:`eimf.data.parsers`; and the prepared
folder, :mod:`eimf.formats.prepared`. In between: :mod:`eimf.data.inputs` (which files), :mod:`eimf.data.ingest`
(read + validate), :mod:`eimf.data.transforms` (k-core, re-index, split) run by the pandas engine
(:mod:`eimf.data.local`) or the Ray engine (:mod:`eimf.data.distributed`, tasks in :mod:`eimf.data.buckets`), and
:mod:`eimf.data.preprocess` (:func:`prepare`: picks the engine, writes the manifest).

Entry points (imported lazily, so ``import eimf.data.sampling`` does not pull in pyarrow or the parsers):

* :func:`prepare` (``DataConfig`` -> :class:`PreparedDataset`), :func:`load_prepared` (folder -> dataset)
* :class:`TrainSampler`, :func:`eval_batches`
* :func:`ingest`, :func:`resolve_inputs`, :data:`DATASETS`
* :class:`DataError` (bad input, with file/line/field in the message)
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare": "eimf.data.preprocess",
    "load_prepared": "eimf.formats.prepared",
    "PreparedDataset": "eimf.formats.prepared",
    "TrainSampler": "eimf.data.sampling",
    "eval_batches": "eimf.data.sampling",
    "ingest": "eimf.data.ingest",
    "Ingested": "eimf.data.ingest",
    "resolve_inputs": "eimf.data.inputs",
    "DATASETS": "eimf.data.datasets",
    "DatasetNotFoundError": "eimf.data.datasets",
    "DataError": "eimf.data.parsers",
    "Drops": "eimf.data.parsers",
    "InteractionSpec": "eimf.data.parsers",
    "CatalogueSpec": "eimf.data.parsers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'eimf.data' has no attribute {name!r}")
