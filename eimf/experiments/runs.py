"""One training of an experiment, reused when its export is already in the experiment's work folder."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from eimf.config import Config

log = logging.getLogger(__name__)
RECORD = "result.json"


def train_or_reuse(cfg: Config, data_path: str, name: str, work: Path, seed: int) -> str:
    """The export folder of a training of ``cfg`` (seed ``seed``) on ``data_path`` under ``<work>/runs/<name>``;
    an export already there is reused, so a cut experiment goes on where it stopped. The training's metrics and
    wall clock go to ``<work>/runs/<name>/result.json`` (:func:`run_record`)."""
    from eimf.steps.train import train

    export = Path(work) / "runs" / name / "export"
    if (export / "folder.json").exists():
        log.info("%s: reusing %s", name, export)
        return str(export)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, run_name=name,
                                                             storage_path=str(Path(work) / "runs")))
    start = time.perf_counter()
    result = train(cfg, data_path=data_path)
    wall = time.perf_counter() - start
    log.info("%s: trained in %.0f s", name, wall)
    (export.parent / RECORD).write_text(json.dumps({"wall_seconds": wall, "metrics": result.metrics}, default=float))
    return result.export_dir


def run_record(work: Path, name: str) -> dict:
    """What :func:`train_or_reuse` recorded of a training: ``wall_seconds`` (training and export) and ``metrics``
    (``step``, ``best_step``, ``train_seconds``, ``best_valid/...``); empty for a training it did not run."""
    path = Path(work) / "runs" / name / RECORD
    return json.loads(path.read_text()) if path.exists() else {}
