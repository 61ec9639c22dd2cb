"""Step ``train``: Ray Train on the prepared data, the best model exported (:func:`eimf.training.runner.train`).

``inputs["data_path"]`` is the prepared dataset; with ``inputs["annotations"]`` the run is EIMF training on
them (``train.input`` becomes ``memory``: the Ray Data cut carries no semantic vectors), without it the backbone
alone. The Ray Train run (and its checkpoints) is ``<out_dir>/<run_name>``, so the same name resumes.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from eimf.steps import StepOutput, numbers

log = logging.getLogger(__name__)

#: Training metrics a step keeps (besides best_valid/* and test/*).
KEYS = ("step", "best_step", "train_seconds", "examples_per_s", "resumes", "first_resume_step", "window_overlap_share")


def eimf_train_config(train_cfg):
    """``(train config of an EIMF run, note or None)``: EIMF training reads ``train.input=memory``; workers,
    strategy and ZeRO stage stay as given. A changed input is said in the log and the manifest."""
    if train_cfg.input == "memory":
        return train_cfg, None
    return (dataclasses.replace(train_cfg, input="memory"),
            f"train.input {train_cfg.input} -> memory (the Ray Data cut carries no semantic vectors)")


def run(cfg, inputs: dict, out_dir: Optional[str] = None, tags: Optional[dict] = None,
        run_name: Optional[str] = None) -> StepOutput:
    from eimf import fs
    from eimf.training.runner import train

    annotations = inputs.get("annotations")
    info = {}
    train_cfg = cfg.train
    if annotations:
        train_cfg, note = eimf_train_config(train_cfg)
        if note:
            log.warning("EIMF training: %s", note)
            info["train_config_changed"] = note
    train_cfg = dataclasses.replace(train_cfg, storage_path=out_dir or train_cfg.storage_path,
                                    run_name=run_name or train_cfg.run_name)
    eimf_cfg = dataclasses.replace(cfg.eimf, enabled=bool(annotations), annotations=annotations or None)
    res = train(dataclasses.replace(cfg, train=train_cfg, eimf=eimf_cfg), data_path=inputs["data_path"], tags=tags)
    keep = {k: res.metrics[k] for k in KEYS if k in res.metrics}
    keep.update({k: v for k, v in res.metrics.items() if k.startswith(("best_valid/", "test/"))})
    info["train_run_name"] = res.run_name
    return StepOutput({"model_dir": res.export_dir, "run_dir": fs.join(res.storage_path, res.run_name)},
                      numbers(keep), res.mlflow_run_id, info)
