"""The EIMF pipeline: one config, six stages, each with its outputs and a manifest under the run's storage path.

    prepare   ingest + validate + k-core + split                          (eimf/steps/prepare.py)
    warmup    IBIM warm-up: the backbone alone, ``pipeline.warmup_steps``  (eimf/steps/train.py)
    annotate  typical users of the warm-up model + annotator + encoder     (eimf/steps/annotate.py)
    train     EIMF training with the annotations                          (eimf/steps/train.py)
    evaluate  the exported model on ``pipeline.eval_splits``, MostPopular  (eimf/steps/evaluate.py)
    export    the final model folder ``<root>/export/model``               (eimf/steps/export.py)

This module is the engine around the steps: the plan, fingerprints, manifests, skip and resume, the parent
MLflow run and the summary. :meth:`Pipeline.run` reads as the ordered step calls.

Layout: ``<pipeline.storage_path>/<pipeline.run_name>/<stage>/`` (local or ``s3://``), each holding its
outputs and ``manifest.json`` (stage, status, fingerprint, input fingerprints, config subset, outputs, wall
time, key metrics, MLflow run, code version). ``<root>/summary.json`` and ``summary.md`` hold the table of the
last invocation.

**Fingerprints.** A stage's fingerprint is a SHA-256 of its name, :data:`PIPELINE_VERSION`, the config fields
that change its output, the fingerprints of the stages it reads, and the versions of formats it depends on:
``prepare`` takes the prepared-data fingerprint of :mod:`eimf.data.preprocess` (input files' names, sizes and
mtimes, parser settings, preprocessing fields and version); ``annotate`` adds the prompt template version.
Fields that change only where or how fast a stage runs (storage paths, run names, the annotation cache folder
and chunk size, engine concurrency, time-outs) are left out: they carry ``operational`` metadata in
eimf/config.py (:func:`eimf.config.operational_fields`). The git commit is recorded in every manifest and MLflow run but not hashed:
a documentation commit would otherwise retrain everything. All fingerprints are known before anything runs
(:meth:`Pipeline.plan`).

**Skip, rerun, resume.** A stage is skipped when its manifest says ``completed`` with the same fingerprint and
every output it lists exists. A changed config changes that stage's fingerprint and, through the input
fingerprints, every stage downstream, so they run again. An interrupted stage (manifest ``running``, or no
manifest) runs again under the same names, so it resumes: the training stages use the Ray Train run
``<run>-<stage>-<fingerprint[:8]>`` under the stage folder (its last checkpoint is picked up), the annotation
stage keeps its per-prompt cache in ``annotate/cache`` (unless ``semantic.cache_dir`` is set), so finished
prompts are not sent again. A changed fingerprint gives a new Ray Train run name: never a resume of another
config's checkpoint.

**MLflow.** One parent run named after the pipeline run (tag ``stage=pipeline``); each stage that runs is a
child run (tag ``mlflow.parentRunId``), the training and annotation stages through their own run code with
the parent passed as a tag. At the end the parent gets each stage's seconds and the final model's metrics, and
the summary table as ``pipeline_summary.json`` (an MLflow table) and ``pipeline_summary.md``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import eimf.steps.annotate
import eimf.steps.evaluate
import eimf.steps.export
import eimf.steps.prepare
import eimf.steps.train  # noqa: F401  (steps.<name>.run below)
from eimf import fs, steps, tracking
from eimf.config import Config, ConfigError, eimf_home, operational_fields, to_dict
from eimf.steps import StepOutput
from eimf.steps.train import eimf_train_config

log = logging.getLogger(__name__)

#: Bump when a stage's outputs change for the same config and inputs: every fingerprint changes with it.
PIPELINE_VERSION = 1
STAGES = ("prepare", "warmup", "annotate", "train", "evaluate", "export")
#: The stages whose fingerprints (and outputs) each stage takes.
INPUTS: Dict[str, Tuple[str, ...]] = {
    "prepare": (), "warmup": ("prepare",), "annotate": ("warmup",), "train": ("prepare", "annotate"),
    "evaluate": ("train",), "export": ("train", "evaluate"),
}
#: Stages that need Ray (evaluate and export do not).
RAY_STAGES = ("prepare", "warmup", "annotate", "train")
MANIFEST = "manifest.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
#: Metrics shown in the one-line summary of a stage.
SUMMARY_KEYS = ("users_out", "items_out", "best_valid/recall@50", "test/recall@50", "resumes", "selected",
                "prompts", "cache_hits", "valid_share", "test/ndcg@50", "test/mostpop/recall@50")

#: A pipeline setting that cannot work (kept as a name: the config's own checks raise the same class).
PipelineError = ConfigError


def fingerprint(stage: str, config: dict, inputs: Dict[str, str], versions: Optional[dict] = None) -> str:
    payload = {"stage": stage, "pipeline_version": PIPELINE_VERSION, "config": config, "inputs": inputs,
               "versions": versions or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def data_fingerprint(data_cfg) -> str:
    """The prepared-data fingerprint :func:`eimf.data.preprocess.prepare` gives ``data_cfg`` (inputs + config)."""
    from eimf.data.datasets import resolve_inputs
    from eimf.data.preprocess import fingerprint as prepared_fingerprint
    from eimf.data.preprocess import input_infos

    inputs = resolve_inputs(data_cfg)
    return prepared_fingerprint(data_cfg, inputs, input_infos(inputs))


def _without(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def training_config(cfg: Config, max_steps: Optional[int] = None, eimf: bool = False) -> dict:
    """The config subset a training run's output depends on (operational fields left out)."""
    d = to_dict(cfg)
    train = dataclasses.asdict(eimf_train_config(cfg.train)[0]) if eimf else d["train"]
    train = _without(train, operational_fields(cfg.train))
    if max_steps is not None:
        train["max_steps"] = max_steps
    out = {"model": d["model"], "negatives": d["negatives"], "eval": _without(d["eval"], operational_fields(cfg.eval)),
           "retrieval": d["retrieval"], "train": train}
    if eimf:
        out["eimf"] = _without(d["eimf"], ("enabled", "annotations"))
    return out


