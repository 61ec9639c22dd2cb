"""Step ``promote``: the promotion gate after export. Is the new registered version better than the one served?

Both models are scored on the same newest holdout: ``pipeline.promote_split`` (default the last of
``pipeline.eval_splits``) of this run's prepared data, through :func:`eimf.steps.evaluate.score_on_data`. The
champion was trained on an older preparation: its items are matched by raw id, and the items it does not know cannot
be retrieved by it (they still count in the truth), which is what serving it on the new log would give.

The new version gets the registered-model alias ``champion`` when it beats the current champion on
``pipeline.promote_metric`` by at least ``pipeline.promote_margin`` (and by more than nothing), otherwise the alias
``challenger``; with no champion yet it becomes the first. Both scores, the difference, the margin and the decision
go to the step's MLflow run (metrics ``promote/new/<metric>``, ``promote/champion/<metric>``, ``promote/difference``,
``promote/margin``, ``promote/promoted``; tags ``promote.*``), to the new version's tags, and to ``decision.json``.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

from eimf import fs, tracking
from eimf.config import ConfigError
from eimf.steps import StepOutput, mlflow_run, numbers
from eimf.steps.evaluate import score_on_data
from eimf.steps.registry import (CHALLENGER, CHAMPION, local_model_folder, parse_model_uri, set_alias,
                                 version_by_alias, version_uri)

log = logging.getLogger(__name__)


def promote_split(cfg) -> str:
    """``pipeline.promote_split``, else the last of ``pipeline.eval_splits``."""
    return cfg.pipeline.promote_split or list(cfg.pipeline.eval_splits)[-1]


def promote_topk(cfg) -> tuple:
    """The cut-offs both models are scored at: ``eval.topk``, which must hold the metric's."""
    k = int(cfg.pipeline.promote_metric.split("@")[1])
    if k not in cfg.eval.topk:
        raise ConfigError(f"pipeline.promote_metric={cfg.pipeline.promote_metric}: {k} is not one of eval.topk "
                          f"{list(cfg.eval.topk)}")
    return tuple(cfg.eval.topk)


def decide(new: float, champion: Optional[float], margin: float) -> tuple:
    """``(promoted, why)``: the first model is champion; a later one only when strictly better by ``margin``."""
    if champion is None:
        return True, "no champion yet"
    diff = new - champion
    if diff > 0 and diff >= margin:
        return True, f"better by {diff:.4g} (margin {margin:g})"
    return False, f"{'better' if diff > 0 else 'not better'} by {diff:.4g}, margin {margin:g}"


def run(cfg, inputs: dict, out_dir: str, tags: Optional[dict] = None, run_name: str = "promote") -> StepOutput:
    """``inputs``: ``model_uri`` (the new registered version, ``models:/<name>/<version>``), ``model_dir`` (its
    folder) and ``data_path`` (this run's prepared data)."""
    parsed = parse_model_uri(inputs.get("model_uri") or "")
    if parsed is None or parsed[1] is None:
        raise ConfigError(f"promotion gate: the export registered no model version (got "
                          f"{inputs.get('model_uri')!r}); it needs tracking.log_model and a registered name")
    name, version, _ = parsed
    uri = tracking.tracking_uri(cfg)
    metric, margin, split = cfg.pipeline.promote_metric, float(cfg.pipeline.promote_margin), promote_split(cfg)
    topk, exclude = promote_topk(cfg), cfg.eval.exclude_history
    with mlflow_run(cfg, run_name, tags) as run_id:
        new = score_on_data(inputs["model_dir"], inputs["data_path"], split, topk, exclude)
        current = version_by_alias(uri, name, CHAMPION)
        champion, champion_version = None, None
        if current is not None and str(current.version) != str(version):
            champion_version = str(current.version)
            with local_model_folder(version_uri(name, champion_version), uri) as folder:
                champion = score_on_data(folder, inputs["data_path"], split, topk, exclude)
        if current is not None and str(current.version) == str(version):  # this gate already ran for it
            promoted, why = True, "already the champion"
        else:
            promoted, why = decide(new[metric], None if champion is None else champion[metric], margin)
        alias = CHAMPION if promoted else CHALLENGER
        set_alias(uri, name, alias, version)
        decision = {"model": name, "version": version, "alias": alias, "promoted": promoted, "reason": why,
                    "metric": metric, "split": split, "margin": margin, "new": new[metric],
                    "champion": None if champion is None else champion[metric],
                    "champion_version": champion_version, "data_path": inputs["data_path"]}
        metrics = {f"promote/new/{k}": v for k, v in new.items()}
        if champion is not None:
            metrics.update({f"promote/champion/{k}": v for k, v in champion.items()})
            metrics["promote/difference"] = new[metric] - champion[metric]
        metrics.update({"promote/margin": margin, "promote/promoted": float(promoted)})
        if run_id:
            tracking.log_metrics(uri, run_id, metrics, step=0)
            tracking.set_tags(uri, run_id, {"promote.decision": alias, "promote.reason": why,
                                            "promote.model": version_uri(name, version), "promote.metric": metric,
                                            "promote.split": split,
                                            "promote.champion": version_uri(name, champion_version)
                                            if champion_version else "none"})
        client = tracking.client(uri)
        for key, value in (("eimf.promotion", alias), ("eimf.promotion.reason", why),
                           ("eimf.promotion.against", champion_version or "none")):
            client.set_model_version_tag(name, str(version), key, value)
        outputs = {"decision": fs.join(out_dir, "decision.json")}
        fs.write_json(outputs["decision"], decision)
    log.info("promotion gate: %s version %s -> %s (%s: new %.4f, champion %s)", name, version, alias, metric,
             new[metric], "none" if champion is None else f"{champion[metric]:.4f} (version {champion_version})")
    return StepOutput(outputs, numbers(metrics), run_id, {"decision": json.loads(json.dumps(decision, default=str))})
