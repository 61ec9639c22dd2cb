"""Step ``train``: Ray Train on the prepared data (eimf.training.runner), the best model exported and logged.

:func:`train` is one training run from start to end: the MLflow run opened, the workers fitted, the best model
exported to ``<storage>/<run_name>/export`` (eimf.steps.export) and logged with its artifacts, the run closed.
:func:`run` is the pipeline's step around it: ``inputs["data_path"]`` is the prepared dataset; with
``inputs["annotations"]`` the run is EIMF training on them (``train.input`` becomes ``memory``: the Ray Data cut
carries no semantic vectors), without it the backbone alone. The Ray Train run (and its checkpoints) is
``<out_dir>/<run_name>``, so the same name resumes.

With ``pipeline.from_model`` the run starts from that model (eimf.training.warm_start): the training run's tags say
the source as configured and as read (``warm_start.source``, ``warm_start.source_resolved``), its metrics the rows
carried (``warm_start/rows_matched``, ``warm_start/rows_text_map``, ``warm_start/rows_random``, ...).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import ray

from eimf import fs, tracking
from eimf.config import Config
from eimf.data.preprocess import prepare
from eimf.formats import checkpoints as ckpt
from eimf.formats.prepared import read_manifest
from eimf.ray_init import init_ray
from eimf.steps import StepOutput, numbers
from eimf.steps.export import export_checkpoint, log_run_artifacts
from eimf.steps.registry import local_model_folder, resolve_source
from eimf.training.runner import fit, run_name_of, storage_of
from eimf.training.warm_start import WarmStart, plan_warm_start

log = logging.getLogger(__name__)

#: Training metrics a step keeps (besides best_valid/* and test/*); ``bf16`` and the compile's own say how the step
#: ran, so an experiments table can tell its runs apart.
KEYS = ("step", "best_step", "train_seconds", "examples_per_s", "resumes", "first_resume_step", "window_overlap_share",
        "bf16", "compile_seconds", "compile_fell_back")


@dataclass
class TrainResult:
    run_name: str
    metrics: Dict[str, float]
    export_dir: str
    storage_path: str
    #: The MLflow run (None with tracking off).
    mlflow_run_id: Optional[str] = None
    #: The logged pyfunc model (``models:/eimf-<dataset>/<version>`` when registered), or None.
    model_uri: Optional[str] = None


def train(cfg: Config, data_path: Optional[str] = None, tags: Optional[Dict[str, str]] = None) -> TrainResult:
    """Prepare the data (unless given), train with Ray Train, export the best model. ``tags``: extra MLflow
    run tags (a pipeline passes its parent run as ``mlflow.parentRunId``)."""
    init_ray()
    if data_path is None:
        data_path = str(prepare(cfg.data).path)
    run_name, storage = run_name_of(cfg), storage_of(cfg)
    fingerprint = str(read_manifest(data_path).get("fingerprint", "unknown"))
    run_tags = {"eimf": "on" if cfg.eimf.enabled else "off", "dataset_fingerprint": fingerprint, **(tags or {})}
    run_id = tracking.start_run(cfg, run_name, tags=run_tags)
    uri = tracking.tracking_uri(cfg)
    warm = None
    try:
        if cfg.pipeline.from_model:
            warm = warm_start_plan(cfg, data_path, uri)
            log_warm_start(uri, run_id, warm)
        result = fit(cfg, data_path, run_name, run_id, uri, warm_start=warm)
    except Exception:
        tracking.end_run(uri, run_id, status="FAILED")
        raise
    export_dir = fs.join(storage, run_name, "export")
    with result.checkpoint.as_directory() as folder:
        export_checkpoint(Path(folder), export_dir, cfg, data_path)
        metrics = json.loads((Path(folder) / ckpt.METRICS).read_text())
    if warm is not None:
        metrics.update({f"warm_start/{k}": v for k, v in warm.counts.items()})
    model_uri = log_run_artifacts(uri, run_id, export_dir, data_path, cfg)
    tracking.end_run(uri, run_id)
    return TrainResult(run_name=run_name, metrics=metrics, export_dir=export_dir, storage_path=storage,
                       mlflow_run_id=run_id, model_uri=model_uri)


def warm_start_plan(cfg: Config, data_path: str, uri: str) -> WarmStart:
    """``pipeline.from_model`` read against the prepared data (eimf.training.warm_start): an alias resolved to its
    version (a pipeline passes the version it planned with), a registered version's folder downloaded, the arrays
    put in Ray's object store for the workers."""
    pinned = resolve_source(cfg.pipeline.from_model, uri)
    with local_model_folder(pinned["uri"], uri) as folder:
        return plan_warm_start(folder, cfg, data_path, cfg.pipeline.from_model, pinned["uri"], put=ray.put)


def log_warm_start(uri: str, run_id: Optional[str], warm: WarmStart) -> None:
    """What the warm start carried, in the training run: the source (as configured and as read) and the rows."""
    if not run_id:
        return
    tracking.set_tags(uri, run_id, {"warm_start.source": warm.source, "warm_start.source_resolved": warm.resolved,
                                    "warm_start.eimf_head": "not carried (starts anew)",
                                    **({"warm_start.note": warm.note} if warm.note else {})})
    tracking.log_metrics(uri, run_id, {f"warm_start/{k}": v for k, v in warm.counts.items()}, step=0)


def eimf_train_config(train_cfg):
    """``(train config of an EIMF run, note or None)``: EIMF training reads ``train.input=memory``; workers,
    strategy and ZeRO stage stay as given. A changed input is said in the log and the manifest."""
    if train_cfg.input == "memory":
        return train_cfg, None
    return (dataclasses.replace(train_cfg, input="memory"),
            f"train.input {train_cfg.input} -> memory (the Ray Data cut carries no semantic vectors)")


def run(cfg, inputs: dict, out_dir: Optional[str] = None, tags: Optional[dict] = None,
        run_name: Optional[str] = None) -> StepOutput:
    annotations = inputs.get("annotations")
    info = {}
    train_cfg = cfg.train
    if annotations:
        train_cfg, note = eimf_train_config(train_cfg)
        if note:
            log.warning("EIMF training: %s", note)
            info["train_config_changed"] = note
    train_cfg = dataclasses.replace(train_cfg, storage_path=out_dir or train_cfg.storage_path,
                                    run_name=run_name or train_cfg.run_name)
    eimf_cfg = dataclasses.replace(cfg.eimf, enabled=bool(annotations), annotations=annotations or None)
    res = train(dataclasses.replace(cfg, train=train_cfg, eimf=eimf_cfg), data_path=inputs["data_path"], tags=tags)
    keep = {k: res.metrics[k] for k in KEYS if k in res.metrics}
    keep.update({k: v for k, v in res.metrics.items() if k.startswith(("best_valid/", "test/", "warm_start/"))})
    info["train_run_name"] = res.run_name
    return StepOutput({"model_dir": res.export_dir, "run_dir": fs.join(res.storage_path, res.run_name)},
                      numbers(keep), res.mlflow_run_id, info)
