"""Grids of pipelines: every cell of a grid, (dataset, backbone, seed) for backbones alone or (dataset, backbone,
seed, variant) for EIMF against its backbone, is a pipeline run (:class:`eimf.pipeline.Pipeline`) named
``<grid>-<dataset>-<backbone>[-<variant>]-s<seed>``, resumable and visible in MLflow as any pipeline. The cells
share their stage folders through the pipeline's stage store (keyed by fingerprint):

- one prepare stage per dataset;
- per (dataset, backbone) one warm-up: the backbone on the grid's first seed for ``train.max_steps`` steps
  (``pipeline.warmup_steps`` and ``pipeline.warmup_seed`` of every cell), which is also the ``backbone`` cell of
  the first seed (the same ``train`` stage), so it is trained once and picks the typical users of every
  annotation set;
- one annotation set per distinct ``semantic.*`` setting, which every seed of every variant with those settings
  trains on.

A pipeline run later with the same settings (``jobs/pipeline.py``) finds these stages done and trains nothing.
Rows already in the grid's ``.jsonl`` are not run again; each run's per-user tables go beside it
(:func:`save_per_user`).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import pandas as pd

from eimf import fs, tracking
from eimf.config import Config, ConfigError, eimf_home
from eimf.evaluation import most_popular
from eimf.experiments.tables import TABLE_METRICS, append_row, read_rows
from eimf.experiments.variants import Variant, resolve_variant, with_overrides
from eimf.formats.prepared import load_prepared
from eimf.pipeline import Pipeline, Stage, backbone_stages, eimf_stages
from eimf.steps import evaluate

log = logging.getLogger(__name__)

#: Splits whose per-user metrics a grid keeps for paired comparisons (valid chooses settings, test reports).
PER_USER_SPLITS = ("valid", "test")


def scored_splits(cfg: Config) -> Tuple[str, ...]:
    """The splits a run's final model is scored on: valid only while settings are being chosen
    (``eval.score_test=false``), so the test split is read once, by the final configuration."""
    return PER_USER_SPLITS if cfg.eval.score_test else ("valid",)


def save_per_user(export_dir: str, data_path: Optional[str], out_dir: Path, name: str,
                  splits: Sequence[str] = PER_USER_SPLITS) -> Dict[str, str]:
    """Each user's metrics of an exported model on ``splits``, through the evaluate step, as
    ``<out_dir>/<name>/per_user.<split>.parquet`` (read back by :func:`eimf.experiments.tables.load_per_user`);
    returns ``{split: path}``. ``data_path`` None: the prepared dataset the model folder records."""
    got = evaluate.run(None, {"model_dir": export_dir, "data_path": data_path}, str(Path(out_dir) / name),
                       splits=tuple(splits), with_baseline=False, per_user=True, log_to_mlflow=False)
    return {split: got.outputs[f"per_user_{split}"] for split in splits}


def score_on_test(row: dict, data_path: Optional[str], per_user_dir: Path) -> dict:
    """A run scored on valid only (``eval.score_test=false``) whose configuration won there: its exported model
    scored on test now, without training again. Returns the row with ``test/*`` metrics and the test per-user
    table; it replaces the old one in the ``.jsonl`` (:func:`read_rows` keeps the last row of a run)."""
    if not row.get("export_dir") or not fs.exists(row["export_dir"]):
        raise FileNotFoundError(f"run {row.get('run')}: its export {row.get('export_dir')!r} is gone, so it cannot "
                                "be scored on test; train it again (remove its row from the .jsonl)")
    path = save_per_user(row["export_dir"], data_path, per_user_dir, row["run"], ("test",))["test"]
    table = pd.read_parquet(path)
    metrics = {**row["metrics"], **{f"test/{m}": float(table[m].mean()) for m in TABLE_METRICS},
               "test/n_users": len(table)}
    log.info("%s: scored on test after choosing it on valid, recall@50 %.4f", row["run"], metrics["test/recall@50"])
    return {**row, "metrics": metrics, "per_user": {**(row.get("per_user") or {}), "test": path},
            "test_scored_after_training": True}


def cell_config(base: Config, dataset: str, backbone: str, seed: int, first_seed: int, run_name: str,
                storage: Optional[str] = None) -> Config:
    """A grid cell's pipeline config: the grid's settings on ``dataset`` and ``backbone`` with ``train.seed``
    ``seed``; its warm-up is the backbone on ``first_seed`` for ``train.max_steps`` steps; its models are logged,
    not registered (unless a name is set); its evaluate stage scores :func:`scored_splits`."""
    cfg = copy.deepcopy(base)
    cfg.data.dataset, cfg.model.backbone = dataset, backbone
    cfg.train.seed, cfg.train.run_name = seed, None
    if cfg.tracking.registered_model is None:  # grid runs are compared, not deployed
        cfg.tracking.registered_model = ""
    p = cfg.pipeline
    p.run_name, p.storage_path = run_name, storage or p.storage_path
    p.warmup_steps, p.warmup_seed = cfg.train.max_steps, first_seed
    p.eval_splits = list(scored_splits(cfg))
    return cfg


def cell_stages(cfg: Config, variant: Variant) -> List[Stage]:
    """A cell's stages: the backbone alone (with the variant's overrides, e.g. ``text-init``), or the EIMF
    pipeline whose warm-up is ``cfg``'s (no variant override reaches it), annotated with the variant's
    ``semantic.*`` settings (and its overlay set merged in) and trained with its further overrides."""
    if not variant.eimf:
        return backbone_stages(with_overrides(cfg, variant.train))
    annotate = with_overrides(cfg, variant.annotation)
    overlay = with_overrides(cfg, variant.overlay) if variant.overlay is not None else None
    return eimf_stages(with_overrides(annotate, variant.train), warmup=cfg, annotate=annotate, overlay=overlay)


def run_cell(cfg: Config, stages: List[Stage], tags: Dict[str, str], per_user_dir: Optional[Path]) -> dict:
    """One cell's pipeline; the fields of its row (its trained model, metrics, annotations, per-user tables)."""
    p = Pipeline(cfg, stages, tags=tags)
    p.run()
    train = p.result("train")
    model_dir, data_path = train.outputs["model_dir"], p.outputs["prepare"]["data_path"]
    annotations = next((p.outputs[s]["annotations"] for s in ("merge", "annotate") if s in p.outputs), None)
    row = {"run": p.run_name, "mlflow_run_id": train.mlflow_run_id, "pipeline_run_id": p.parent_run_id,
           "export_dir": model_dir, "data_path": data_path, "annotations": annotations, "metrics": train.metrics}
    if per_user_dir is not None and not fs.is_s3(str(per_user_dir)):
        row["per_user"] = save_per_user(model_dir, data_path, per_user_dir, p.run_name, scored_splits(cfg))
    return row


def _check_same_overrides(raw_path: Path, rows: List[dict], datasets, models, seeds, overrides: list) -> None:
    """A grid resumes by skipping the cells already in its ``.jsonl``: a cell there from other settings would be
    skipped silently and mix two settings in one table, so that stops before anything runs."""
    wanted = {(d, m, s) for d in datasets for m in models for s in seeds}
    for r in rows:
        key = (r["dataset"], r["model"], r["seed"])
        if key in wanted and r.get("overrides") is not None and sorted(r["overrides"]) != sorted(overrides):
            raise ConfigError(f"{raw_path}: {key[0]} {key[1]} seed {key[2]} is there from a grid run with "
                              f"{' '.join(r['overrides']) or 'no overrides'}, not this grid's "
                              f"{' '.join(overrides) or 'no overrides'}: write to another --output, or remove "
                              "those rows to run them again")


def run_grid(base: Config, datasets: Iterable[str], models: Iterable[str], seeds: Iterable[int],
             raw_path: Path, overrides: Optional[list] = None, per_user_dir: Optional[Path] = None,
             grid_name: str = "backbones", out_dir: Optional[str] = None) -> List[dict]:
    """Every (dataset, model, seed) as a pipeline of the backbone alone (``<grid_name>-<dataset>-<model>-s<seed>``),
    MostPopular once per dataset; rows already in ``raw_path`` are not run again. With ``per_user_dir``, each
    run's per-user valid and test metrics go there (:func:`save_per_user`). ``out_dir``: the pipelines' storage
    (default ``pipeline.storage_path``)."""
    datasets, models, seeds = list(datasets), list(models), list(seeds)
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(raw_path)
    have = {(r["dataset"], r["model"], r["seed"]) for r in rows}
    _check_same_overrides(raw_path, rows, datasets, models, seeds, overrides or [])
    for dataset in datasets:
        if (dataset, "mostpop", 0) not in have and base.eval.score_test:
            cfg = cell_config(base, dataset, models[0], seeds[0], seeds[0], f"{grid_name}-{dataset}-prepare", out_dir)
            p = Pipeline(cfg, [Stage("prepare", "prepare", cfg)])
            p.run()
            data = load_prepared(p.outputs["prepare"]["data_path"])
            m = most_popular(data.train, data.test, topk=tuple(base.eval.topk))
            row = {"dataset": dataset, "model": "mostpop", "seed": 0, "metrics": {f"test/{k}": v for k, v in m.items()}}
            rows.append(row)
            append_row(raw_path, row)
    # Seeds outermost: a grid cut short still covers every (dataset, model) pair.
    for seed in seeds:
        for dataset in datasets:
            for model in models:
                if (dataset, model, seed) in have:
                    continue
                cfg = cell_config(base, dataset, model, seed, seeds[0], f"{grid_name}-{dataset}-{model}-s{seed}",
                                  out_dir)
                got = run_cell(cfg, backbone_stages(cfg), {"grid": grid_name, "seed": str(seed)}, per_user_dir)
                row = {"dataset": dataset, "model": model, "seed": seed, "overrides": overrides or [], **got}
                rows.append(row)
                append_row(raw_path, row)
                log.info("%s %s seed %d: test recall@50 %.4f", dataset, model, seed,
                         got["metrics"].get("test/recall@50", float("nan")))
    return rows


def run_eimf_grid(base: Config, datasets: Sequence[str], backbones: Sequence[str], seeds: Sequence[int],
                  variants: Sequence[str], raw_path: Path, grid_name: str, out_dir: Optional[str] = None,
                  per_user_dir: Optional[Path] = None) -> List[dict]:
    """Every (dataset, backbone, seed, variant) as a pipeline whose MLflow run is a child of one parent run
    ``grid_name`` (see the module doc for what the cells share). ``out_dir``: the pipelines' storage (default
    ``pipeline.storage_path``, as ``jobs/pipeline.py``: then a pipeline run there shares the grid's stages).
    Rows already in ``raw_path`` are not run again (a cut-short grid resumes; its interrupted pipeline resumes
    its stage). Each run's per-user tables go to ``per_user_dir`` (default ``<out_dir>/per_user``, else
    ``<EIMF_HOME>/experiments/<grid_name>/per_user``) on the splits of :func:`scored_splits`. ``variants`` are
    names of :data:`eimf.experiments.variants.VARIANTS` or specs ``name[key=value,...]`` (:func:`resolve_variant`).
    """
    resolved = {v: resolve_variant(v) for v in ["backbone", *variants]}  # the backbone: at least the warm-up
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    per_user_dir = Path(per_user_dir or Path(out_dir or Path(eimf_home()) / "experiments" / grid_name) / "per_user")
    rows = read_rows(raw_path)
    have = {(r["dataset"], r["model"], r.get("variant", "backbone"), r["seed"]): r for r in rows}
    parent = tracking.start_run(base, grid_name, tags={"kind": "experiment-grid", "variants": ",".join(variants)})
    uri = tracking.tracking_uri(base)
    child = {"mlflow.parentRunId": parent, "grid": grid_name} if parent else {"grid": grid_name}

    def record(row: dict) -> None:
        key = (row["dataset"], row["model"], row["variant"], row["seed"])
        if key in have:  # scored on test later: the new row replaces the old
            rows.remove(have[key])
        rows.append(row)
        have[key] = row
        append_row(raw_path, row)

    status = "FAILED"
    try:
        for dataset in datasets:
            for backbone in backbones:
                # Seeds outermost: a grid cut short still has every variant on its first seeds.
                for seed in seeds:
                    names = [v for v in variants if v != "backbone"]
                    if "backbone" in variants or seed == seeds[0]:  # the first seed's backbone is the warm-up
                        names.insert(0, "backbone")
                    for name in names:
                        variant = resolved[name]
                        done = have.get((dataset, backbone, name, seed))
                        if done is not None:
                            if base.eval.score_test and "test/recall@50" not in done["metrics"]:
                                record(score_on_test(done, done.get("data_path"), per_user_dir))
                            continue
                        cfg = cell_config(base, dataset, backbone, seed, seeds[0],
                                          f"{grid_name}-{dataset}-{backbone}-{name}-s{seed}", out_dir)
                        got = run_cell(cfg, cell_stages(cfg, variant),
                                       {**child, "variant": name, "seed": str(seed)}, per_user_dir)
                        record({"dataset": dataset, "model": backbone, "variant": name, "seed": seed,
                                "overrides": list(variant.annotation or ()) + list(variant.train), **got})
                        log.info("%s %s %s seed %d: test recall@50 %.4f", dataset, backbone, name, seed,
                                 got["metrics"].get("test/recall@50", float("nan")))
        status = "FINISHED"
    finally:
        tracking.end_run(uri, parent, status=status)
    return rows


__all__ = ["PER_USER_SPLITS", "cell_config", "cell_stages", "run_cell", "run_eimf_grid", "run_grid",
           "save_per_user", "score_on_test", "scored_splits"]
