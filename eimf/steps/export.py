"""Step ``export``: the final model folder (the trained export + ``evaluation.json`` + ``pipeline.json``), logged
to MLflow as artifacts and, with ``tracking.log_model``, as a registered pyfunc model (eimf.serving.pyfunc)."""
from __future__ import annotations

import datetime as _dt
import os
import tempfile
from typing import Optional

from eimf.steps import StepOutput, mlflow_run, numbers


def run(cfg, inputs: dict, out_dir: str, tags: Optional[dict] = None, run_name: str = "export",
        lineage: Optional[dict] = None) -> StepOutput:
    """``inputs``: ``model_dir`` (a trained export) and ``metrics`` (the evaluate step's metrics.json);
    ``lineage``: what produced it (the pipeline's stages and fingerprints), written to ``pipeline.json``."""
    from eimf import fs, tracking

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
        tracking.log_artifacts(uri, run_id, tmp, "model")
        if run_id and cfg.tracking.log_model:
            from eimf.serving.pyfunc import log_recommender
            from eimf.training.runner import registered_model_name

            info["model_uri"] = log_recommender(tmp, uri, run_id, registered_model_name(cfg))
            tracking.client(uri).set_tag(run_id, "model_uri", info["model_uri"])
    return StepOutput({"model_dir": final}, numbers(metrics), run_id, info)
