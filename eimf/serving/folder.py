"""The model folder: the one module that writes and reads a trained model's files.

A model folder is everything serving needs, with no reference back to the data or the run that made it:

=================  ===========================================================================================
``folder.json``    format version, backbone, catalogue size, dimension, the retrieval index spec and its search
                   parameters, the files present, and (informational) the prepared data it was trained on
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
=================  ===========================================================================================

``ModelFolder.write(path)`` and ``ModelFolder.load(path)`` are the only code that knows these names; paths are
local or ``s3://``. :func:`from_checkpoint` builds one from a training checkpoint.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd
import torch

from eimf.config import Config, load_config, to_yaml
from eimf.evaluation.retrieval import ItemIndex

log = logging.getLogger(__name__)

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
ITEM_COLUMNS = ("item", "raw_id", "text", "count")
TABLE_PART = "item_table.{:05d}-of-{:05d}.npy"


class ModelFolderError(ValueError):
    """A folder that is not a (complete, readable) model folder; the message names the folder and the file."""


@dataclass
class ModelFolder:
    model: torch.nn.Module
    cfg: Config
    #: one row per item 1..N in id order: ITEM_COLUMNS
    items: pd.DataFrame
    index: ItemIndex
    metrics: dict = field(default_factory=dict)
    head: Optional[torch.nn.Module] = None
    phrases: Optional["PhraseTable"] = None  # noqa: F821 - eimf.explain.PhraseTable
    #: the prepared dataset the model was trained on; for evaluation only, and it may be gone by now
    data_path: Optional[str] = None
    #: Local ``.npy`` row blocks of the item table, in id order (a sharded export): then ``model`` is the dense
    #: part only and the table never sits whole in this process. None: the table is in ``model``.
    table_parts: Optional[List[str]] = None
    _scratch: Optional[object] = field(default=None, repr=False)  # owns table_parts' temporary folder

    @property
    def n_items(self) -> int:
        return len(self.items)

    # ------------------------------------------------------------------------------------------ write
    def write(self, path: str) -> str:
        """Write every file (built in a temporary folder, then copied; locally ``folder.json`` is written last, and
        :meth:`load` refuses a folder missing any file its manifest lists, e.g. an ``s3://`` upload cut short).
        Returns ``path``."""
        from eimf import fs

        with tempfile.TemporaryDirectory(prefix="eimf-model-") as tmp:
            out = Path(tmp)
            torch.save(self.model.state_dict(), out / WEIGHTS)
            (out / CONFIG).write_text(to_yaml(self.cfg))
            (out / METRICS).write_text(json.dumps(self.metrics, indent=1, sort_keys=True, default=float))
            self.items.loc[:, list(ITEM_COLUMNS)].to_parquet(out / ITEMS, index=False)
            self.index.save(out / INDEX)
            files = [WEIGHTS, CONFIG, METRICS, ITEMS, INDEX]
            table = None
            if self.table_parts:
                names = [TABLE_PART.format(i, len(self.table_parts)) for i in range(len(self.table_parts))]
                rows = []
                for src, name in zip(self.table_parts, names):
                    shutil.copyfile(src, out / name)
                    rows.append(int(np.load(out / name, mmap_mode="r").shape[0]))
                table = {"parts": names, "rows": rows}
                files += names
            if self.head is not None:
                torch.save(self.head.state_dict(), out / HEAD)
                files.append(HEAD)
            if self.phrases is not None:
                pd.DataFrame({"name": self.phrases.names, "description": self.phrases.descriptions,
                              "vector": list(np.asarray(self.phrases.vectors, dtype=np.float32))}
                             ).to_parquet(out / PHRASES, index=False)
                files.append(PHRASES)
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "backbone": self.cfg.model.backbone,
                "dataset": self.cfg.data.dataset, "n_items": self.n_items, "dim": int(self.cfg.model.dim),
                "num_interests": int(self.cfg.model.num_interests), "maxlen": int(self.cfg.model.maxlen),
                "index": {"spec": self.index.spec, **self.index.params}, "files": files + [MANIFEST],
                "data_path": self.data_path,
            }
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
                for name in files + [MANIFEST]:
                    shutil.copyfile(out / name, dest / name)
        return path

    # ------------------------------------------------------------------------------------------- load
    @classmethod
    def read_manifest(cls, path: str) -> dict:
        from eimf import fs

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

    @classmethod
    def load(cls, path: str, threads: Optional[int] = None, index: bool = True) -> "ModelFolder":
        """Read a folder (local or ``s3://``) onto the CPU, model in eval mode. ``index=False`` skips the retrieval
        index (evaluation that builds its own)."""
        from eimf import fs

        manifest = cls.read_manifest(path)
        with fs.local_dir(str(path)) as local:
            local = Path(local)
            missing = [f for f in manifest["files"] if not (local / f).exists()]
            if missing:
                raise ModelFolderError(f"{path}: incomplete model folder, missing {', '.join(missing)}")
            cfg = load_config(local / CONFIG)
            model = _load_backbone(cfg, local / WEIGHTS, manifest["n_items"],
                                   [local / p for p in manifest.get("item_table", {}).get("parts", [])])
            items = pd.read_parquet(local / ITEMS)
            if len(items) != manifest["n_items"] or not np.array_equal(items["item"].to_numpy(),
                                                                       np.arange(1, len(items) + 1)):
                raise ModelFolderError(f"{local / ITEMS}: expected items 1..{manifest['n_items']} in order")
            spec = manifest["index"]
            item_index = None
            if index:
                item_index = ItemIndex.load(local / INDEX, spec["spec"], nprobe=spec.get("nprobe"),
                                            ef_search=spec.get("efSearch"), refine_k=spec.get("k_factor_rf"),
                                            threads=threads)
                if item_index.n_items != manifest["n_items"]:
                    raise ModelFolderError(f"{local / INDEX}: {item_index.n_items} items, the model has "
                                           f"{manifest['n_items']}")
            head = phrases = None
            if HEAD in manifest["files"]:
                head = _load_head(cfg, local / HEAD)
            if PHRASES in manifest["files"]:
                from eimf.explain import PhraseTable

                p = pd.read_parquet(local / PHRASES)
                phrases = PhraseTable(list(p["name"]), list(p["description"].fillna("")),
                                      np.stack([np.asarray(v, dtype=np.float32) for v in p["vector"]]))
            metrics = json.loads((local / METRICS).read_text())
        return cls(model=model, cfg=cfg, items=items, index=item_index, metrics=metrics, head=head,
                   phrases=phrases, data_path=manifest.get("data_path"))


def from_checkpoint(checkpoint_dir: Path, cfg: Config, data_path: str, weights: str = "best_model.pt",
                    head_file: Optional[str] = "best_eimf_head.pt", threads: Optional[int] = None) -> ModelFolder:
    """A model folder from a training checkpoint (its best weights and head), the prepared data's item table,
    and, for an EIMF model, the phrase table of its annotations. The retrieval index is built here, once."""
    from eimf.data.preprocess import read_split

    checkpoint_dir = Path(checkpoint_dir)
    items = read_split(data_path, "items")
    items = items.sort_values("item").reset_index(drop=True)
    items["raw_id"] = items["raw_id"].astype(str)
    items["text"] = items["text"].fillna("").astype(str)
    from eimf.training.sharded import BEST_TABLE_PREFIX, shard_files

    shards = shard_files(checkpoint_dir, BEST_TABLE_PREFIX)
    scratch, parts = None, None
    if shards:  # the row-sharded table: one block per worker, never assembled here
        from eimf.models import build_model
        from eimf.training.sharded import BatchRows

        scratch = tempfile.TemporaryDirectory(prefix="eimf-table-")
        parts = _table_parts(shards, len(items), Path(scratch.name))
        model = build_model(cfg.model, len(items), item_table=BatchRows())
        model.load_state_dict(torch.load(checkpoint_dir / weights, map_location="cpu"))
        model.eval()
    else:
        model = _load_backbone(cfg, checkpoint_dir / weights, len(items))
    metrics_file = checkpoint_dir / METRICS
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    head = phrases = None
    if head_file and (checkpoint_dir / head_file).exists():
        head = _load_head(cfg, checkpoint_dir / head_file)
        if cfg.eimf.annotations:
            from eimf.explain import PhraseTable
            from eimf.semantic.annotate import read_annotations

            try:
                phrases = PhraseTable.from_annotations(read_annotations(cfg.eimf.annotations))
            except (ValueError, FileNotFoundError) as e:  # labels are an extra; the model serves without them
                log.warning("model folder: no interest phrase table (%s): answers carry no interest labels", e)
    if parts:
        def blocks():  # rows of ids 1..N: the padding row 0 heads the first block
            for i, p in enumerate(parts):
                block = np.load(p, mmap_mode="r")
                yield block[1:] if i == 0 else block

        index = ItemIndex.from_blocks(blocks, len(items), int(cfg.model.dim), cfg.retrieval, threads)
    else:
        index = build_index(model, cfg, threads=threads)
    return ModelFolder(model=model, cfg=cfg, items=items, index=index, metrics=metrics, head=head,
                       phrases=phrases, data_path=str(data_path), table_parts=parts, _scratch=scratch)


def _table_parts(shards: List[Path], n_items: int, out: Path) -> List[str]:
    """The checkpoint's per-worker best rows as ``.npy`` blocks, one at a time, checked to tile 0..N."""
    parts, expect = [], 0
    for i, path in enumerate(shards):
        saved = torch.load(path, map_location="cpu")
        rows = saved["rows"].float().numpy()
        if int(saved["offset"]) != expect:
            raise ModelFolderError(f"{path}: rows from {saved['offset']}, expected {expect} (a shard is missing)")
        expect += len(rows)
        parts.append(str(out / f"part{i:05d}.npy"))
        np.save(parts[-1], rows)
        del saved, rows
    if expect != n_items + 1:
        raise ModelFolderError(f"{shards[0].parent}: table shards hold {expect} rows, the catalogue needs "
                               f"{n_items + 1}")
    return parts


def build_index(model, cfg: Config, threads: Optional[int] = None) -> ItemIndex:
    """The ``retrieval`` setting's index over the model's item table."""
    return ItemIndex.from_config(model.item_embeddings().detach().float().cpu().numpy(), cfg.retrieval, threads)


def _load_backbone(cfg: Config, weights: Path, n_items: int, parts=()) -> torch.nn.Module:
    """The backbone for serving, its table whole in memory (from ``model.pt``, or assembled from row blocks)."""
    from eimf.models import build_model

    state = torch.load(weights, map_location="cpu")
    if parts:
        blocks = [np.load(p, mmap_mode="r") for p in parts]
        state["item_emb.weight"] = torch.from_numpy(np.concatenate(blocks))
    rows = state["item_emb.weight"].shape[0] - 1
    if rows != n_items:
        raise ModelFolderError(f"{weights}: an item table of {rows} items, the catalogue has {n_items}")
    model = build_model(cfg.model, n_items)
    model.load_state_dict(state)
    model.eval()
    return model


def _load_head(cfg: Config, path: Path) -> torch.nn.Module:
    from eimf.modules.alignment import EIMFHead

    state = torch.load(path, map_location="cpu")
    head = EIMFHead.from_config(cfg, int(state["projection.weight"].shape[1]))
    head.load_state_dict(state)
    head.eval()
    return head
