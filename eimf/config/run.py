"""The sections of a whole run: ``tracking`` (MLflow) and ``pipeline`` (jobs/pipeline.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from eimf.config.base import ConfigError, Section, operational


@dataclass
class TrackingConfig(Section):
    PATH: ClassVar[str] = "tracking"
    enabled: bool = True
    #: None: sqlite:///<EIMF_HOME>/mlflow.db, or $MLFLOW_TRACKING_URI when set.
    tracking_uri: Optional[str] = None
    #: None: ``eimf-<dataset>``.
    experiment: Optional[str] = None
    #: Log the trained model as an MLflow pyfunc model (eimf.serving) and register it.
    log_model: bool = True
    #: Registered model name; None: ``eimf-<dataset>``; "" logs the model without registering it.
    registered_model: Optional[str] = None


@dataclass
class PipelineConfig(Section):
    """``jobs/pipeline.py`` (eimf/pipeline/): prepare -> IBIM warm-up -> typical users + annotation -> EIMF
    training -> evaluation -> export, each stage in ``<storage_path>/stages/<step>/<fingerprint>/`` with a
    manifest, its copy in ``<storage_path>/<run_name>/<stage>/``."""

    PATH: ClassVar[str] = "pipeline"
    MINIMUMS: ClassVar[dict] = {"warmup_steps": 1}
    #: Same name again skips the stages whose fingerprint is unchanged and whose outputs are present, and resumes
    #: an interrupted one; None: ``pipeline-<dataset>-<backbone>-<time>`` (printed at the start).
    run_name: Optional[str] = operational()
    #: Root of the pipeline runs (local or ``s3://``); None: ``train.storage_path`` when set, else
    #: <EIMF_HOME>/pipelines.
    storage_path: Optional[str] = operational()
    #: Training steps of the IBIM warm-up (backbone only, eimf off); the EIMF stage uses ``train.max_steps``.
    warmup_steps: int = 5000
    #: ``train.seed`` of the warm-up; None: the run's own ``train.seed``. A grid sets its first seed, so that every
    #: seed of a variant is annotated from one warm-up (and shares its stage folder).
    warmup_seed: Optional[int] = None
    #: Splits the evaluate stage scores the final model on (valid | test), with MostPopular beside it.
    eval_splits: List[str] = field(default_factory=lambda: ["valid", "test"])

    def __post_init__(self):
        super().__post_init__()
        bad = [s for s in self.eval_splits if s not in ("valid", "test")]
        if bad or not self.eval_splits:
            raise ConfigError(f"pipeline.eval_splits must be a non-empty list of valid/test, got "
                              f"{list(self.eval_splits)}")
        if self.run_name is not None and (not self.run_name.strip() or "/" in self.run_name):
            raise ConfigError(f"pipeline.run_name must be a non-empty name without '/', got {self.run_name!r}")
