"""The model folder: the one module that knows a trained model's exported files; it writes and reads them.

A model folder is everything serving needs, with no reference back to the data or the run that made it:

=================  ===========================================================================================
``folder.json``    format version, backbone, catalogue size, dimension, the retrieval index spec and its search
                   parameters (and, for ``retrieval.index=auto`` above the exact size, ``auto_check``: the auto
                   guard's candidate, its measured recall of the exact top-N, the number of check users, whether it
                   was kept and why), the files present, and (informational) the prepared data it was trained on
``model.pt``       the backbone's best weights (interest extractor + item table)
``item_table.*``   models trained with the row-sharded table only: ``model.pt`` holds the dense weights, and the
                   table is in these ``.npy`` row blocks (one per training worker, in id order, row 0 first);
                   ``folder.json``'s ``item_table`` lists them (format version 2)
``config.yaml``    the full training config
``metrics.json``   the training run's final metrics
``items.parquet``  ``item`` (internal id 1..N), ``raw_id`` (the log's id, a string), ``text``, ``count``
``index.faiss``    the retrieval index over item rows 1..N, built once at export (faiss's own format)
``eimf_head.pt``   EIMF models only: the head (P, g), for interest labels; never used to rank
``phrases.parquet`` EIMF models only: the annotated interest phrases (``name``, ``description``, ``vector``)
``text_map.npz``   models of items with text: the ridge map from an item's text embedding to its row
                   (``weight``, ``bias``; its encoder and fit in ``folder.json``'s ``text_map``), which gives new
                   items their rows (eimf.models.text_map)
=================  ===========================================================================================

Items added after training (``eimf items add``, eimf.serving.new_items) have rows from the text map, not from
training: ``folder.json``'s ``added_items`` lists each addition (``first_item``, ``items``, ``source``, ``utc``, and
``slots``: the places of each answer reserved for added items, :func:`reserved_slots`), so that what was trained and
what was mapped stays known. Files beside the listed ones (the pipeline's
``evaluation.json``, ``pipeline.json``) are kept by such an addition (``FolderParts.extra_files``).

Here the contents are plain values (state dicts, frames, arrays): :class:`FolderParts` to write, :class:`LocalFolder`
to read. The objects built from them (the backbone, the faiss index, the head) are eimf.serving.folder's.
Paths are local or ``s3://``.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import pandas as pd
import torch

from eimf import fs
from eimf.config import Config, load_config, to_yaml

FORMAT = "eimf-model-folder"
FORMAT_VERSION = 2  # 2: the table may be in row blocks (sharded training); version 1 folders read unchanged
MANIFEST = "folder.json"
WEIGHTS = "model.pt"
CONFIG = "config.yaml"
METRICS = "metrics.json"
ITEMS = "items.parquet"
INDEX = "index.faiss"
HEAD = "eimf_head.pt"
PHRASES = "phrases.parquet"
TEXT_MAP = "text_map.npz"
ITEM_COLUMNS = ("item", "raw_id", "text", "count")
TABLE_PART = "item_table.{:05d}-of-{:05d}.npy"


class ModelFolderError(ValueError):
    """A folder that is not a (complete, readable) model folder; the message names the folder and the file."""


def reserved_slots(added_items: List[dict]) -> int:
    """The places of each answer reserved for added items: what the latest addition set (``eimf items add
    --slots``), else 0."""
    return int(added_items[-1].get("slots", 0)) if added_items else 0


@dataclass
class FolderParts:
    """What :func:`write` writes, as plain values."""

    #: the backbone's state dict (without the item table when ``table_parts`` holds it)
    state: dict
    cfg: Config
    #: one row per item 1..N in id order: ITEM_COLUMNS
    items: pd.DataFrame
    #: writes the retrieval index to the path it is given (faiss's own format)
    save_index: Callable[[Path], None]
    #: the index's spec string and search parameters, recorded in ``folder.json``
    #: (``eimf.evaluation.retrieval.ItemIndex.record``: ``{"spec": ..., "nprobe": ..., ..., "auto_check": {...}}``;
    #: ``auto_check`` only where the auto guard ran, so folders without it read unchanged)
    index_spec: dict
    metrics: dict = field(default_factory=dict)
    head_state: Optional[dict] = None
    #: ``name``, ``description``, ``vector`` (float32) per annotated interest phrase
    phrases: Optional[pd.DataFrame] = None
    data_path: Optional[str] = None
    #: local ``.npy`` row blocks of the item table in id order (a sharded export), or None
    table_parts: Optional[List[str]] = None
    #: the text map as plain values (eimf.models.text_map.TextMap.to_arrays: ``weight``, ``bias``, ``encoder``,
    #: ``fit``), or None
    text_map: Optional[dict] = None
    #: the items added after training, one record per addition (``folder.json``'s ``added_items``), or None
    added_items: Optional[List[dict]] = None
    #: files copied beside the listed ones, not required by readers: ``{name: local path}``
    extra_files: Optional[Dict[str, str]] = None


def write(path: str, parts: FolderParts) -> str:
    """Write every file (built in a temporary folder, then copied; locally ``folder.json`` is written last, and
    :func:`open_local` refuses a folder missing any file its manifest lists, e.g. an ``s3://`` upload cut short).
    Returns ``path``."""
    cfg = parts.cfg
    with tempfile.TemporaryDirectory(prefix="eimf-model-") as tmp:
        out = Path(tmp)
        torch.save(parts.state, out / WEIGHTS)
        (out / CONFIG).write_text(to_yaml(cfg))
        (out / METRICS).write_text(json.dumps(parts.metrics, indent=1, sort_keys=True, default=float))
        parts.items.loc[:, list(ITEM_COLUMNS)].to_parquet(out / ITEMS, index=False)
        parts.save_index(out / INDEX)
        files = [WEIGHTS, CONFIG, METRICS, ITEMS, INDEX]
        table = None
        if parts.table_parts:
            names = [TABLE_PART.format(i, len(parts.table_parts)) for i in range(len(parts.table_parts))]
            rows = []
            for src, name in zip(parts.table_parts, names):
                shutil.copyfile(src, out / name)
                rows.append(int(np.load(out / name, mmap_mode="r").shape[0]))
            table = {"parts": names, "rows": rows}
            files += names
        if parts.head_state is not None:
            torch.save(parts.head_state, out / HEAD)
            files.append(HEAD)
        if parts.phrases is not None:
            parts.phrases.loc[:, ["name", "description", "vector"]].to_parquet(out / PHRASES, index=False)
            files.append(PHRASES)
        if parts.text_map is not None:
            np.savez(out / TEXT_MAP, weight=np.asarray(parts.text_map["weight"], dtype=np.float32),
                     bias=np.asarray(parts.text_map["bias"], dtype=np.float32))
            files.append(TEXT_MAP)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "backbone": cfg.model.backbone,
            "dataset": cfg.data.dataset, "n_items": len(parts.items), "dim": int(cfg.model.dim),
            "num_interests": int(cfg.model.num_interests), "maxlen": int(cfg.model.maxlen),
            "index": parts.index_spec, "files": files + [MANIFEST], "data_path": parts.data_path,
        }
        if parts.text_map is not None:
            manifest["text_map"] = {"encoder": parts.text_map["encoder"], "fit": parts.text_map.get("fit") or {}}
        if parts.added_items:
            manifest["added_items"] = list(parts.added_items)
        extras = []
        for name, src in (parts.extra_files or {}).items():
            if name in files or name == MANIFEST or Path(name).name != name:
                raise ValueError(f"model folder: extra file {name!r} is a folder file or not a plain name")
            shutil.copyfile(src, out / name)
            extras.append(name)
        if table is not None:
            manifest["item_table"] = table
        else:
            manifest["format_version"] = 1  # readable by eimf releases before row blocks
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if fs.is_s3(path):
            fs.upload_dir(out, path)
        else:  # the manifest last: a folder with one is complete
            dest = Path(path)
            dest.mkdir(parents=True, exist_ok=True)
            (dest / MANIFEST).unlink(missing_ok=True)
            for name in files + extras + [MANIFEST]:
                shutil.copyfile(out / name, dest / name)
    return path


def check_table_rows(state: dict, n_items: int, where) -> None:
    """A backbone state dict's item table holds rows for ids 0..``n_items`` (row 0 the padding)."""
    rows = state["item_emb.weight"].shape[0] - 1
    if rows != n_items:
        raise ModelFolderError(f"{where}: an item table of {rows} items, the catalogue has {n_items}")


def read_manifest(path: str) -> dict:
    """``folder.json`` of a model folder, checked to be one this code reads."""
    where = fs.join(str(path), MANIFEST)
    if not fs.exists(where):
        legacy = fs.exists(fs.join(str(path), WEIGHTS))
        raise ModelFolderError(
            f"{path}: no {MANIFEST}, so not a model folder"
            + (" (an export from before the model folder format: train again or export it anew)" if legacy
               else " (expected the export folder of a training run, e.g. <run>/export)"))
    manifest = fs.read_json(where)
    if manifest.get("format") != FORMAT or int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFolderError(f"{where}: format {manifest.get('format')!r} version "
                               f"{manifest.get('format_version')!r}; this eimf reads {FORMAT} <= {FORMAT_VERSION}")
    return manifest


@dataclass
class LocalFolder:
    """A complete model folder on local disk, read file by file."""

    path: str
    local: Path
    manifest: dict

    @property
    def n_items(self) -> int:
        return int(self.manifest["n_items"])

    @property
    def index_file(self) -> Path:
        return self.local / INDEX

    @property
    def index_spec(self) -> dict:
        """``{"spec": ..., <search parameters>}``, and ``auto_check`` where the auto guard ran (optional)."""
        return self.manifest["index"]

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def config(self) -> Config:
        return load_config(self.local / CONFIG)

    def metrics(self) -> dict:
        return json.loads((self.local / METRICS).read_text())

    def state(self, whole_table: bool = True) -> dict:
        """The backbone's state dict with its whole item table (assembled from the row blocks of a sharded
        export), checked against the catalogue size. ``whole_table=False``: as stored, without the table where
        row blocks hold it (:meth:`table_parts`)."""
        weights = self.local / WEIGHTS
        state = torch.load(weights, map_location="cpu")
        parts = self.table_parts()
        if parts and not whole_table:
            return state
        if parts:
            blocks = [np.load(p, mmap_mode="r") for p in parts]
            state["item_emb.weight"] = torch.from_numpy(np.concatenate(blocks))
        check_table_rows(state, self.n_items, weights)
        return state

    def table_parts(self) -> List[Path]:
        """The ``.npy`` row blocks of a sharded export's item table, in id order (row 0 first); [] otherwise."""
        return [self.local / p for p in self.manifest.get("item_table", {}).get("parts", [])]

    def extra_files(self) -> Dict[str, str]:
        """Files beside the listed ones (the pipeline's ``evaluation.json``, ``pipeline.json``): ``{name: path}``."""
        listed = set(self.manifest["files"])
        return {p.name: str(p) for p in sorted(self.local.iterdir()) if p.is_file() and p.name not in listed}

    @property
    def added_items(self) -> List[dict]:
        """The items added after training, one record per addition (:attr:`FolderParts.added_items`)."""
        return list(self.manifest.get("added_items") or [])

    def items(self) -> pd.DataFrame:
        items = pd.read_parquet(self.local / ITEMS)
        if len(items) != self.n_items or not np.array_equal(items["item"].to_numpy(),
                                                            np.arange(1, len(items) + 1)):
            raise ModelFolderError(f"{self.local / ITEMS}: expected items 1..{self.n_items} in order")
        return items

    def head_state(self) -> Optional[dict]:
        return torch.load(self.local / HEAD, map_location="cpu") if self.has(HEAD) else None

    def phrases(self) -> Optional[pd.DataFrame]:
        return pd.read_parquet(self.local / PHRASES) if self.has(PHRASES) else None

    def text_map(self) -> Optional[dict]:
        """The text map as plain values (:attr:`FolderParts.text_map`), or None where the folder has none."""
        if not self.has(TEXT_MAP):
            return None
        with np.load(self.local / TEXT_MAP) as arrays:
            return {"weight": arrays["weight"], "bias": arrays["bias"], **self.manifest["text_map"]}


@contextlib.contextmanager
def open_local(path: str) -> Iterator[LocalFolder]:
    """The folder (local, or ``s3://`` downloaded to a temporary folder for the block), every listed file present."""
    manifest = read_manifest(path)
    with fs.local_dir(str(path)) as local:
        local = Path(local)
        missing = [f for f in manifest["files"] if not (local / f).exists()]
        if missing:
            raise ModelFolderError(f"{path}: incomplete model folder, missing {', '.join(missing)}")
        yield LocalFolder(str(path), local, manifest)
