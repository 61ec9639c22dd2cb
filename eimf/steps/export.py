"""Step ``export``, and the export of a training run: model folders made and logged to MLflow.

* :func:`export_checkpoint`: a training checkpoint's best model -> a model folder (:mod:`eimf.formats.model_folder`):
  weights, config, the raw-id map and item texts, the retrieval index (built once, here), the EIMF head with
  its phrase table, and the text map that gives new items their rows (:func:`fit_folder_text_map`). It serves
  without Ray, an LLM, or the prepared data. The train step calls it.
* :func:`log_run_artifacts`: a training run's dataset manifest, item embeddings and learning curve to its MLflow
  run, and the model folder once (:func:`log_model_folder`): inside the pyfunc model with ``tracking.log_model``
  (registered as :func:`registered_model_name`), else as the ``model/`` artifacts.
* :func:`run`, the pipeline's last step: the final model folder (the trained export + ``evaluation.json`` +
  ``pipeline.json``), logged to MLflow once, as a registered model with ``tracking.log_model``.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from eimf import fs, tracking
from eimf.config import Config
from eimf.evaluation.retrieval import ItemIndex
from eimf.formats import checkpoints as ckpt
from eimf.formats.annotations import read_annotations
from eimf.formats.model_folder import ModelFolderError
from eimf.formats.prepared import read_split
from eimf.models import build_model
from eimf.models.text_map import TextMap, fit_text_map, table_blocks
from eimf.plots import learning_curve
from eimf.semantic.encoder import SemanticEncoder
from eimf.serving.explain import PhraseTable
from eimf.serving.folder import (ModelFolder, backbone_from_file, build_index, check_interests,
                                 head_from_state, needs_check, table_rows)
from eimf.serving.pyfunc import log_recommender
from eimf.steps import StepOutput, mlflow_run, numbers

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- checkpoint -> folder
def from_checkpoint(checkpoint_dir: Path, cfg: Config, data_path: str, weights: str = ckpt.BEST_MODEL,
                    head_file: Optional[str] = ckpt.BEST_HEAD, threads: Optional[int] = None) -> ModelFolder:
    """A model folder from a training checkpoint (its best weights and head), the prepared data's item table,
    and, for an EIMF model, the phrase table of its annotations. The retrieval index is built here, once, and the
    text map fitted (:func:`fit_folder_text_map`)."""
    checkpoint_dir = Path(checkpoint_dir)
    items = read_split(data_path, "items")
    items = items.sort_values("item").reset_index(drop=True)
    items["raw_id"] = items["raw_id"].astype(str)
    items["text"] = items["text"].fillna("").astype(str)
    shards = ckpt.shard_files(checkpoint_dir, ckpt.BEST_TABLE_PREFIX)
    scratch, parts = None, None
    if shards:  # the row-sharded table: one block per worker, never assembled here
        from eimf.training.sharded import BatchRows  # TorchRec, optional: only sharded checkpoints need it

        scratch = tempfile.TemporaryDirectory(prefix="eimf-table-")
        parts = _table_parts(shards, len(items), Path(scratch.name))
        model = build_model(cfg.model, len(items), item_table=BatchRows())
        model.load_state_dict(torch.load(checkpoint_dir / weights, map_location="cpu"))
        model.eval()
    else:
        model = backbone_from_file(cfg, checkpoint_dir / weights, len(items))
    metrics_file = checkpoint_dir / ckpt.METRICS
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    head = phrases = None
    if head_file and (checkpoint_dir / head_file).exists():
        head = head_from_state(cfg, torch.load(checkpoint_dir / head_file, map_location="cpu"))
        if cfg.eimf.annotations:
            try:
                phrases = PhraseTable.from_annotations(read_annotations(cfg.eimf.annotations))
            except (ValueError, FileNotFoundError) as e:  # labels are an extra; the model serves without them
                log.warning("model folder: no interest phrase table (%s): answers carry no interest labels", e)
    if parts:
        def blocks():  # rows of ids 1..N: the padding row 0 heads the first block
            for i, p in enumerate(parts):
                block = np.load(p, mmap_mode="r")
                yield block[1:] if i == 0 else block

        # auto's fast candidate is checked with the model's own VALID users (their rows read from the blocks)
        check = check_interests(model, cfg, data_path, table_parts=parts) if needs_check(cfg, len(items)) else None
        index = ItemIndex.from_blocks(blocks, len(items), int(cfg.model.dim), cfg.retrieval, threads,
                                      check_queries=check)
        text_map = fit_folder_text_map(cfg, items, lambda ids: table_rows(parts, ids))
    else:
        index = build_index(model, cfg, threads=threads, data_path=data_path)
        table = model.item_embeddings().detach().float().cpu().numpy()
        text_map = fit_folder_text_map(cfg, items, lambda ids: table[ids])
    return ModelFolder(model=model, cfg=cfg, items=items, index=index, metrics=metrics, head=head,
                       phrases=phrases, data_path=str(data_path), table_parts=parts, text_map=text_map,
                       _scratch=scratch)


#: ``train.text_map=auto`` fits on at most this many items with text: all of them up to here, else a fixed-seed
#: sample. Encoding is the cost (MiniLM on 2 CPU cores: a few hundred titles a second unloaded), and a 384 x 384
#: ridge needs far fewer than a million-item catalogue.
TEXT_MAP_MAX_ITEMS = 20_000


def fit_folder_text_map(cfg: Config, items, rows_of) -> Optional[TextMap]:
    """The text map of a trained table (eimf.models.text_map), fitted on the items with text (at most
    :data:`TEXT_MAP_MAX_ITEMS`), weighted by their training ``count``; ``rows_of(ids)``: the trained rows of sorted
    ids. None with ``train.text_map=never``, and None with a warning when it cannot be fitted (no texts, no
    encoder): the map is an extra, export goes on."""
    if cfg.train.text_map == "never":
        return None
    has_text = items["text"].str.strip().astype(bool).to_numpy()
    if not has_text.any():
        log.warning("model folder: no text map: no item has text (data.text_cols), so new items need retraining")
        return None
    counts = np.zeros(len(items) + 1, dtype=np.int64)
    counts[items["item"].to_numpy()] = items["count"].to_numpy()
    try:
        ids = items["item"].to_numpy()[has_text]
        if len(ids) > TEXT_MAP_MAX_ITEMS:
            ids = np.random.default_rng(0).choice(ids, TEXT_MAP_MAX_ITEMS, replace=False)
            log.info("model folder: the text map is fitted on a sample of %d of the %d items with text",
                     len(ids), int(has_text.sum()))
        ids = np.sort(ids)
        # encoded in memory, not through text_init's cache: that cache is a host's disk, which a cluster's export
        # must leave alone (at most TEXT_MAP_MAX_ITEMS x 384 floats)
        by_id = items.set_index("item")["text"]
        texts = _SampleEmbeddings(ids, SemanticEncoder(cfg.semantic.encoder).encode(list(by_id.loc[ids])))
        blocks = table_blocks(texts, rows_of, counts, ids=ids)
        text_map = fit_text_map(blocks, cfg.semantic.encoder)
    except Exception as e:  # noqa: BLE001 - any failure (encoder missing, too few texts): the folder goes without
        log.warning("model folder: no text map (%s: %s), so new items need retraining", type(e).__name__, e)
        return None
    log.info("model folder: text map fitted on %d items: held-out cosine %.3f (%d items), alpha %g, encoder %s",
             text_map.fit["items"], text_map.fit["heldout_cosine"], text_map.fit["heldout_items"],
             text_map.fit["alpha"], text_map.encoder)
    return text_map


class _SampleEmbeddings:
    """The text embeddings of a sample of items, indexed by item id as the whole ``[N + 1, D]`` table would be."""

    def __init__(self, ids: np.ndarray, embeddings: np.ndarray):
        self.ids, self.embeddings = ids, embeddings

    def __getitem__(self, ids) -> np.ndarray:
        return self.embeddings[np.searchsorted(self.ids, np.asarray(ids))]


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


def export_checkpoint(checkpoint_dir: Path, export_dir: str, cfg: Config, data_path: str) -> str:
    """The model folder of a checkpoint's best model, written to ``export_dir`` (local or ``s3://``)."""
    return from_checkpoint(Path(checkpoint_dir), cfg, data_path).write(str(export_dir))


