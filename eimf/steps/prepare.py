"""Step ``prepare``: read, validate, k-core, re-index and split the raw logs (:func:`eimf.data.preprocess.prepare`)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from eimf import fs, tracking
from eimf.data.preprocess import prepare
from eimf.steps import StepOutput, mlflow_run, numbers

COUNTS = ("rows_in", "rows_dropped", "users_out", "items_out", "interactions_out", "train_users", "valid_users",
          "test_users")


def run(cfg, inputs: Optional[dict] = None, out_dir: Optional[str] = None, tags: Optional[dict] = None,
        run_name: str = "prepare") -> StepOutput:
    """Prepared data under ``out_dir`` (unless ``data.output_dir`` is set); counts as ``prepare/*`` metrics.
    ``inputs["data_fingerprint"]``: the data fingerprint a plan already took (computed once per run)."""

    data_cfg = cfg.data if cfg.data.output_dir or not out_dir else dataclasses.replace(cfg.data, output_dir=out_dir)
    uri = tracking.tracking_uri(cfg)
    with mlflow_run(cfg, run_name, tags) as run_id:
        prepared = prepare(data_cfg, known_fingerprint=(inputs or {}).get("data_fingerprint"))
        c = prepared.manifest.get("counts", {})
        metrics = numbers({k: c[k] for k in COUNTS if k in c})
        tracking.log_metrics(uri, run_id, {f"prepare/{k}": v for k, v in metrics.items()}, step=0)
        if run_id:
            tracking.client(uri).log_dict(run_id, prepared.manifest, "dataset_manifest.json")
            tracking.client(uri).set_tag(run_id, "dataset_fingerprint", prepared.manifest["fingerprint"])
    path = str(prepared.path)
    return StepOutput({"data_path": path, "dataset_manifest": fs.join(path, "manifest.json")}, metrics, run_id)
