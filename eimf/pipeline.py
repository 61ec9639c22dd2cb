"""The EIMF pipeline: one config, six stages, each with its outputs and a manifest under the run's storage path.

    prepare   ingest + validate + k-core + split (:func:`eimf.data.preprocess.prepare`)
    warmup    IBIM warm-up: the backbone alone (``eimf.enabled=false``, ``pipeline.warmup_steps`` steps)
    annotate  typical users of the warm-up model (k-means) + the annotator ``semantic.annotator`` + encoder
              (:func:`eimf.semantic.run.run_annotation`)
    train     EIMF training with the annotations (``eimf.enabled=true``; memory input: see
              :func:`eimf_train_config`)
    evaluate  the exported model on ``pipeline.eval_splits``, MostPopular beside it (no Ray, no LLM)
    export    the final model folder ``<root>/export/model`` (weights, config, EIMF head, evaluation, lineage)

Layout: ``<pipeline.storage_path>/<pipeline.run_name>/<stage>/`` (local or ``s3://``), each holding its
outputs and ``manifest.json`` (stage, status, fingerprint, input fingerprints, config subset, outputs, wall
time, key metrics, MLflow run, code version). ``<root>/summary.json`` and ``summary.md`` hold the table of the
last invocation.

**Fingerprints.** A stage's fingerprint is a SHA-256 of its name, :data:`PIPELINE_VERSION`, the config fields
that change its output, the fingerprints of the stages it reads, and the versions of formats it depends on:
``prepare`` takes the prepared-data fingerprint of :mod:`eimf.data.preprocess` (input files' names, sizes and
mtimes, parser settings, preprocessing fields and version); ``annotate`` adds the prompt template version.
Fields that change only where or how fast a stage runs (storage paths, run names, the annotation cache folder
and chunk size, engine concurrency, time-outs) are left out (:data:`TRAIN_OPERATIONAL`,
:data:`SEMANTIC_OPERATIONAL`). The git commit is recorded in every manifest and MLflow run but not hashed:
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

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from eimf import fs, tracking
from eimf.config import Config, eimf_home, to_dict

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
#: ``train.*`` fields that change where a run goes or how it survives failures, not the model.
TRAIN_OPERATIONAL = ("storage_path", "run_name", "max_failures", "log_every")
#: ``semantic.*`` fields that change where the cache is and how fast prompts go, not the answers.
SEMANTIC_OPERATIONAL = ("cache_dir", "chunk_size", "vllm_timeout_s", "vllm_concurrency", "vllm_batch_size",
                        "vllm_max_num_seqs", "max_concurrency", "request_timeout_s", "request_retries",
                        "backoff_initial_s", "backoff_max_s", "encoder_batch_size")
#: Training metrics a training stage keeps in its manifest and the summary (besides best_valid/* and test/*).
TRAIN_KEYS = ("step", "best_step", "train_seconds", "examples_per_s", "resumes", "first_resume_step")
ANNOTATE_KEYS = ("users", "selected", "prompts", "cache_hits", "failures", "valid_share", "tokens_out", "wall_s")
#: Metrics shown in the one-line summary of a stage.
SUMMARY_KEYS = ("users_out", "items_out", "best_valid/recall@50", "test/recall@50", "resumes", "selected",
                "prompts", "cache_hits", "valid_share", "test/ndcg@50", "test/mostpop/recall@50")


class PipelineError(ValueError):
    """A pipeline setting that cannot work; the message names the field."""


def fingerprint(stage: str, config: dict, inputs: Dict[str, str], versions: Optional[dict] = None) -> str:
    payload = {"stage": stage, "pipeline_version": PIPELINE_VERSION, "config": config, "inputs": inputs,
               "versions": versions or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def data_fingerprint(data_cfg) -> str:
    """The prepared-data fingerprint :func:`eimf.data.preprocess.prepare` gives ``data_cfg`` (inputs + config)."""
    from eimf.data.datasets import resolve_inputs
    from eimf.data.preprocess import input_infos
    from eimf.data.preprocess import fingerprint as prepared_fingerprint

    inputs = resolve_inputs(data_cfg)
    return prepared_fingerprint(data_cfg, inputs, input_infos(inputs))


def eimf_train_config(train_cfg):
    """``(train config of the EIMF stage, note or None)``. EIMF training reads ``train.input=memory`` (the Ray
    Data cut carries no semantic vectors); workers, strategy and ZeRO stage stay as given (the DeepSpeed runner
    trains the EIMF head replicated beside the engine). A changed input is said in the log and the manifest."""
    t = train_cfg
    if t.input == "memory":
        return t, None
    return (dataclasses.replace(t, input="memory"),
            f"train.input {t.input} -> memory (the Ray Data cut carries no semantic vectors)")


def _without(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def stage_config(cfg: Config, stage: str) -> Tuple[dict, dict]:
    """``(config subset, versions)`` that a stage's output depends on (see the module doc)."""
    d = to_dict(cfg)
    train = _without(d["train"], TRAIN_OPERATIONAL)
    if stage == "prepare":
        return {"data_fingerprint": data_fingerprint(cfg.data)}, {}
    if stage == "warmup":
        return {"model": d["model"], "negatives": d["negatives"], "eval": d["eval"], "retrieval": d["retrieval"],
                "train": {**train, "max_steps": cfg.pipeline.warmup_steps}}, {}
    if stage == "annotate":
        from eimf.semantic.prompts import PROMPT_VERSION

        return {"semantic": _without(d["semantic"], SEMANTIC_OPERATIONAL)}, {"prompt": PROMPT_VERSION}
    if stage == "train":
        effective = _without(dataclasses.asdict(eimf_train_config(cfg.train)[0]), TRAIN_OPERATIONAL)
        return {"model": d["model"], "negatives": d["negatives"], "eval": d["eval"], "retrieval": d["retrieval"],
                "train": effective, "eimf": _without(d["eimf"], ("enabled", "annotations"))}, {}
    if stage == "evaluate":
        return {"splits": list(cfg.pipeline.eval_splits), "retrieval": d["retrieval"]}, {}
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


