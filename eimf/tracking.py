"""MLflow tracking: one experiment per dataset, one run per training, rank-0 logging.

The driver creates the experiment (with an explicit artifact location, so artifacts never land in a
Ray worker's temp folder) and the run; training workers log metrics to that run id; the driver logs
artifacts at the end. Metric names are the same in every run so runs compare side by side in the UI.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Dict, Optional

from eimf.config import Config, eimf_home, flatten, to_dict

log = logging.getLogger(__name__)


def default_tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = Path(eimf_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.tracking_uri or default_tracking_uri()


def default_artifact_root() -> str:
    if os.environ.get("EIMF_ARTIFACT_ROOT"):
        return os.environ["EIMF_ARTIFACT_ROOT"]
    return (Path(eimf_home()).resolve() / "mlartifacts").as_uri()


def metric_key(name: str) -> str:
    """MLflow names allow [/\\w.\\- :] only: 'valid/recall@50' -> 'valid/recall_at_50'."""
    return re.sub(r"[^/\w.\- :]", "_", name.replace("@", "_at_"))


def code_version() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def start_run(cfg: Config, run_name: str, tags: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Create (or, for a resumed run name, find) the MLflow run; returns its id. Driver only.

    ``tags`` are set on the run, a found one included; ``{"mlflow.parentRunId": id}`` nests it under a parent
    run in the UI (a pipeline stage under its pipeline run)."""
    if not cfg.tracking.enabled:
        return None
    uri = tracking_uri(cfg)
    c = client(uri)
    exp_name = cfg.tracking.experiment or f"eimf-{cfg.data.dataset}"
    exp = c.get_experiment_by_name(exp_name)
    if exp:
        exp_id = exp.experiment_id
    else:
        # A tracking server decides where artifacts go (its --artifacts-destination, proxied); a local
        # store gets an explicit root so artifacts never land in a Ray worker's working directory.
        served = uri.startswith(("http://", "https://", "databricks"))
        location = os.environ.get("EIMF_ARTIFACT_ROOT") if served else default_artifact_root()
        exp_id = c.create_experiment(exp_name, artifact_location=location)
    found = c.search_runs([exp_id], filter_string=f"tags.`eimf.run_name` = '{run_name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        for k, v in (tags or {}).items():  # e.g. the parent run of a pipeline stage that is resumed
            c.set_tag(run_id, k, v)
        log.info("MLflow: resuming run %s (%s) in %s", run_name, run_id, uri)
        return run_id
    all_tags = {"eimf.run_name": run_name, "mlflow.runName": run_name,
                "backbone": cfg.model.backbone, "dataset": cfg.data.dataset,
                "code_version": code_version(), **(tags or {})}
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    params = {k: str(v)[:6000] for k, v in flatten(to_dict(cfg)).items()}
    from mlflow.entities import Param

    c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    log.info("MLflow: run %s (%s) in %s, experiment %s", run_name, run.info.run_id, uri, exp_name)
    return run.info.run_id


def log_metrics(uri: str, run_id: Optional[str], metrics: Dict[str, float], step: int) -> None:
    if not run_id:
        return
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(metric_key(k), float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float))]
    client(uri).log_batch(run_id, metrics=batch)


def log_artifacts(uri: str, run_id: Optional[str], folder: str, artifact_path: Optional[str] = None) -> None:
    if run_id:
        client(uri).log_artifacts(run_id, folder, artifact_path)


def end_run(uri: str, run_id: Optional[str], status: str = "FINISHED") -> None:
    if run_id:
        client(uri).set_terminated(run_id, status=status)
