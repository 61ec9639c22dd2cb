"""The EIMF pipeline: the one orchestrator, for a pipeline run and for every cell of a grid (eimf.experiments).

A pipeline is a list of :class:`Stage` s, each running one step (eimf/steps) on the outputs of the stages it
reads. The default one (:func:`eimf_stages`, ``jobs/pipeline.py``):

    prepare   ingest + validate + k-core + split                          (eimf/steps/prepare.py)
    warmup    IBIM warm-up: the backbone alone, ``pipeline.warmup_steps`` steps, seed ``pipeline.warmup_seed``
              (default ``train.seed``)                                    (eimf/steps/train.py)
    annotate  typical users of the warm-up model + annotator + encoder     (eimf/steps/annotate.py)
    train     EIMF training with the annotations                          (eimf/steps/train.py)
    evaluate  the trained model on ``pipeline.eval_splits``, MostPopular   (eimf/steps/evaluate.py)
    export    the final model folder ``<run>/export/model``                (eimf/steps/export.py)
    promote   the registry's gate: the new version against the ``champion``
              alias on the newest holdout -> ``champion`` or ``challenger`` (eimf/steps/promote.py)

``promote`` runs where the model is registered (:func:`promotes`). With ``pipeline.from_model`` every training stage
warm-starts from that model (eimf.training.warm_start), its source pinned in the plan (an alias to its version).

:func:`backbone_stages` trains the backbone alone; a grid's ``coverage`` variant adds a second annotation set and
a ``merge`` of the two.

**Layout: a stage store keyed by fingerprint.** A stage's outputs and ``manifest.json`` (stage, step, status,
fingerprint, inputs' fingerprints, config subset, outputs, wall time, key metrics, MLflow run, code version) live in
``<storage>/stages/<step>/<fingerprint[:16]>/`` (``<storage>``: ``pipeline.storage_path``, local or ``s3://``),
shared by every pipeline there: a grid's cells share their prepare, warm-up and annotation stages, a grid's warm-up
is its backbone run on the first seed (the ``train`` step, same config and inputs), and a pipeline run after a
grid with the same settings trains nothing. The run folder ``<storage>/<run_name>/`` is the run's view: each
``<stage>/manifest.json`` is a copy of the stage's (``dir`` names its folder), ``summary.json`` / ``summary.md``
the table of the last invocation. Only ``export`` is the run's own (``<run>/export/model``): the final model
records the run's lineage and is registered under its name.

**Fingerprints.** A SHA-256 of the step, :data:`PIPELINE_VERSION`, the config fields that change the output, the
fingerprints of the stages read (by stage name) and the versions of formats depended on: ``prepare`` takes the
prepared-data fingerprint (input files' names, sizes and mtimes, parser and preprocessing settings), ``annotate``
the prompt template version. Fields that change only where or how fast a stage runs carry ``operational`` metadata
in eimf.config and are left out. The git commit is recorded in every manifest and MLflow run but not hashed. All
fingerprints are known before anything runs (:meth:`Pipeline.plan`).

**Skip, rerun, resume.** A stage is skipped when the manifest in its folder says ``completed`` with the same
fingerprint and every output it lists exists. A changed config changes that stage's fingerprint and, through the
inputs, every stage downstream: new folders, and they run. An interrupted stage (manifest ``running`` or
``failed``, or none) runs again in its folder under the run name its manifest recorded, so it resumes whichever
pipeline started it: the training stages' Ray Train run ``<run>-<stage>-<fingerprint[:8]>`` picks up its last
checkpoint, the annotation stage its per-prompt cache in ``<folder>/cache`` (unless ``semantic.cache_dir`` is
set). Another fingerprint is another folder and Ray Train run: never a resume of another config's checkpoint. Two
processes running the same stage at once are not guarded against.

**MLflow.** One parent run named after the pipeline run (tag ``stage=pipeline``, plus the caller's tags: a grid
cell's run is a child of the grid's); each stage that runs is its child run (tag ``mlflow.parentRunId``). At the
end the parent gets each stage's seconds, the final model's metrics and the summary table
(``pipeline_summary.json`` as an MLflow table, ``pipeline_summary.md``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import eimf.steps.annotate
import eimf.steps.evaluate
import eimf.steps.export
import eimf.steps.merge
import eimf.steps.prepare
import eimf.steps.promote
import eimf.steps.train  # noqa: F401  (steps.<name>.run below, looked up at call time)
from eimf import fs, ray_init, steps, tracking
from eimf.config import Config, eimf_home
from eimf.data.inputs import ensure_dataset
from eimf.pipeline.manifests import (MANIFEST, StagePlan, StageResult, now_utc, read_manifest, run_planned, skip_reason,
                                     write_manifest, write_view)
from eimf.pipeline.stages import (PIPELINE_VERSION, STAGES, STEPS, PipelineError, Stage, annotation_config,
                                  backbone_stages, data_fingerprint, eimf_stages, final_stages, fingerprint, promotes,
                                  stage_config, step_config, training_config, warmup_config)
from eimf.steps import StepOutput

log = logging.getLogger(__name__)

#: Steps whose folder is the run's, not the shared store's (the final model carries the run's lineage, the gate
#: decides on the registry as the run finds it).
PER_RUN_STEPS = ("export", "promote")
#: Steps that need Ray (evaluate, merge and export do not).
RAY_STEPS = ("prepare", "train", "annotate")
STORE = "stages"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
#: Metrics shown in the one-line summary of a stage.
SUMMARY_KEYS = ("users_out", "items_out", "best_valid/recall@50", "test/recall@50", "resumes", "selected",
                "prompts", "cache_hits", "valid_share", "test/ndcg@50", "test/mostpop/recall@50",
                "warm_start/rows_matched", "warm_start/rows_text_map", "promote/promoted", "promote/difference")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class StageFailed(Exception):
    """Raised inside :meth:`Pipeline.run` after a stage failed (the original error is re-raised at the end)."""


class Pipeline:
    """``Pipeline(cfg).run()``; see the module doc. ``stages``: default :func:`eimf_stages` of ``cfg``;
    ``tags``: more tags of the parent MLflow run (a grid's parent run, its variant and seed)."""

    def __init__(self, cfg: Config, stages: Optional[Sequence[Stage]] = None, tags: Optional[Dict[str, str]] = None):
        self.cfg = cfg
        self.stages = list(stages) if stages is not None else eimf_stages(cfg)
        names = [s.name for s in self.stages]
        for i, s in enumerate(self.stages):
            if s.step not in STEPS or names.count(s.name) > 1 or not set(s.inputs) <= set(names[:i]):
                raise PipelineError(f"pipeline stage {s.name!r}: unknown step {s.step!r}, a repeated name, or an "
                                    f"input {s.inputs} not among the stages before it ({names[:i]})")
        self.tags = dict(tags or {})
        p = cfg.pipeline
        self.run_name = p.run_name or (
            f"pipeline-{cfg.data.dataset}-{cfg.model.backbone}-{time.strftime('%Y%m%d-%H%M%S')}")
        storage = p.storage_path or cfg.train.storage_path or os.path.join(eimf_home(), "pipelines")
        self.storage = storage.rstrip("/") if fs.is_s3(storage) else os.path.abspath(os.path.expanduser(storage))
        self.root = fs.join(self.storage, self.run_name)
        self.uri = tracking.tracking_uri(cfg)
        self.parent_run_id: Optional[str] = None
        self.results: List[StageResult] = []
        #: each stage's outputs once it ran or was skipped
        self.outputs: Dict[str, Dict[str, str]] = {}
        self._plans: Dict[str, StagePlan] = {}
        for what, where in (("pipeline outputs", self.storage), ("MLflow store", self.uri)):
            if "working_dir_files" in where:  # a relative EIMF_HOME inside `ray job submit --working-dir`
                log.warning("%s in %s: that is the Ray job's temporary copy of the working dir; set EIMF_HOME (e.g. "
                            "--runtime-env-json '{\"env_vars\": {\"EIMF_HOME\": \"/abs/path\"}}') or "
                            "pipeline.storage_path / tracking.tracking_uri", what, where)

    # ------------------------------------------------------------------------------------------ layout
    def store_dir(self, step: str, fp: str) -> str:
        """Where a stage of ``step`` with fingerprint ``fp`` keeps its outputs (see the module doc)."""
        return fs.join(self.storage, STORE, step, fp[:16])

    def run_dir(self, stage: str) -> str:
        """The run's view of a stage: ``<run>/<stage>`` (its manifest's copy; export's own folder)."""
        return fs.join(self.root, stage)

    def stage_dir(self, stage: str) -> str:
        """The folder of a stage at its current fingerprint (plans the pipeline if it was not yet)."""
        return (self._plans or {p.name: p for p in self.plan()})[stage].dir

    def read_manifest(self, stage: str) -> Optional[dict]:
        return read_manifest(self.run_dir(stage))

    def stage_run_name(self, stage: str, fp: str) -> str:
        """MLflow run (and, for training stages, Ray Train run) of a stage that starts: same fingerprint, same name."""
        return f"{self.run_name}-{stage}-{fp[:8]}"

    # -------------------------------------------------------------------------------------------- plan
    def plan(self) -> List[StagePlan]:
        """Every stage's fingerprint, folder and skip decision, before anything runs (the data fingerprint once)."""
        fps: Dict[str, str] = {}
        steps_of = {s.name: s.step for s in self.stages}
        data_fp = data_fingerprint(self.stages[0].cfg.data) if any(s.step == "prepare" for s in self.stages) else None
        plans = []
        for st in self.stages:
            reads_annotations = any(steps_of[u] in ("annotate", "merge") for u in st.inputs)
            config, versions = step_config(st.step, st.cfg, data_fp, eimf=reads_annotations)
            inputs = {u: fps[u] for u in st.inputs}
            fp = fps[st.name] = fingerprint(st.step, config, inputs, versions)
            view = self.run_dir(st.name)
            folder = view if st.step in PER_RUN_STEPS else self.store_dir(st.step, fp)
            previous = read_manifest(folder)
            skip, reason = skip_reason(previous, fp)
            if previous is None and folder != view:
                seen = read_manifest(view)  # what this run had before: say why it runs again
                reason = skip_reason(seen, fp)[1] if seen and seen.get("fingerprint") != fp else reason
            elif skip and previous.get("pipeline_run") not in (None, "", self.run_name):
                reason = f"done by pipeline {previous['pipeline_run']}, outputs present"
            resumed = (previous or {}).get("run_name") if (previous or {}).get("fingerprint") == fp else None
            plans.append(StagePlan(st.name, fp, inputs, config, versions, folder, skip, reason, previous, st.step,
                                   view, resumed or self.stage_run_name(st.name, fp)))
        self._plans = {p.name: p for p in plans}
        return plans

    # --------------------------------------------------------------------------------------------- run
    def run(self) -> List[StageResult]:
        """Every stage in order, each skipped when its manifest allows (see the module doc)."""
        ensure_dataset(self.stages[0].cfg.data)  # a missing built-in dataset is downloaded before its fingerprint
        plans = self.plan()
        log.info("pipeline %s in %s: %s", self.run_name, self.root,
                 ", ".join(f"{p.name}={'skip' if p.skip else 'run'}" for p in plans))
        if any(not p.skip and p.step in RAY_STEPS for p in plans):
            ray_init.init_ray()  # RAY_ADDRESS (ray job submit) joins the cluster; otherwise a local Ray
        self.parent_run_id = tracking.start_run(self.cfg, self.run_name, tags={
            "stage": "pipeline", "eimf.pipeline": self.run_name, "pipeline.root": self.root, **self.tags})
        t_all, failed = time.perf_counter(), None
        try:
            for st in self.stages:
                self.outputs[st.name] = self.step(st)
        except StageFailed as e:
            failed = e.__cause__
        self._finish(self.results, time.perf_counter() - t_all, failed)
        if failed is not None:
            raise failed
        return self.results

    def result(self, stage: str) -> StageResult:
        return next(r for r in self.results if r.stage == stage)

    def call(self, st: Stage, sp: StagePlan) -> StepOutput:
        """The step call of a stage: its config and its inputs from the outputs of the stages it reads."""
        up = {k: v for u in st.inputs for k, v in self.outputs[u].items()}
        c, tags, name = st.cfg, self.child_tags(sp), sp.run_name
        if st.step == "prepare":
            return steps.prepare.run(c, {"data_fingerprint": sp.config["data_fingerprint"]}, sp.dir, tags, name)
        if st.step == "train":  # training stages only log their models: the export stage registers the final one
            c = dataclasses.replace(c, tracking=dataclasses.replace(c.tracking, registered_model=""))
            if "from_model" in sp.config:  # the version the plan pinned, not wherever the alias points by now
                pinned = sp.config["from_model"]["uri"]
                tags = {**tags, "warm_start.requested": c.pipeline.from_model}
                c = dataclasses.replace(c, pipeline=dataclasses.replace(c.pipeline, from_model=pinned))
            inputs = {"data_path": up["data_path"], **{k: up[k] for k in ("annotations",) if k in up}}
            return steps.train.run(c, inputs, sp.dir, tags, name)
        if st.step == "annotate":  # the annotation cache lives in the stage folder unless semantic.cache_dir is set
            c = dataclasses.replace(c, semantic=dataclasses.replace(
                c.semantic, cache_dir=c.semantic.cache_dir or fs.join(sp.dir, "cache")))
            return steps.annotate.run(c, {"model_dir": up["model_dir"]}, fs.join(sp.dir, "annotations"), tags, name)
        if st.step == "merge":
            base, overlay = (self.outputs[u]["annotations"] for u in st.inputs)
            return steps.merge.run(c, {"base": base, "overlay": overlay}, sp.dir, tags, name)
        if st.step == "evaluate":
            return steps.evaluate.run(c, {"model_dir": up["model_dir"]}, sp.dir, tags, name,
                                      splits=tuple(c.pipeline.eval_splits))
        if st.step == "promote":  # the version the export registered is in its manifest's info
            export = next(u for u in st.inputs if self._plans[u].step == "export")
            info = (read_manifest(self._plans[export].dir) or {}).get("info") or {}
            return steps.promote.run(c, {"model_uri": info.get("model_uri"), "model_dir": up["model_dir"],
                                         "data_path": up["data_path"]}, sp.dir, tags, name)
        return steps.export.run(c, {"model_dir": up["model_dir"], "metrics": up["metrics"]}, sp.dir, tags, name,
                                lineage=self.lineage(list(self._plans.values())))

    def lineage(self, plans: List[StagePlan]) -> dict:
        return {"pipeline_run": self.run_name, "root": self.root,
                "stages": {p.name: {"fingerprint": p.fingerprint, "dir": p.dir} for p in plans}}

    def child_tags(self, sp: StagePlan) -> Dict[str, str]:
        tags = {"stage": sp.name, "eimf.pipeline": self.run_name, "pipeline.fingerprint": sp.fingerprint,
                "pipeline.stage_dir": sp.dir}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags

    def step(self, st: Stage) -> Dict[str, str]:
        """Run (or skip) one stage (:meth:`call`); its outputs."""
        sp = self._plans[st.name]
        if sp.skip and st.step == "promote" and any(r.status == "ran" and self._plans[r.stage].step == "export"
                                                    for r in self.results if r.stage in st.inputs):
            # the export registered another version: that one has no alias yet
            sp = self._plans[st.name] = dataclasses.replace(sp, skip=False, reason="the export registered a new "
                                                                                   "version")
        i, n = [s.name for s in self.stages].index(st.name) + 1, len(self.stages)
        if sp.skip:
            log.info("[pipeline %s] stage %d/%d %s: skipped (%s; fingerprint %s)", self.run_name, i, n, st.name,
                     sp.reason, sp.fingerprint[:12])
        else:
            log.info("[pipeline %s] stage %d/%d %s: running (%s; fingerprint %s) -> %s", self.run_name, i, n,
                     st.name, sp.reason, sp.fingerprint[:12], sp.dir)
        t0 = time.perf_counter()
        try:
            result = run_planned(sp, lambda: self.call(st, sp), owner=self.run_name)
        except BaseException as e:
            secs = time.perf_counter() - t0
            log.error("[pipeline %s] stage %d/%d %s: failed after %.1f s: %s", self.run_name, i, n, st.name, secs, e)
            self.results.append(StageResult(st.name, "failed", secs, sp.fingerprint))
            raise StageFailed(st.name) from e
        self.results.append(result)
        if result.status == "ran":
            log.info("[pipeline %s] stage %d/%d %s: done in %.1f s (%s)", self.run_name, i, n, st.name,
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
        summary = {"pipeline_run": self.run_name, "root": self.root, "status": status, "finished_utc": now_utc(),
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
            export = next((r for r in results if r.stage == "export" and r.status != "failed"), None)
            if export is not None:
                c.set_tag(run_id, "pipeline.model_dir", export.outputs.get("model_dir", ""))
            gate = next((r for r in results if r.stage == "promote" and r.status != "failed"), None)
            if gate is not None and "promote/promoted" in gate.metrics:
                c.set_tag(run_id, "pipeline.promotion",
                          "champion" if gate.metrics["promote/promoted"] else "challenger")
            tracking.end_run(self.uri, run_id, status="FAILED" if failed is not None else "FINISHED")


__all__ = ["MANIFEST", "PIPELINE_VERSION", "STAGES", "STEPS", "Pipeline", "PipelineError", "Stage", "StageFailed",
           "StagePlan", "StageResult", "annotation_config", "backbone_stages", "data_fingerprint", "eimf_stages",
           "final_stages", "fingerprint", "promotes", "read_manifest", "run_planned", "skip_reason", "stage_config",
           "step_config", "training_config", "warmup_config", "write_manifest", "write_view"]
