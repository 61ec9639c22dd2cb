"""The pipeline's steps as plain functions, each ``run(cfg, inputs, out_dir, tags, run_name) -> StepOutput``.

    prepare   raw files -> the prepared dataset (eimf.data.preprocess)
    train     the prepared dataset (+ annotations) -> an exported model (eimf.training.runner)
    annotate  a warm-up model -> typical users -> interests -> vectors (eimf.semantic)
    evaluate  an exported model -> metrics on valid / test, MostPopular beside it (eimf.evaluation)
    export    the final model folder with its evaluation and lineage, logged as an MLflow model (eimf.serving)
    merge     two annotation sets -> one (a grid's ``coverage`` variant)

Steps open the MLflow run of what they do and write into their step folder; ``data``, ``training``,
``semantic``, ``evaluation`` and ``models`` stay libraries. ``eimf.pipeline`` plans, fingerprints, skips and
resumes them (a grid is a set of pipelines); the CLI calls them one at a time.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

from eimf import tracking


@dataclass
class StepOutput:
    """What a step made: files by role, numbers for manifests and summaries, its MLflow run, free-form notes."""

    outputs: Dict[str, str]
    metrics: Dict[str, float] = field(default_factory=dict)
    mlflow_run_id: Optional[str] = None
    info: Dict[str, Any] = field(default_factory=dict)


def numbers(d: dict) -> Dict[str, float]:
    """The finite int/float entries of ``d`` (what a manifest or MLflow metric can hold)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


@contextlib.contextmanager
def mlflow_run(cfg, run_name: str, tags: Optional[dict]) -> Iterator[Optional[str]]:
    """An MLflow run for the steps that have none of their own (prepare, evaluate, export); FAILED on error."""
    run_id = tracking.start_run(cfg, run_name, tags=dict(tags or {}))
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        tracking.end_run(tracking.tracking_uri(cfg), run_id, status=status)


__all__ = ["StepOutput", "numbers", "mlflow_run"]
