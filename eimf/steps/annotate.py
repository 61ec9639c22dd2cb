"""Step ``annotate``: a warm-up model -> typical users (k-means) -> the annotator -> sentence vectors.

1. **Data and warm-up model.** With ``inputs["model_dir"]`` (an exported model folder) the model and the
   prepared dataset it records are loaded; the step takes the model's ``data`` and ``model`` config (the
   ``semantic`` settings stay the caller's). Without one, ``cfg.data`` is prepared (or reused) and the budget is
   drawn at random (logged).
2. **Annotation** (:func:`eimf.semantic.annotate.annotate_from_config`): selection, prompts, cache, the
   annotator named by ``semantic.annotator``, the encoder; writes ``annotations.parquet``, ``selection.parquet``,
   ``prompts.jsonl`` and ``stats.json`` into ``out_dir``.
3. **MLflow** (tag ``stage=annotate``): the stats as ``annotate/*`` metrics, the folder as artifacts.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Optional

from eimf import fs, tracking
from eimf.config import eimf_home
from eimf.data.preprocess import prepare
from eimf.formats.annotations import ANNOTATIONS_FILE, SELECTION_FILE, STATS_FILE
from eimf.formats.prepared import load_prepared
from eimf.semantic.annotate import annotate_from_config
from eimf.serving.folder import ModelFolder
from eimf.steps import StepOutput, numbers

log = logging.getLogger(__name__)

#: Stats logged as MLflow metrics (``annotate/<name>``).
METRIC_KEYS = ("users", "selected", "prompts", "cache_hits", "shared_prompts", "failures", "failures_new",
               "valid_share", "attempts", "interests", "tokens_in", "tokens_out", "wall_s", "annotate_s",
               "encode_s", "tokens_per_s", "total_tokens_per_s", "prompts_per_s", "items_per_prompt_mean",
               "prompt_tokens_est_mean", "items_dropped_by_budget")
#: Stats a step keeps in its manifest and the pipeline summary.
KEYS = ("users", "selected", "prompts", "cache_hits", "failures", "valid_share", "tokens_out", "wall_s")


def load_warmup(model_dir: str):
    """``(model, cfg, prepared)`` from a model folder (local or ``s3://``)."""
    folder = ModelFolder.load(str(model_dir), index=False)
    if not folder.data_path:
        raise FileNotFoundError(f"--model-dir {model_dir}: the model folder records no prepared dataset")
    return folder.model, folder.cfg, load_prepared(folder.data_path)


def run(cfg, inputs: Optional[dict] = None, out_dir: Optional[str] = None, tags: Optional[dict] = None,
        run_name: Optional[str] = None, annotator: Any = None, encoder: Any = None) -> StepOutput:
    """See the module doc. ``out_dir`` None: ``<EIMF_HOME>/annotations/<run_name>``."""
    model_dir = (inputs or {}).get("model_dir")
    if model_dir:
        model, mcfg, prepared = load_warmup(model_dir)
        cfg = dataclasses.replace(cfg, data=mcfg.data, model=mcfg.model)
        log.info("warm-up model %s (%s on %s)", model_dir, mcfg.model.backbone, mcfg.data.dataset)
    else:
        model, prepared = None, prepare(cfg.data)
    sem = cfg.semantic
    run_name = run_name or f"annotate-{cfg.data.dataset}-{sem.annotator}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = str(out_dir or fs.join(eimf_home(), "annotations", run_name))
    uri = tracking.tracking_uri(cfg)
    run_id = tracking.start_run(cfg, run_name, tags={"stage": "annotate", "annotator": sem.annotator,
                                                     "selection": sem.selection if model is not None else "random",
                                                     "warmup_model": str(model_dir or ""), **(tags or {})})
    status = "FAILED"
    try:
        _, stats = annotate_from_config(cfg, prepared, model, out_dir, annotator=annotator, encoder=encoder)
        tracking.log_metrics(uri, run_id, {f"annotate/{k}": v for k, v in numbers(stats).items()
                                           if k in METRIC_KEYS}, step=0)
        if run_id:
            with fs.local_dir(out_dir) as local:
                tracking.log_artifacts(uri, run_id, local, "annotations")
            tracking.client(uri).set_tag(run_id, "annotations", out_dir)
            tracking.client(uri).set_tag(run_id, "annotator_model", str(stats.get("model")))
        status = "FINISHED"
    finally:
        tracking.end_run(uri, run_id, status=status)
    log.info("annotation %s: %s (MLflow run %s)", run_name, out_dir, run_id)
    outputs = {"annotations": fs.join(out_dir, ANNOTATIONS_FILE), "selection": fs.join(out_dir, SELECTION_FILE),
               "stats": fs.join(out_dir, STATS_FILE)}
    return StepOutput(outputs, numbers({k: stats.get(k) for k in KEYS if stats.get(k) is not None}), run_id,
                      {"out_dir": out_dir, "run_name": run_name, "stats": stats, "annotator": sem.annotator,
                       "model": stats.get("model"), "cache_dir": sem.cache_dir})