def annotation_config(cfg: Config) -> Tuple[dict, dict]:
    """``(config subset, versions)`` an annotation set depends on (with the warm-up model's fingerprint)."""
    from eimf.semantic.prompts import PROMPT_VERSION

    return ({"semantic": _without(to_dict(cfg)["semantic"], operational_fields(cfg.semantic))},
            {"prompt": PROMPT_VERSION})


def stage_config(cfg: Config, stage: str, data_fp: Optional[str] = None) -> Tuple[dict, dict]:
    """``(config subset, versions)`` that a stage's output depends on (see the module doc)."""
    if stage == "prepare":
        return {"data_fingerprint": data_fp or data_fingerprint(cfg.data)}, {}
    if stage == "warmup":
        return training_config(cfg, max_steps=cfg.pipeline.warmup_steps), {}
    if stage == "annotate":
        return annotation_config(cfg)
    if stage == "train":
        return training_config(cfg, eimf=True), {}
    if stage == "evaluate":
        return {"splits": list(cfg.pipeline.eval_splits), "retrieval": to_dict(cfg)["retrieval"]}, {}
    if stage == "export":
        return {"log_model": cfg.tracking.log_model, "registered_model": cfg.tracking.registered_model}, {}
    raise PipelineError(f"unknown pipeline stage {stage!r} (stages: {', '.join(STAGES)})")


@dataclass
class StagePlan:
    name: str
    fingerprint: str
    inputs: Dict[str, str]
    config: dict
    versions: dict
    dir: str
    skip: bool
    reason: str
    previous: Optional[dict] = None


@dataclass
class StageResult:
    stage: str
    #: ran | skipped | failed
    status: str
    seconds: float
    fingerprint: str
    outputs: Dict[str, str] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: Optional[str] = None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ------------------------------------------------------------------------------------- manifests, skip, run
def read_manifest(stage_dir: str) -> Optional[dict]:
    path = fs.join(stage_dir, MANIFEST)
    if not fs.exists(path):
        return None
    try:
        return fs.read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("pipeline: unreadable manifest %s (%s); the stage runs again", path, e)
        return None


def skip_reason(previous: Optional[dict], fp: str) -> Tuple[bool, str]:
    """``(skip, why)`` for a stage whose fingerprint is ``fp`` and whose last manifest is ``previous``."""
    if previous is None:
        return False, "not run yet"
    if previous.get("fingerprint") != fp:
        return False, "config or inputs changed"
    if previous.get("status") != "completed":
        return False, f"interrupted ({previous.get('status')}): resuming"
    missing = [p for p in (previous.get("outputs") or {}).values() if not fs.exists(p)]
    if missing:
        return False, f"outputs missing: {', '.join(missing)}"
    return True, "unchanged, outputs present"


