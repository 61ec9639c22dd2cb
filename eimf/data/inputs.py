"""What one prepare run reads (:class:`~eimf.data.datasets.Inputs`): the files of a built-in dataset's source in its
folder, or your own files (``data.dataset=custom``), with the parser settings; and the download of a built-in dataset
that is missing (``data.download=auto``).

The datasets and their layouts are in the catalogue, :mod:`eimf.data.datasets`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import List, Optional, Tuple

from eimf import fs
from eimf.config import ConfigError
from eimf.data.datasets import DATASETS, DatasetNotFoundError, Inputs
from eimf.data.datasets.custom import custom_inputs
from eimf.data.download import DATA_DIR_ENV, DownloadError, download
from eimf.data.parsers import DataError

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "eimf", "datasets")


def data_dir(cfg) -> str:
    """``cfg.data_dir``, else ``$EIMF_DATA_DIR``, else ``~/.cache/eimf/datasets``."""
    d = cfg.data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return d if fs.is_s3(d) else os.path.abspath(os.path.expanduser(d))


def _not_found(name: str, folder: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"dataset {name!r} not found: there is no folder {folder}. Point eimf at the folder that holds the "
        f"datasets with data.data_dir=/path/to/datasets or the environment variable {DATA_DIR_ENV}, "
        f"or download it with `eimf data download {name}` (it writes to $EIMF_DATA_DIR or --data-dir)."
    )


def _present(root: str) -> set:
    if not fs.is_dir(root) or not _has_files(root):
        return set()
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.expand(root)}


def ensure_dataset(cfg) -> None:
    """Download a built-in dataset whose folder holds none of its sources, when ``data.download=auto`` and the
    dataset is downloadable (checksums checked, :mod:`eimf.data.download`). Without a network the error names the
    folder it looked in, how to fetch it by hand, and why the download failed. Local data folders only."""
    spec = DATASETS.get(cfg.dataset)
    if spec is None or spec.download is None or getattr(cfg, "download", "auto") != "auto":
        return
    folder = data_dir(cfg)
    root = fs.join(folder, spec.name)
    present = _present(root)
    if any(_first_present(s.interactions, present) for s in spec.sources) or fs.is_s3(folder):
        return
    log.info("%s: not in %s; downloading it (data.download=auto)", spec.name, root)
    try:
        download(spec.name, folder, retries=2, backoff=0.5, timeout=30.0)
    except DownloadError as e:
        raise DatasetNotFoundError(
            f"dataset {spec.name!r} not found in {root}, and downloading it failed: {e}. Point eimf at the folder "
            f"that holds the datasets with data.data_dir=/path/to/datasets or {DATA_DIR_ENV}, or set "
            f"data.download=never to skip the download.") from e


def _first_present(names: Tuple[str, ...], present: set) -> Optional[str]:
    return next((n for n in names if n in present), None)


def resolve_inputs(cfg) -> Inputs:
    """The files and parser settings for ``cfg`` (a ``DataConfig``); a training window (``data.since`` /
    ``data.until``) on a log without a time column is a :class:`ConfigError`."""
    inputs = _resolve_inputs(cfg)
    if getattr(cfg, "since", None) is not None or getattr(cfg, "until", None) is not None:
        spec = inputs.interaction_spec
        if not spec.time_col or spec.format == "sequences":
            raise ConfigError(f"data.since/data.until: dataset {inputs.dataset!r} (source {inputs.source!r}) has no "
                              f"time column to cut a window on ({spec.format} log, time column {spec.time_col!r})")
    return inputs


def _resolve_inputs(cfg) -> Inputs:
    if cfg.on_bad_rows not in ("drop", "error"):
        raise DataError(f"data.on_bad_rows must be drop or error, got {cfg.on_bad_rows!r}")
    if cfg.dataset == "custom":
        return custom_inputs(cfg)
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset {cfg.dataset!r}; built-in: {', '.join(DATASETS)}")
    spec = DATASETS[cfg.dataset]
    root = fs.join(data_dir(cfg), spec.name)
    if not fs.is_dir(root):
        raise _not_found(spec.name, root)
    present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.expand(root)} if _has_files(root) else set()
    available = [s for s in spec.sources if _first_present(s.interactions, present)]
    if cfg.source == "auto":
        if not available:
            expected = "; ".join(f"{s.name}: {' or '.join(s.interactions)}" for s in spec.sources)
            raise DatasetNotFoundError(
                f"dataset {spec.name!r}: {root} holds none of the expected files ({expected}). "
                f"Download it with `eimf data download {spec.name}`, or set data.data_dir=/path/to/datasets "
                f"or {DATA_DIR_ENV} to the folder that holds {spec.name}/.")
        src = available[0]
    else:
        src = spec.source(cfg.source)
        if src not in available:
            others = ", ".join(s.name for s in available) or "none"
            raise DatasetNotFoundError(
                f"dataset {spec.name!r}, source {src.name!r}: {' or '.join(src.interactions)} is not in {root} "
                f"(sources present there: {others}; data.source=auto picks the first).")
    inter = fs.join(root, _first_present(src.interactions, present))
    ispec = dataclasses.replace(src.spec, on_bad_rows=cfg.on_bad_rows)
    cat_files: List[str] = []
    cspec = None
    if src.catalogue:
        cat = _first_present(src.catalogue, present)
        if cat:
            cat_files = [fs.join(root, cat)]
            cspec = dataclasses.replace(src.catalogue_spec, on_bad_rows=cfg.on_bad_rows)
            if src.adapt_catalogue is not None:
                cspec = src.adapt_catalogue(cspec, root, present)
        else:
            log.warning("%s/%s: no item catalogue (%s) in %s: items get empty text", spec.name, src.name,
                        " or ".join(src.catalogue), root)
    return Inputs(spec.name, src.name, root, [inter], ispec, cat_files, cspec)


def _has_files(root: str) -> bool:
    try:
        fs.expand(root)
        return True
    except FileNotFoundError:
        return False