def _numbers(d: dict) -> Dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def _train_metrics(metrics: dict) -> Dict[str, float]:
    keep = {k: metrics[k] for k in TRAIN_KEYS if k in metrics}
    keep.update({k: v for k, v in metrics.items() if k.startswith(("best_valid/", "test/"))})
    return _numbers(keep)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Pipeline:
    """``Pipeline(cfg).run()``; see the module doc."""

    def __init__(self, cfg: Config):
        p = cfg.pipeline
        if p.warmup_steps < 1:
            raise PipelineError(f"pipeline.warmup_steps must be >= 1, got {p.warmup_steps}")
        bad = [s for s in p.eval_splits if s not in ("valid", "test")]
        if bad or not p.eval_splits:
            raise PipelineError(f"pipeline.eval_splits must be a non-empty list of valid/test, got {p.eval_splits}")
        if p.run_name is not None and (not p.run_name.strip() or "/" in p.run_name):
            raise PipelineError(f"pipeline.run_name must be a non-empty name without '/', got {p.run_name!r}")
        self.cfg = cfg
        self.run_name = p.run_name or (
            f"pipeline-{cfg.data.dataset}-{cfg.model.backbone}-{time.strftime('%Y%m%d-%H%M%S')}")
        storage = p.storage_path or cfg.train.storage_path or os.path.join(eimf_home(), "pipelines")
        self.storage = storage.rstrip("/") if fs.is_s3(storage) else os.path.abspath(os.path.expanduser(storage))
        self.root = fs.join(self.storage, self.run_name)
        self.uri = tracking.tracking_uri(cfg)
        self.parent_run_id: Optional[str] = None
        for what, where in (("pipeline outputs", self.storage), ("MLflow store", self.uri)):
            if "working_dir_files" in where:  # a relative EIMF_HOME inside `ray job submit --working-dir`
                log.warning("%s in %s: that is the Ray job's temporary copy of the working dir; set EIMF_HOME (e.g. "
                            "--runtime-env-json '{\"env_vars\": {\"EIMF_HOME\": \"/abs/path\"}}') or "
                            "pipeline.storage_path / tracking.tracking_uri", what, where)

    # ------------------------------------------------------------------------------------------ layout
    def stage_dir(self, stage: str) -> str:
        return fs.join(self.root, stage)

    def manifest_path(self, stage: str) -> str:
        return fs.join(self.stage_dir(stage), MANIFEST)

    def read_manifest(self, stage: str) -> Optional[dict]:
        path = self.manifest_path(stage)
        if not fs.exists(path):
            return None
        try:
            return fs.read_json(path)
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("pipeline: unreadable manifest %s (%s); the stage runs again", path, e)
            return None

    def stage_run_name(self, stage: str, fp: str) -> str:
        """MLflow run (and, for training stages, Ray Train run) of a stage: same fingerprint, same name."""
        return f"{self.run_name}-{stage}-{fp[:8]}"

    def data_cfg(self):
        """``cfg.data``, writing the prepared data under ``<root>/prepare`` unless data.output_dir is set."""
        d = self.cfg.data
        return d if d.output_dir else dataclasses.replace(d, output_dir=self.stage_dir("prepare"))

    # -------------------------------------------------------------------------------------------- plan
    @staticmethod
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

    def plan(self) -> List[StagePlan]:
        fps: Dict[str, str] = {}
        plans = []
        for stage in STAGES:
            config, versions = stage_config(self.cfg, stage)
            inputs = {u: fps[u] for u in INPUTS[stage]}
            fp = fingerprint(stage, config, inputs, versions)
            fps[stage] = fp
            previous = self.read_manifest(stage)
            skip, reason = self.skip_reason(previous, fp)
            plans.append(StagePlan(stage, fp, inputs, config, versions, self.stage_dir(stage), skip, reason,
                                   previous))
        return plans

    # ------------------------------------------------------------------------------------------ MLflow
    def child_tags(self, sp: StagePlan) -> Dict[str, str]:
        tags = {"stage": sp.name, "eimf.pipeline": self.run_name, "pipeline.fingerprint": sp.fingerprint,
                "pipeline.stage_dir": sp.dir}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags

    @contextlib.contextmanager
    def child_run(self, sp: StagePlan) -> Iterator[Optional[str]]:
        """A child run for the stages that have no run of their own (prepare, evaluate, export)."""
        run_id = tracking.start_run(self.cfg, self.stage_run_name(sp.name, sp.fingerprint), tags=self.child_tags(sp))
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        finally:
            tracking.end_run(self.uri, run_id, status=status)

    # ------------------------------------------------------------------------------------------ stages
    def _run_prepare(self, sp: StagePlan, out: Dict[str, dict]):
        from eimf.data.preprocess import prepare

        with self.child_run(sp) as run_id:
            prepared = prepare(self.data_cfg())
            c = prepared.manifest.get("counts", {})
            metrics = _numbers({k: c[k] for k in ("rows_in", "rows_dropped", "users_out", "items_out",
                                                 "interactions_out", "train_users", "valid_users", "test_users")
                                if k in c})
            tracking.log_metrics(self.uri, run_id, {f"prepare/{k}": v for k, v in metrics.items()}, step=0)
            if run_id:
                tracking.client(self.uri).log_dict(run_id, prepared.manifest, "dataset_manifest.json")
                tracking.client(self.uri).set_tag(run_id, "dataset_fingerprint", prepared.manifest["fingerprint"])
        outputs = {"data_path": str(prepared.path), "dataset_manifest": fs.join(str(prepared.path), "manifest.json")}
        return outputs, metrics, run_id, {}

    def _train_stage(self, sp: StagePlan, cfg: Config, data_path: str):
        from eimf.training.runner import train

        # the export stage registers the pipeline's final model; the training stages only log theirs
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, registered_model=""))
        res = train(cfg, data_path=data_path, tags=self.child_tags(sp))
        outputs = {"model_dir": res.export_dir, "run_dir": fs.join(res.storage_path, res.run_name)}
        return outputs, _train_metrics(res.metrics), res.mlflow_run_id, {"train_run_name": res.run_name}

    def _run_warmup(self, sp: StagePlan, out: Dict[str, dict]):
        c = self.cfg
        cfg = dataclasses.replace(
            c, train=dataclasses.replace(c.train, max_steps=c.pipeline.warmup_steps, storage_path=sp.dir,
                                         run_name=self.stage_run_name(sp.name, sp.fingerprint)),
            eimf=dataclasses.replace(c.eimf, enabled=False, annotations=None))
        return self._train_stage(sp, cfg, out["prepare"]["data_path"])

    def _run_annotate(self, sp: StagePlan, out: Dict[str, dict]):
        from eimf.semantic.annotate import ANNOTATIONS_FILE, SELECTION_FILE, STATS_FILE
        from eimf.semantic.run import run_annotation

        sem = self.cfg.semantic
        cache_dir = sem.cache_dir or fs.join(sp.dir, "cache")
        cfg = dataclasses.replace(self.cfg, semantic=dataclasses.replace(sem, cache_dir=cache_dir))
        out_dir = fs.join(sp.dir, "annotations")
        res = run_annotation(cfg, model_dir=out["warmup"]["model_dir"], out_dir=out_dir,
                             run_name=self.stage_run_name(sp.name, sp.fingerprint), tags=self.child_tags(sp))
        outputs = {"annotations": fs.join(out_dir, ANNOTATIONS_FILE), "selection": fs.join(out_dir, SELECTION_FILE),
                   "stats": fs.join(out_dir, STATS_FILE)}
        metrics = _numbers({k: res.stats.get(k) for k in ANNOTATE_KEYS if res.stats.get(k) is not None})
        return outputs, metrics, res.mlflow_run_id, {"cache_dir": cache_dir, "annotator": sem.annotator,
                                                     "model": res.stats.get("model")}

    def _run_train(self, sp: StagePlan, out: Dict[str, dict]):
        c = self.cfg
        train_cfg, note = eimf_train_config(c.train)
        if note:
            log.warning("pipeline: EIMF training stage: %s; the warm-up used the train section as given", note)
        cfg = dataclasses.replace(
            c, train=dataclasses.replace(train_cfg, storage_path=sp.dir,
                                         run_name=self.stage_run_name(sp.name, sp.fingerprint)),
            eimf=dataclasses.replace(c.eimf, enabled=True, annotations=out["annotate"]["annotations"]))
        outputs, metrics, run_id, info = self._train_stage(sp, cfg, out["prepare"]["data_path"])
        if note:
            info["train_config_changed"] = note
        return outputs, metrics, run_id, info

    def _run_evaluate(self, sp: StagePlan, out: Dict[str, dict]):
        from eimf.evaluation.exported import evaluate_splits

        model_dir = out["train"]["model_dir"]
        with self.child_run(sp) as run_id:
            metrics = evaluate_splits(model_dir, self.cfg.pipeline.eval_splits, with_baseline=True)
            path = fs.join(sp.dir, "metrics.json")
            fs.write_json(path, metrics)
            tracking.log_metrics(self.uri, run_id, metrics, step=0)
        return {"metrics": path}, _numbers(metrics), run_id, {"model_dir": model_dir}

    def _run_export(self, sp: StagePlan, out: Dict[str, dict], plans: List[StagePlan]):
        final = fs.join(sp.dir, "model")
        with self.child_run(sp) as run_id, tempfile.TemporaryDirectory(prefix="eimf-export-") as tmp:
            fs.download_dir(out["train"]["model_dir"], tmp)
            metrics = fs.read_json(out["evaluate"]["metrics"])
            fs.write_json(os.path.join(tmp, "evaluation.json"), metrics)
            fs.write_json(os.path.join(tmp, "pipeline.json"), {
                "pipeline_run": self.run_name, "root": self.root, "code_version": tracking.code_version(),
                "stages": {p.name: {"fingerprint": p.fingerprint, "dir": p.dir} for p in plans},
                "source_model": out["train"]["model_dir"], "exported_utc": _now()})
            fs.upload_dir(tmp, final)
            tracking.log_artifacts(self.uri, run_id, tmp, "model")
            info = {}
            if run_id and self.cfg.tracking.log_model:
                from eimf.serving.pyfunc import log_recommender
                from eimf.training.runner import registered_model_name

                info["model_uri"] = log_recommender(tmp, self.uri, run_id, registered_model_name(self.cfg))
                tracking.client(self.uri).set_tag(run_id, "model_uri", info["model_uri"])
        return {"model_dir": final}, _numbers(metrics), run_id, info

    # --------------------------------------------------------------------------------------------- run
    def _write_manifest(self, sp: StagePlan, status: str, attempt: int, started: str, **extra) -> None:
        fs.makedirs(sp.dir)
        fs.write_json(self.manifest_path(sp.name), {
            "stage": sp.name, "pipeline_run": self.run_name, "status": status, "fingerprint": sp.fingerprint,
            "inputs": sp.inputs, "config": sp.config, "versions": sp.versions,
            "pipeline_version": PIPELINE_VERSION, "code_version": tracking.code_version(), "attempt": attempt,
            "started_utc": started, **extra})

    def run(self) -> List[StageResult]:
        plans = self.plan()
        n = len(plans)
        log.info("pipeline %s in %s: %s", self.run_name, self.root,
                 ", ".join(f"{p.name}={'skip' if p.skip else 'run'}" for p in plans))
        if any(not p.skip and p.name in RAY_STAGES for p in plans):
            from eimf.ray_init import init_ray

            init_ray()  # RAY_ADDRESS (ray job submit) joins the cluster; otherwise a local Ray
        self.parent_run_id = tracking.start_run(
            self.cfg, self.run_name, tags={"stage": "pipeline", "eimf.pipeline": self.run_name, "pipeline.root": self.root})
        outputs: Dict[str, dict] = {}
        results: List[StageResult] = []
        t_all = time.perf_counter()
        failed: Optional[BaseException] = None
        for i, sp in enumerate(plans, 1):
            prev = sp.previous or {}
            if sp.skip:
                log.info("[pipeline %s] stage %d/%d %s: skipped (%s; fingerprint %s)", self.run_name, i, n, sp.name,
                         sp.reason, sp.fingerprint[:12])
                outputs[sp.name] = dict(prev.get("outputs") or {})
                results.append(StageResult(sp.name, "skipped", 0.0, sp.fingerprint, outputs[sp.name],
                                           dict(prev.get("metrics") or {}), prev.get("mlflow_run_id")))
                continue
            log.info("[pipeline %s] stage %d/%d %s: running (%s; fingerprint %s) -> %s", self.run_name, i, n,
                     sp.name, sp.reason, sp.fingerprint[:12], sp.dir)
            attempt = int(prev.get("attempt", 0)) + 1 if prev.get("fingerprint") == sp.fingerprint else 1
            started = _now()
            self._write_manifest(sp, "running", attempt, started)
            t0 = time.perf_counter()
            try:
                fn = getattr(self, f"_run_{sp.name}")
                got = fn(sp, outputs, plans) if sp.name == "export" else fn(sp, outputs)
            except BaseException as e:  # KeyboardInterrupt too: the summary says where it stopped
                secs = time.perf_counter() - t0
                self._write_manifest(sp, "failed", attempt, started, error=f"{type(e).__name__}: {e}"[:2000],
                                     wall_seconds=round(secs, 3))
                log.error("[pipeline %s] stage %d/%d %s: failed after %.1f s: %s", self.run_name, i, n, sp.name,
                          secs, e)
                results.append(StageResult(sp.name, "failed", secs, sp.fingerprint))
                failed = e
                break
            stage_outputs, metrics, run_id, info = got
            secs = time.perf_counter() - t0
            self._write_manifest(sp, "completed", attempt, started, finished_utc=_now(), wall_seconds=round(secs, 3),
                                 outputs=stage_outputs, metrics=metrics, mlflow_run_id=run_id, info=info)
            outputs[sp.name] = stage_outputs
            results.append(StageResult(sp.name, "ran", secs, sp.fingerprint, stage_outputs, metrics, run_id))
            log.info("[pipeline %s] stage %d/%d %s: done in %.1f s (%s)", self.run_name, i, n, sp.name, secs,
                     ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if k in SUMMARY_KEYS) or "no metrics")
        total = time.perf_counter() - t_all
        self._finish(results, total, failed)
        if failed is not None:
            raise failed
        return results

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