def plan_stage(name: str, config: dict, inputs: Dict[str, str], versions: dict, stage_dir: str) -> StagePlan:
    """A stage's fingerprint, and whether the manifest in ``stage_dir`` lets it be skipped."""
    fp = fingerprint(name, config, inputs, versions)
    previous = read_manifest(stage_dir)
    skip, reason = skip_reason(previous, fp)
    return StagePlan(name, fp, inputs, config, versions, stage_dir, skip, reason, previous)


def write_manifest(sp: StagePlan, status: str, attempt: int, started: str, owner: str = "", **extra) -> None:
    fs.makedirs(sp.dir)
    fs.write_json(fs.join(sp.dir, MANIFEST), {
        "stage": sp.name, "pipeline_run": owner, "status": status, "fingerprint": sp.fingerprint,
        "inputs": sp.inputs, "config": sp.config, "versions": sp.versions, "pipeline_version": PIPELINE_VERSION,
        "code_version": tracking.code_version(), "attempt": attempt, "started_utc": started, **extra})


def run_planned(sp: StagePlan, call: Callable[[], StepOutput], owner: str = "") -> Tuple[StageResult, dict]:
    """Run a planned stage unless its manifest lets it be skipped; ``(result, info)``. The manifest says
    ``running`` while it runs, then ``completed`` with outputs and metrics, or ``failed`` (and the error is
    raised). Used by :class:`Pipeline` for its stages and by the grids for their annotation sets."""
    prev = sp.previous or {}
    if sp.skip:
        outputs = dict(prev.get("outputs") or {})
        return (StageResult(sp.name, "skipped", 0.0, sp.fingerprint, outputs, dict(prev.get("metrics") or {}),
                            prev.get("mlflow_run_id")), dict(prev.get("info") or {}))
    attempt = int(prev.get("attempt", 0)) + 1 if prev.get("fingerprint") == sp.fingerprint else 1
    started = _now()
    write_manifest(sp, "running", attempt, started, owner)
    t0 = time.perf_counter()
    try:
        got = call()
    except BaseException as e:  # KeyboardInterrupt too: the manifest says where it stopped
        write_manifest(sp, "failed", attempt, started, owner, error=f"{type(e).__name__}: {e}"[:2000],
                       wall_seconds=round(time.perf_counter() - t0, 3))
        raise
    secs = time.perf_counter() - t0
    write_manifest(sp, "completed", attempt, started, owner, finished_utc=_now(), wall_seconds=round(secs, 3),
                   outputs=got.outputs, metrics=got.metrics, mlflow_run_id=got.mlflow_run_id, info=got.info)
    return StageResult(sp.name, "ran", secs, sp.fingerprint, got.outputs, got.metrics, got.mlflow_run_id), got.info


class StageFailed(Exception):
    """Raised inside :meth:`Pipeline.run` after a stage failed (the original error is re-raised at the end)."""


