"""Stage manifests: the plan of a stage (:class:`StagePlan`), the manifest in its folder and its copy in a run's
view, the skip decision, and running a planned stage (eimf.pipeline's module doc)."""
from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from eimf import fs, tracking
from eimf.pipeline.stages import PIPELINE_VERSION
from eimf.steps import StepOutput

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class StagePlan:
    name: str
    fingerprint: str
    inputs: Dict[str, str]
    config: dict
    versions: dict
    #: the stage's folder: its outputs and manifest (the store's, or the run's for :data:`eimf.pipeline.PER_RUN_STEPS`)
    dir: str
    skip: bool
    reason: str
    previous: Optional[dict] = None
    step: str = ""
    #: the run's view of the stage: a copy of its manifest (None: ``dir`` is the run's own)
    view: Optional[str] = None
    #: its MLflow (and Ray Train) run: the one its manifest recorded, so an interrupted stage resumes
    run_name: str = ""


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


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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


def write_manifest(sp: StagePlan, status: str, attempt: int, started: str, owner: str = "", **extra) -> None:
    """The stage's manifest in its folder, and its copy in the run's view of it."""
    manifest = {"stage": sp.name, "step": sp.step, "pipeline_run": owner, "status": status,
                "fingerprint": sp.fingerprint, "inputs": sp.inputs, "config": sp.config, "versions": sp.versions,
                "pipeline_version": PIPELINE_VERSION, "code_version": tracking.code_version(), "dir": sp.dir,
                "run_name": sp.run_name, "attempt": attempt, "started_utc": started, **extra}
    fs.write_json(fs.join(sp.dir, MANIFEST), manifest)
    write_view(sp, manifest)


def write_view(sp: StagePlan, manifest: dict) -> None:
    if sp.view and sp.view != sp.dir:
        fs.write_json(fs.join(sp.view, MANIFEST), {**manifest, "stage": sp.name})


def run_planned(sp: StagePlan, call: Callable[[], StepOutput], owner: str = "") -> StageResult:
    """Run a planned stage unless its manifest lets it be skipped. The manifest says ``running`` while it runs,
    then ``completed`` with outputs and metrics, or ``failed`` (and the error is raised)."""
    prev = sp.previous or {}
    if sp.skip:
        write_view(sp, prev)
        return StageResult(sp.name, "skipped", 0.0, sp.fingerprint, dict(prev.get("outputs") or {}),
                           dict(prev.get("metrics") or {}), prev.get("mlflow_run_id"))
    attempt = int(prev.get("attempt", 0)) + 1 if prev.get("fingerprint") == sp.fingerprint else 1
    started = now_utc()
    write_manifest(sp, "running", attempt, started, owner)
    t0 = time.perf_counter()
    try:
        got = call()
    except BaseException as e:  # KeyboardInterrupt too: the manifest says where it stopped
        write_manifest(sp, "failed", attempt, started, owner, error=f"{type(e).__name__}: {e}"[:2000],
                       wall_seconds=round(time.perf_counter() - t0, 3))
        raise
    secs = time.perf_counter() - t0
    write_manifest(sp, "completed", attempt, started, owner, finished_utc=now_utc(), wall_seconds=round(secs, 3),
                   outputs=got.outputs, metrics=got.metrics, mlflow_run_id=got.mlflow_run_id, info=got.info)
    return StageResult(sp.name, "ran", secs, sp.fingerprint, got.outputs, got.metrics, got.mlflow_run_id)
