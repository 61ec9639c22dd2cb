"""The annotation step as one run: data + (optional) warm-up model -> typical users -> annotations -> MLflow.

:func:`run_annotation` is what ``eimf annotate`` / ``jobs/annotate.py`` call:

1. **Data and warm-up model.** With ``model_dir`` (an export folder of ``eimf train``), the model is loaded with
   :class:`eimf.serving.folder.ModelFolder` and the prepared dataset it was trained on is the one the folder
   records; the run takes the model's ``data`` and ``model`` config (the ``semantic`` settings stay the
   caller's). Without one, ``cfg.data`` is prepared (or reused) and the budget is drawn at random (logged).
2. **Annotation** (:func:`eimf.semantic.annotate.annotate_from_config`): selection, prompts, cache, the
   annotator named by ``semantic.annotator``, the sentence encoder; writes ``annotations.parquet``,
   ``selection.parquet``, ``prompts.jsonl`` and ``stats.json`` into the output folder.
3. **MLflow** (experiment ``eimf-<dataset>``, tag ``stage=annotate``): the config as params, the annotation
   stats as metrics under ``annotate/`` (users, prompts, cache hits, failures, valid share, attempts, tokens in
   and out, wall time, tokens/s, prompts/s), the output folder as artifacts (``annotations/``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from eimf import fs as efs

log = logging.getLogger(__name__)

#: Stats logged as MLflow metrics (``annotate/<name>``).
METRIC_KEYS = ("users", "selected", "prompts", "cache_hits", "shared_prompts", "failures", "failures_new",
               "valid_share", "attempts", "interests", "tokens_in", "tokens_out", "wall_s", "annotate_s",
               "encode_s", "tokens_per_s", "total_tokens_per_s", "prompts_per_s", "items_per_prompt_mean",
               "prompt_tokens_est_mean", "items_dropped_by_budget")


@dataclass
class AnnotationRun:
    run_name: str
    out_dir: str
    stats: dict
    mlflow_run_id: Optional[str]


def load_warmup(model_dir: str):
    """``(model, cfg, prepared)`` from a model folder (see module doc)."""
    from eimf.data.preprocess import load_prepared
    from eimf.serving.folder import ModelFolder

    folder = ModelFolder.load(str(model_dir), index=False)  # a local folder or s3://
    if not folder.data_path:
        raise FileNotFoundError(f"--model-dir {model_dir}: the model folder records no prepared dataset")
    return folder.model, folder.cfg, load_prepared(folder.data_path)


def run_annotation(cfg, model_dir: Optional[str] = None, out_dir: Optional[str] = None,
                   run_name: Optional[str] = None, annotator: Any = None, encoder: Any = None,
                   tags: Optional[dict] = None) -> AnnotationRun:
    """See the module doc. ``tags``: extra MLflow run tags (a pipeline passes ``mlflow.parentRunId``)."""
    from eimf import tracking
    from eimf.config import eimf_home
    from eimf.semantic.annotate import annotate_from_config

    if model_dir:
        model, mcfg, prepared = load_warmup(model_dir)
        cfg = dataclasses.replace(cfg, data=mcfg.data, model=mcfg.model)
        log.info("warm-up model %s (%s on %s)", model_dir, mcfg.model.backbone, mcfg.data.dataset)
    else:
        from eimf.data.preprocess import prepare

        model = None
        prepared = prepare(cfg.data)
    sem = cfg.semantic
    run_name = run_name or f"annotate-{cfg.data.dataset}-{sem.annotator}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = out_dir or efs.join(eimf_home(), "annotations", run_name)
    uri = tracking.tracking_uri(cfg)
    run_id = tracking.start_run(cfg, run_name, tags={"stage": "annotate", "annotator": sem.annotator,
                                                     "selection": sem.selection if model is not None else "random",
                                                     "warmup_model": str(model_dir or ""), **(tags or {})})
    status = "FAILED"
    try:
        _, stats = annotate_from_config(cfg, prepared, model, out_dir, annotator=annotator, encoder=encoder)
        metrics = {f"annotate/{k}": stats[k] for k in METRIC_KEYS
                   if isinstance(stats.get(k), (int, float)) and not isinstance(stats.get(k), bool)}
        tracking.log_metrics(uri, run_id, metrics, step=0)
        if run_id:
            with efs.local_dir(out_dir) as local:
                tracking.log_artifacts(uri, run_id, local, "annotations")
            tracking.client(uri).set_tag(run_id, "annotations", str(out_dir))
            tracking.client(uri).set_tag(run_id, "annotator_model", str(stats.get("model")))
        status = "FINISHED"
    finally:
        tracking.end_run(uri, run_id, status=status)
    log.info("annotation run %s: %s (MLflow run %s)", run_name, out_dir, run_id)
    return AnnotationRun(run_name=run_name, out_dir=str(out_dir), stats=stats, mlflow_run_id=run_id)
