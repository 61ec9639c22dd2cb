"""The sections of a whole run: ``tracking`` (MLflow) and ``pipeline`` (jobs/pipeline.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
import re
from typing import ClassVar, List, Optional

from eimf.config.base import ConfigError, Section, check_min, operational
from eimf.config.train import EVAL_METRICS


#: An MLflow registered-model URI the warm start and the promotion gate read: ``models:/<name>/<version>`` or
#: ``models:/<name>@<alias>``.
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_\-]+))")


def check_model_source(where: str, value: str) -> None:
    """``value`` is a model folder path or a registered-model URI (:data:`MODEL_URI`); other MLflow URIs (a stage
    name, ``runs:/``) are refused: aliases, not stages, name a version."""
    v = str(value).strip()
    if not v:
        raise ConfigError(f"{where} must be a model folder or models:/<name>@<alias> | models:/<name>/<version>, "
                          f"got an empty value")
    if v.startswith("models:/") and not MODEL_URI.fullmatch(v):
        raise ConfigError(f"{where}={v}: a registered model is models:/<name>@<alias> (e.g. @champion) or "
                          f"models:/<name>/<version>; stages and other forms are not read")
    if re.match(r"^[a-z][a-z0-9+.-]*:/", v) and not v.startswith(("models:/", "s3://", "file:/")):
        raise ConfigError(f"{where}={v}: not a model folder (local or s3://) nor a models:/ URI")


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
    #: Warm start: every training stage starts from this model instead of from scratch: a model folder (local or
    #: ``s3://``) or an MLflow model URI (``models:/eimf-<dataset>@champion``, ``models:/eimf-<dataset>/3``). Its
    #: interest extractor's weights are copied, its item rows go to the same raw ids here, items new in this data
    #: get rows from its text map (when it has one and they have text), the rest the usual init; the EIMF head
    #: starts anew (eimf.training.warm_start). An alias is resolved to its version when the pipeline is planned.
    #: Also read by ``jobs/train.py`` (``pipeline.from_model=...``).
    from_model: Optional[str] = None
    #: The promotion gate after export, when the model is registered (``tracking.log_model`` and a registered
    #: name): the new version gets the alias ``champion`` if it beats the current champion on
    #: ``promote_metric`` by ``promote_margin`` on this run's newest holdout, else ``challenger``
    #: (eimf.steps.promote). False: register only.
    promote: bool = True
    #: ``<metric>@<k>``: recall | ndcg | hitrate at one of ``eval.topk``.
    promote_metric: str = "recall@50"
    #: How much better (absolute, in ``promote_metric``) the new model must be to become champion.
    promote_margin: float = 0.0
    #: The split both models are scored on; None: the last of ``eval_splits`` (test by default).
    promote_split: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        bad = [s for s in self.eval_splits if s not in ("valid", "test")]
        if bad or not self.eval_splits:
            raise ConfigError(f"pipeline.eval_splits must be a non-empty list of valid/test, got "
                              f"{list(self.eval_splits)}")
        if self.promote_split is not None and self.promote_split not in ("valid", "test"):
            raise ConfigError(f"pipeline.promote_split must be valid, test or null, got {self.promote_split!r}")
        m = re.fullmatch(r"([a-z]+)@(\d+)", str(self.promote_metric))
        if not m or m.group(1) not in EVAL_METRICS or int(m.group(2)) < 1:
            raise ConfigError(f"pipeline.promote_metric must be <metric>@<k> with metric one of "
                              f"{', '.join(EVAL_METRICS)} (e.g. recall@50), got {self.promote_metric!r}")
        check_min("pipeline.promote_margin", self.promote_margin, 0.0)
        if self.from_model is not None:
            check_model_source("pipeline.from_model", self.from_model)
        if self.run_name is not None and (not self.run_name.strip() or "/" in self.run_name):
            raise ConfigError(f"pipeline.run_name must be a non-empty name without '/', got {self.run_name!r}")
