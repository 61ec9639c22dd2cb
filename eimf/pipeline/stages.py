"""A pipeline's stages and their fingerprints: :class:`Stage`, the stage lists of the EIMF pipeline and of the
backbone alone, and the config subset each step's output depends on (eimf.pipeline's module doc)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from eimf.config import Config, ConfigError, to_dict, without_operational
from eimf.data.inputs import resolve_inputs
from eimf.formats.prepared import fingerprint as prepared_fingerprint
from eimf.formats.prepared import input_infos
from eimf.semantic.prompts import PROMPT_VERSION
from eimf.steps.train import eimf_train_config

#: Bump when a stage's outputs change for the same config and inputs: every fingerprint changes with it.
#: 2: stage folders keyed by fingerprint (the step, not the stage's name, is hashed).
PIPELINE_VERSION = 2
#: The default pipeline's stages (:func:`eimf_stages`).
STAGES = ("prepare", "warmup", "annotate", "train", "evaluate", "export")
#: What a stage can run: the steps, and ``merge`` (two annotation sets into one).
STEPS = ("prepare", "train", "annotate", "merge", "evaluate", "export")

#: A pipeline setting that cannot work (kept as a name: the config's own checks raise the same class).
PipelineError = ConfigError


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline: its ``name`` (unique in the pipeline), the ``step`` it runs (:data:`STEPS`), the
    config it runs with, and the names of the stages whose outputs it reads (earlier in the list)."""

    name: str
    step: str
    cfg: Config
    inputs: Tuple[str, ...] = ()


def warmup_config(cfg: Config) -> Config:
    """The warm-up's config: ``pipeline.warmup_steps`` steps, seed ``pipeline.warmup_seed`` (default
    ``train.seed``)."""
    p = cfg.pipeline
    seed = cfg.train.seed if p.warmup_seed is None else p.warmup_seed
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=p.warmup_steps, seed=seed))


def final_stages(cfg: Config) -> List[Stage]:
    return [Stage("evaluate", "evaluate", cfg, ("train",)), Stage("export", "export", cfg, ("train", "evaluate"))]


def eimf_stages(cfg: Config, warmup: Optional[Config] = None, annotate: Optional[Config] = None,
                overlay: Optional[Config] = None) -> List[Stage]:
    """The EIMF pipeline: ``cfg`` trains, evaluates and exports; the warm-up takes :func:`warmup_config` of
    ``warmup``, the annotation set ``annotate``'s ``semantic`` settings (both default ``cfg``). With ``overlay``, a
    second annotation set whose answered users replace theirs in the first (``merge``) is what training reads."""
    stages = [Stage("prepare", "prepare", cfg), Stage("warmup", "train", warmup_config(warmup or cfg), ("prepare",)),
              Stage("annotate", "annotate", annotate or cfg, ("warmup",))]
    if overlay is not None:
        stages += [Stage("overlay", "annotate", overlay, ("warmup",)),
                   Stage("merge", "merge", annotate or cfg, ("annotate", "overlay"))]
    return stages + [Stage("train", "train", cfg, ("prepare", stages[-1].name)), *final_stages(cfg)]


def backbone_stages(cfg: Config) -> List[Stage]:
    """The backbone alone: prepare, train without annotations, evaluate, export."""
    return [Stage("prepare", "prepare", cfg), Stage("train", "train", cfg, ("prepare",)), *final_stages(cfg)]


def fingerprint(step: str, config: dict, inputs: Dict[str, str], versions: Optional[dict] = None) -> str:
    payload = {"stage": step, "pipeline_version": PIPELINE_VERSION, "config": config, "inputs": inputs,
               "versions": versions or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def data_fingerprint(data_cfg) -> str:
    """The prepared-data fingerprint :func:`eimf.data.preprocess.prepare` gives ``data_cfg`` (inputs + config)."""
    inputs = resolve_inputs(data_cfg)
    return prepared_fingerprint(data_cfg, inputs, input_infos(inputs))


def _without(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def training_config(cfg: Config, max_steps: Optional[int] = None, eimf: bool = False) -> dict:
    """The config subset a training run's output depends on (operational fields left out)."""
    d = to_dict(cfg)
    train = without_operational(eimf_train_config(cfg.train)[0] if eimf else cfg.train)
    if max_steps is not None:
        train["max_steps"] = max_steps
    out = {"model": d["model"], "negatives": d["negatives"], "eval": without_operational(cfg.eval),
           "retrieval": d["retrieval"], "train": train}
    if eimf:
        out["eimf"] = _without(d["eimf"], ("enabled", "annotations"))
    return out


def annotation_config(cfg: Config) -> Tuple[dict, dict]:
    """``(config subset, versions)`` an annotation set depends on (with the warm-up model's fingerprint)."""
    return ({"semantic": without_operational(cfg.semantic)},
            {"prompt": PROMPT_VERSION})


def step_config(step: str, cfg: Config, data_fp: Optional[str] = None, eimf: bool = False) -> Tuple[dict, dict]:
    """``(config subset, versions)`` that a step's output depends on (see the module doc); ``eimf``: a training
    stage that reads annotations."""
    if step == "prepare":
        return {"data_fingerprint": data_fp or data_fingerprint(cfg.data)}, {}
    if step == "train":
        return training_config(cfg, eimf=eimf), {}
    if step == "annotate":
        return annotation_config(cfg)
    if step == "merge":
        return {}, {}
    if step == "evaluate":
        return {"splits": list(cfg.pipeline.eval_splits), "retrieval": to_dict(cfg)["retrieval"]}, {}
    if step == "export":
        return {"log_model": cfg.tracking.log_model, "registered_model": cfg.tracking.registered_model}, {}
    raise PipelineError(f"unknown pipeline step {step!r} (steps: {', '.join(STEPS)})")


def stage_config(cfg: Config, stage: str, data_fp: Optional[str] = None) -> Tuple[dict, dict]:
    """``(config subset, versions)`` of a stage of the default pipeline (:func:`eimf_stages`)."""
    st = next((s for s in eimf_stages(cfg) if s.name == stage), None)
    if st is None:
        raise PipelineError(f"unknown pipeline stage {stage!r} (stages: {', '.join(STAGES)})")
    return step_config(st.step, st.cfg, data_fp, eimf=stage == "train")
