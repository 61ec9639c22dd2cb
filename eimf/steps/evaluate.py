"""Step ``evaluate``: an exported model on its prepared data, MostPopular beside it (no Ray, no LLM).

The model, its index and the data are loaded once for all splits. With ``per_user=True`` each split's per-user
metrics go to ``<out_dir>/per_user.<split>.parquet`` too, for paired comparisons (eimf.evaluation.compare).
"""
from __future__ import annotations

import contextlib
import io

from typing import Optional, Sequence

from eimf.steps import StepOutput, mlflow_run, numbers


def run(cfg, inputs: dict, out_dir: str, tags: Optional[dict] = None, run_name: str = "evaluate",
        splits: Sequence[str] = ("valid", "test"), with_baseline: bool = True, per_user: bool = False,
        log_to_mlflow: bool = True) -> StepOutput:
    from eimf import fs, tracking
    from eimf.evaluation.exported import evaluate_splits

    frames: Optional[dict] = {} if per_user else None
    with mlflow_run(cfg, run_name, tags) if log_to_mlflow else contextlib.nullcontext() as run_id:
        metrics = evaluate_splits(inputs["model_dir"], splits, with_baseline=with_baseline,
                                  data_path=inputs.get("data_path"), per_user=frames)
        outputs = {"metrics": fs.join(out_dir, "metrics.json")}
        fs.write_json(outputs["metrics"], metrics)
        for split, df in (frames or {}).items():
            outputs[f"per_user_{split}"] = fs.join(out_dir, f"per_user.{split}.parquet")
            buf = io.BytesIO()
            df.to_parquet(buf, index=False)
            fs.write_bytes(outputs[f"per_user_{split}"], buf.getvalue())
        if run_id:
            tracking.log_metrics(tracking.tracking_uri(cfg), run_id, metrics, step=0)
    return StepOutput(outputs, numbers(metrics), run_id, {"model_dir": inputs["model_dir"]})