class Pipeline:
    """``Pipeline(cfg).run()``; see the module doc."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        p = cfg.pipeline
        self.run_name = p.run_name or (
            f"pipeline-{cfg.data.dataset}-{cfg.model.backbone}-{time.strftime('%Y%m%d-%H%M%S')}")
        storage = p.storage_path or cfg.train.storage_path or os.path.join(eimf_home(), "pipelines")
        self.storage = storage.rstrip("/") if fs.is_s3(storage) else os.path.abspath(os.path.expanduser(storage))
        self.root = fs.join(self.storage, self.run_name)
        self.uri = tracking.tracking_uri(cfg)
        self.parent_run_id: Optional[str] = None
        self.results: List[StageResult] = []
        self._plans: Dict[str, StagePlan] = {}
        for what, where in (("pipeline outputs", self.storage), ("MLflow store", self.uri)):
            if "working_dir_files" in where:  # a relative EIMF_HOME inside `ray job submit --working-dir`
                log.warning("%s in %s: that is the Ray job's temporary copy of the working dir; set EIMF_HOME (e.g. "
                            "--runtime-env-json '{\"env_vars\": {\"EIMF_HOME\": \"/abs/path\"}}') or "
                            "pipeline.storage_path / tracking.tracking_uri", what, where)

    # ------------------------------------------------------------------------------------------ layout
    def stage_dir(self, stage: str) -> str:
        return fs.join(self.root, stage)

    def read_manifest(self, stage: str) -> Optional[dict]:
        return read_manifest(self.stage_dir(stage))

    def stage_run_name(self, stage: str, fp: str) -> str:
        """MLflow run (and, for training stages, Ray Train run) of a stage: same fingerprint, same name."""
        return f"{self.run_name}-{stage}-{fp[:8]}"

    # -------------------------------------------------------------------------------------------- plan
    def plan(self) -> List[StagePlan]:
        """Every stage's fingerprint and skip decision, before anything runs (the data fingerprint once)."""
        fps: Dict[str, str] = {}
        plans = []
        data_fp = data_fingerprint(self.cfg.data)
        for stage in STAGES:
            config, versions = stage_config(self.cfg, stage, data_fp)
            sp = plan_stage(stage, config, {u: fps[u] for u in INPUTS[stage]}, versions, self.stage_dir(stage))
            fps[stage] = sp.fingerprint
            plans.append(sp)
        return plans

    # --------------------------------------------------------------------------------------------- run
    def run(self) -> List[StageResult]:
        """The six steps in order, each skipped when its manifest allows (see the module doc)."""
        from eimf.data.datasets import ensure_dataset

        ensure_dataset(self.cfg.data)  # a missing built-in dataset is downloaded before its fingerprint is taken
        plans = self.plan()
        self._plans = {p.name: p for p in plans}
        log.info("pipeline %s in %s: %s", self.run_name, self.root,
                 ", ".join(f"{p.name}={'skip' if p.skip else 'run'}" for p in plans))
        if any(not p.skip and p.name in RAY_STAGES for p in plans):
            from eimf.ray_init import init_ray

            init_ray()  # RAY_ADDRESS (ray job submit) joins the cluster; otherwise a local Ray
        self.parent_run_id = tracking.start_run(
            self.cfg, self.run_name, tags={"stage": "pipeline", "eimf.pipeline": self.run_name, "pipeline.root": self.root})
        c, t_all, failed = self.cfg, time.perf_counter(), None
        # training stages only log their models: the export stage registers the pipeline's final one
        c_log = dataclasses.replace(c, tracking=dataclasses.replace(c.tracking, registered_model=""))
        warmup_cfg = dataclasses.replace(c_log, train=dataclasses.replace(c.train, max_steps=c.pipeline.warmup_steps))
        try:
            data = self.step("prepare", steps.prepare.run, c,
                             {"data_fingerprint": self._plans["prepare"].config["data_fingerprint"]})
            warm = self.step("warmup", steps.train.run, warmup_cfg, {"data_path": data["data_path"]})
            ann = self.step("annotate", steps.annotate.run, self.annotate_config(),
                            {"model_dir": warm["model_dir"]}, out_dir=fs.join(self.stage_dir("annotate"), "annotations"))
            model = self.step("train", steps.train.run, c_log,
                              {"data_path": data["data_path"], "annotations": ann["annotations"]})
            scores = self.step("evaluate", steps.evaluate.run, c, {"model_dir": model["model_dir"]},
                               splits=tuple(c.pipeline.eval_splits))
            self.step("export", steps.export.run, c, {"model_dir": model["model_dir"], "metrics": scores["metrics"]},
                      lineage=self.lineage(plans))
        except StageFailed as e:
            failed = e.__cause__
        self._finish(self.results, time.perf_counter() - t_all, failed)
        if failed is not None:
            raise failed
        return self.results

    def annotate_config(self) -> Config:
        """The annotation cache lives in the stage folder unless ``semantic.cache_dir`` is set."""
        sem = self.cfg.semantic
        cache_dir = sem.cache_dir or fs.join(self.stage_dir("annotate"), "cache")
        return dataclasses.replace(self.cfg, semantic=dataclasses.replace(sem, cache_dir=cache_dir))

    def lineage(self, plans: List[StagePlan]) -> dict:
        return {"pipeline_run": self.run_name, "root": self.root,
                "stages": {p.name: {"fingerprint": p.fingerprint, "dir": p.dir} for p in plans}}

    def child_tags(self, sp: StagePlan) -> Dict[str, str]:
        tags = {"stage": sp.name, "eimf.pipeline": self.run_name, "pipeline.fingerprint": sp.fingerprint,
                "pipeline.stage_dir": sp.dir}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags

    def step(self, stage: str, fn: Callable[..., StepOutput], cfg: Config, inputs: dict,
             out_dir: Optional[str] = None, **kwargs) -> Dict[str, str]:
        """Run (or skip) one stage through ``fn(cfg, inputs, out_dir, tags, run_name, **kwargs)``; its outputs."""
        sp = self._plans[stage]
        i, n = STAGES.index(stage) + 1, len(STAGES)
        if sp.skip:
            log.info("[pipeline %s] stage %d/%d %s: skipped (%s; fingerprint %s)", self.run_name, i, n, stage,
                     sp.reason, sp.fingerprint[:12])
        else:
            log.info("[pipeline %s] stage %d/%d %s: running (%s; fingerprint %s) -> %s", self.run_name, i, n,
                     stage, sp.reason, sp.fingerprint[:12], sp.dir)
        t0 = time.perf_counter()
        try:
            result, _ = run_planned(sp, lambda: fn(cfg, inputs, out_dir or sp.dir, self.child_tags(sp),
                                                   self.stage_run_name(stage, sp.fingerprint), **kwargs),
                                    owner=self.run_name)
        except BaseException as e:
            secs = time.perf_counter() - t0
            log.error("[pipeline %s] stage %d/%d %s: failed after %.1f s: %s", self.run_name, i, n, stage, secs, e)
            self.results.append(StageResult(stage, "failed", secs, sp.fingerprint))
            raise StageFailed(stage) from e
        self.results.append(result)
        if result.status == "ran":
            log.info("[pipeline %s] stage %d/%d %s: done in %.1f s (%s)", self.run_name, i, n, stage,
                     result.seconds, ", ".join(f"{k}={_fmt(v)}" for k, v in result.metrics.items()
                                               if k in SUMMARY_KEYS) or "no metrics")
        return result.outputs

    # ----------------------------------------------------------------------------------------- summary
    def summary_rows(self, results: List[StageResult]) -> List[dict]:
        return [{"stage": r.stage, "status": r.status, "seconds": round(r.seconds, 1),
                 "fingerprint": r.fingerprint[:12],
                 "outputs": "; ".join(f"{k}={v}" for k, v in r.outputs.items()),
                 "metrics": ", ".join(f"{k}={_fmt(v)}" for k, v in r.metrics.items() if k in SUMMARY_KEYS),
                 "mlflow_run_id": r.mlflow_run_id or ""} for r in results]

    @staticmethod
    def format_table(rows: List[dict], columns=("stage", "status", "seconds", "fingerprint", "metrics",
                                                "outputs")) -> str:
        """A Markdown table (readable as plain text too)."""
        cells = [[str(r[c]) for c in columns] for r in rows]
        widths = [max([len(c)] + [len(row[j]) for row in cells]) for j, c in enumerate(columns)]
        line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
        return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])

    def _finish(self, results: List[StageResult], total: float, failed: Optional[BaseException]) -> None:
        rows = self.summary_rows(results)
        table = self.format_table(rows)
        status = "failed" if failed is not None else "completed"
        summary = {"pipeline_run": self.run_name, "root": self.root, "status": status, "finished_utc": _now(),
                   "seconds": round(total, 1), "code_version": tracking.code_version(),
                   "mlflow_run_id": self.parent_run_id,
                   "stages": [dataclasses.asdict(r) for r in results]}
        md = f"# pipeline {self.run_name}: {status} in {total:.1f} s\n\nroot: {self.root}\n\n{table}\n"
        fs.write_json(fs.join(self.root, SUMMARY_JSON), summary)
        fs.write_text(fs.join(self.root, SUMMARY_MD), md)
        print(f"\npipeline {self.run_name}: {status} in {total:.1f} s ({self.root})\n{table}\n", flush=True)
        run_id = self.parent_run_id
        if run_id:
            c = tracking.client(self.uri)
            metrics = {f"pipeline/{r.stage}_seconds": r.seconds for r in results}
            metrics.update({f"pipeline/{r.stage}_ran": float(r.status == "ran") for r in results})
            metrics["pipeline/seconds"] = total
            final = next((r.metrics for r in results if r.stage == "evaluate" and r.metrics), {})
            metrics.update(final)
            tracking.log_metrics(self.uri, run_id, metrics, step=0)
            # MLflow appends to an existing table: one block of rows per invocation, told apart by "finished".
            table_rows = [{"finished_utc": summary["finished_utc"], **r} for r in rows]
            if table_rows:
                c.log_table(run_id, {k: [r[k] for r in table_rows] for k in table_rows[0]}, "pipeline_summary.json")
            c.log_text(run_id, md, "pipeline_summary.md")
            if results and results[-1].stage == "export" and results[-1].status != "failed":
                c.set_tag(run_id, "pipeline.model_dir", results[-1].outputs.get("model_dir", ""))
            tracking.end_run(self.uri, run_id, status="FAILED" if failed is not None else "FINISHED")