# ------------------------------------------------------------------------------------------------ MLflow
def registered_model_name(cfg: Config) -> Optional[str]:
    """``tracking.registered_model``, default ``eimf-<dataset>``; None for "" (log the model, do not register it)."""
    name = cfg.tracking.registered_model
    return f"eimf-{cfg.data.dataset}" if name is None else (name or None)


def log_model_folder(uri: str, run_id: Optional[str], local_folder: str, cfg: Optional[Config]) -> Optional[str]:
    """The model folder's one copy in run ``run_id``: the pyfunc model ``recommender`` (which carries the folder,
    registered as :func:`registered_model_name`) with ``tracking.log_model``, else the folder as the ``model/``
    artifacts. Tags the run with ``model_uri`` (or ``model_artifacts``), where its other artifacts point. Returns
    the logged model's URI, or None."""
    if not run_id:
        return None
    client = tracking.client(uri)
    if cfg is None or not cfg.tracking.log_model:
        tracking.log_artifacts(uri, run_id, local_folder, "model")
        client.set_tag(run_id, "model_artifacts", "model")
        return None
    model_uri = log_recommender(local_folder, uri, run_id, registered_model_name(cfg))
    client.set_tag(run_id, "model_uri", model_uri)
    log.info("MLflow model: %s", model_uri)
    return model_uri


