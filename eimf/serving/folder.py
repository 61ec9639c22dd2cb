"""A model folder as objects: the backbone, its retrieval index, the EIMF head and the interest phrases.

The files and their names are :mod:`eimf.formats.model_folder`'s; this module turns them into the objects that
serving and evaluation use (:meth:`ModelFolder.load`) and back (:meth:`ModelFolder.write`). Export from a training
checkpoint is eimf.steps.export's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd
import torch

from eimf.config import Config
from eimf.evaluation import retrieval as retrieval_mod
from eimf.evaluation.evaluate import history_batch
from eimf.evaluation.retrieval import ItemIndex
from eimf.formats import model_folder as fmt
from eimf.formats.model_folder import ModelFolderError  # noqa: F401  (callers catch it from here)
from eimf.formats.prepared import read_split
from eimf.models import build_model
from eimf.models.text_map import TextMap
from eimf.modules.alignment import EIMFHead
from eimf.serving.explain import PhraseTable

log = logging.getLogger(__name__)


@dataclass
class ModelFolder:
    model: torch.nn.Module
    cfg: Config
    #: one row per item 1..N in id order: eimf.formats.model_folder.ITEM_COLUMNS
    items: pd.DataFrame
    index: ItemIndex
    metrics: dict = field(default_factory=dict)
    head: Optional[torch.nn.Module] = None
    phrases: Optional[PhraseTable] = None
    #: the prepared dataset the model was trained on; for evaluation only, and it may be gone by now
    data_path: Optional[str] = None
    #: Local ``.npy`` row blocks of the item table, in id order (a sharded export): then ``model`` is the dense
    #: part only and the table never sits whole in this process. None: the table is in ``model``.
    table_parts: Optional[List[str]] = None
    #: the map from an item's text embedding to its row, for new items (eimf.models.text_map); None: no texts
    text_map: Optional[TextMap] = None
    #: the items added after training, with rows from the text map (eimf.formats.model_folder's ``added_items``)
    added_items: List[dict] = field(default_factory=list)
    _scratch: Optional[object] = field(default=None, repr=False)  # owns table_parts' temporary folder

    @property
    def n_items(self) -> int:
        return len(self.items)

    def write(self, path: str) -> str:
        """Write the folder (:func:`eimf.formats.model_folder.write`); returns ``path``."""
        phrases = None
        if self.phrases is not None:
            phrases = pd.DataFrame({"name": self.phrases.names, "description": self.phrases.descriptions,
                                    "vector": list(np.asarray(self.phrases.vectors, dtype=np.float32))})
        return fmt.write(path, fmt.FolderParts(
            state=self.model.state_dict(), cfg=self.cfg, items=self.items, save_index=self.index.save,
            index_spec=self.index.record(), metrics=self.metrics,
            head_state=None if self.head is None else self.head.state_dict(), phrases=phrases,
            data_path=self.data_path, table_parts=self.table_parts,
            text_map=None if self.text_map is None else self.text_map.to_arrays(), added_items=self.added_items))

    @staticmethod
    def read_manifest(path: str) -> dict:
        return fmt.read_manifest(path)

    @classmethod
    def load(cls, path: str, threads: Optional[int] = None, index: bool = True) -> "ModelFolder":
        """Read a folder (local or ``s3://``) onto the CPU, model in eval mode. ``index=False`` skips the retrieval
        index (evaluation that builds its own)."""
        with fmt.open_local(path) as folder:
            cfg = folder.config()
            model = backbone_from_state(cfg, folder.state(), folder.n_items)
            items = folder.items()
            item_index = load_index(folder, threads) if index else None
            head_state = folder.head_state()
            head = None if head_state is None else head_from_state(cfg, head_state)
            p = folder.phrases()
            phrases = None if p is None else PhraseTable(
                list(p["name"]), list(p["description"].fillna("")),
                np.stack([np.asarray(v, dtype=np.float32) for v in p["vector"]]))
            metrics = folder.metrics()
            text_map = folder.text_map()
        return cls(model=model, cfg=cfg, items=items, index=item_index, metrics=metrics, head=head,
                   phrases=phrases, data_path=folder.manifest.get("data_path"),
                   text_map=None if text_map is None else TextMap.from_arrays(text_map),
                   added_items=folder.added_items)


def load_index(folder: fmt.LocalFolder, threads: Optional[int] = None) -> ItemIndex:
    """The folder's retrieval index with the search parameters it records, checked against the catalogue size."""
    spec = folder.index_spec
    index = ItemIndex.load(folder.index_file, spec["spec"], nprobe=spec.get("nprobe"), ef_search=spec.get("efSearch"),
                           refine_k=spec.get("k_factor_rf"), threads=threads, auto_check=spec.get("auto_check"))
    if index.n_items != folder.n_items:
        raise ModelFolderError(f"{folder.index_file}: {index.n_items} items, the model has {folder.n_items}")
    return index


def build_index(model, cfg: Config, threads: Optional[int] = None, data_path: Optional[str] = None,
                check_queries=None) -> ItemIndex:
    """The ``retrieval`` setting's index over the model's item table.

    ``retrieval.index=auto`` above ``AUTO_EXACT_MAX_ITEMS`` items checks its fast candidate with the model's
    interest vectors (eimf.evaluation.retrieval.auto_index): ``check_queries`` if given, else those of up to
    ``AUTO_CHECK_USERS`` VALID users of the prepared data at ``data_path`` (:func:`check_interests`). With neither
    it builds the safe IVF,Flat, unverified, and records why."""
    table = model.item_embeddings().detach().float().cpu().numpy()
    if check_queries is None and data_path and needs_check(cfg, len(table) - 1):
        check_queries = check_interests(model, cfg, data_path)
    return ItemIndex.from_config(table, cfg.retrieval, threads, check_queries=check_queries)


def needs_check(cfg: Config, n_items: int) -> bool:
    """Whether the index of ``cfg.retrieval`` over ``n_items`` goes through the auto guard (so wants check
    queries)."""
    return cfg.retrieval.index == "auto" and n_items > retrieval_mod.AUTO_EXACT_MAX_ITEMS


def check_interests(model, cfg: Config, data_path: str, table_parts: Optional[List[str]] = None,
                    max_users: Optional[int] = None) -> Optional[np.ndarray]:
    """The auto guard's check queries: the interest vectors ``[U, K, d]`` of up to ``max_users`` (default
    ``AUTO_CHECK_USERS``) users of the VALID split of the prepared data at ``data_path``, a fixed-seed sample, their
    last ``model.maxlen`` history items as evaluation feeds them. ``table_parts``: the ``.npy`` row blocks of a
    sharded export (the backbone's table is then ``BatchRows``, given the histories' rows from the blocks). None,
    with a warning, when the split cannot be read or is empty."""
    max_users = retrieval_mod.AUTO_CHECK_USERS if max_users is None else int(max_users)
    try:
        valid = read_split(data_path, "valid")
    except (OSError, ValueError) as e:  # no prepared data any more: the guard falls back, unverified
        log.warning("retrieval index auto: no VALID split at %s to check the fast index with (%s)", data_path, e)
        return None
    if len(valid) == 0 or max_users <= 0:
        return None
    if len(valid) > max_users:
        valid = valid.iloc[np.sort(np.random.default_rng(0).choice(len(valid), max_users, replace=False))]
    hist, mask = history_batch(list(valid["history"]), int(cfg.model.maxlen))
    hist_t = torch.from_numpy(np.asarray(hist, dtype=np.int64))
    with torch.no_grad():
        if table_parts:
            ids = torch.unique(torch.cat([torch.zeros(1, dtype=torch.int64), hist_t.reshape(-1)]))
            model.item_emb.set(ids, torch.from_numpy(table_rows(table_parts, ids.numpy())))
        out = model.interests(hist_t, torch.from_numpy(np.asarray(mask)))
    return out.detach().float().cpu().numpy()


def table_rows(parts: List[str], ids: np.ndarray) -> np.ndarray:
    """Rows of global ids ``ids`` (sorted) from ``.npy`` row blocks in id order, row 0 first."""
    out, start = [], 0
    for p in parts:
        block = np.load(p, mmap_mode="r")
        lo, hi = np.searchsorted(ids, [start, start + len(block)])
        out.append(np.asarray(block[ids[lo:hi] - start], dtype=np.float32))
        start += len(block)
    rows = np.concatenate(out)
    if len(rows) != len(ids):
        raise ModelFolderError(f"item table blocks hold {start} rows, an id up to {int(ids.max())} was asked for")
    return rows


def backbone_from_state(cfg: Config, state: dict, n_items: int) -> torch.nn.Module:
    """The backbone for serving (eval mode), its table whole in memory."""
    model = build_model(cfg.model, n_items)
    model.load_state_dict(state)
    model.eval()
    return model


def backbone_from_file(cfg: Config, weights: Path, n_items: int) -> torch.nn.Module:
    """:func:`backbone_from_state` of a ``.pt`` state dict, its table checked against the catalogue size."""
    state = torch.load(weights, map_location="cpu")
    fmt.check_table_rows(state, n_items, weights)
    return backbone_from_state(cfg, state, n_items)


def head_from_state(cfg: Config, state: dict) -> torch.nn.Module:
    head = EIMFHead.from_config(cfg, int(state["projection.weight"].shape[1]))
    head.load_state_dict(state)
    head.eval()
    return head