def log_run_artifacts(uri: str, run_id: Optional[str], export_dir: str, data_path: str,
                      cfg: Optional[Config] = None) -> Optional[str]:
    """Dataset manifest and the learning curve to MLflow, and the model folder once (:func:`log_model_folder`): the
    item table is in it (``model.pt`` or the sharded row blocks), and is not stored again beside it. ``export_dir`` and ``data_path`` may be local or ``s3://``. Returns the logged
    model's URI (None with tracking or model logging off)."""
    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp, fs.local_dir(str(export_dir)) as local_export:
        tmp = Path(tmp)
        manifest = fs.join(str(data_path), "manifest.json")
        if fs.exists(manifest):
            (tmp / "dataset_manifest.json").write_bytes(fs.read_bytes(manifest))
        history = tracking.client(uri).get_metric_history(run_id, tracking.metric_key("valid/recall@50"))
        if history:
            learning_curve(
                [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)],
                tmp / "learning_curve.png", ylabel="valid Recall@50",
            )
        tracking.log_artifacts(uri, run_id, str(tmp))
        return log_model_folder(uri, run_id, local_export, cfg)


# ------------------------------------------------------------------------------------------ the export step
def run(cfg, inputs: dict, out_dir: str, tags: Optional[dict] = None, run_name: str = "export",
        lineage: Optional[dict] = None) -> StepOutput:
    """``inputs``: ``model_dir`` (a trained export) and ``metrics`` (the evaluate step's metrics.json);
    ``lineage``: what produced it (the pipeline's stages and fingerprints), written to ``pipeline.json``."""
    final = fs.join(out_dir, "model")
    uri = tracking.tracking_uri(cfg)
    info = {}
    with mlflow_run(cfg, run_name, tags) as run_id, tempfile.TemporaryDirectory(prefix="eimf-export-") as tmp:
        fs.download_dir(inputs["model_dir"], tmp)
        metrics = fs.read_json(inputs["metrics"])
        fs.write_json(os.path.join(tmp, "evaluation.json"), metrics)
        fs.write_json(os.path.join(tmp, "pipeline.json"), {
            **(lineage or {}), "code_version": tracking.code_version(), "source_model": inputs["model_dir"],
            "exported_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        fs.upload_dir(tmp, final)
        model_uri = log_model_folder(uri, run_id, tmp, cfg)
        if model_uri:
            info["model_uri"] = model_uri
    return StepOutput({"model_dir": final}, numbers(metrics), run_id, info)
