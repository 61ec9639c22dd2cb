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
from eimf.steps.promote import promote_split, promote_topk
from eimf.steps.registry import resolve_source
from eimf.steps.train import eimf_train_config
from eimf.tracking import tracking_uri

#: Bump when a stage's outputs change for the same config and inputs: every fingerprint changes with it.
#: 2: stage folders keyed by fingerprint (the step, not the stage's name, is hashed).
PIPELINE_VERSION = 2
#: The default pipeline's stages (:func:`eimf_stages`); ``promote`` only where the model is registered
#: (:func:`promotes`).
STAGES = ("prepare", "warmup", "annotate", "train", "evaluate", "export", "promote")
#: What a stage can run: the steps, ``merge`` (two annotation sets into one) and ``promote`` (the registry's gate).
STEPS = ("prepare", "train", "annotate", "merge", "evaluate", "export", "promote")

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


def promotes(cfg: Config) -> bool:
    """Whether the pipeline ends with the promotion gate: ``pipeline.promote`` and a registered model (tracking on,
    ``tracking.log_model``, a registered name: a grid's cells register nothing)."""
    t = cfg.tracking
    return bool(cfg.pipeline.promote and t.enabled and t.log_model and t.registered_model != "")


def final_stages(cfg: Config) -> List[Stage]:
    """evaluate, export, and the promotion gate where :func:`promotes`."""
    stages = [Stage("evaluate", "evaluate", cfg, ("train",)), Stage("export", "export", cfg, ("train", "evaluate"))]
    if promotes(cfg):
        stages.append(Stage("promote", "promote", cfg, ("prepare", "export")))
    return stages


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
    """The backbone alone: prepare, train without annotations, evaluate, export (and promote)."""
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
    """The config subset a training run's output depends on (operational fields left out); with
    ``pipeline.from_model``, the warm start's source pinned (an alias resolved to its version now, a folder by its
    manifest's hash: eimf.steps.registry.resolve_source), so a moved alias is another fingerprint."""
    d = to_dict(cfg)
    train = without_operational(eimf_train_config(cfg.train)[0] if eimf else cfg.train)
    if max_steps is not None:
        train["max_steps"] = max_steps
    out = {"model": d["model"], "negatives": d["negatives"], "eval": without_operational(cfg.eval),
           "retrieval": d["retrieval"], "train": train}
    if eimf:
        out["eimf"] = _without(d["eimf"], ("enabled", "annotations"))
    if cfg.pipeline.from_model:
        out["from_model"] = resolve_source(cfg.pipeline.from_model, tracking_uri(cfg))
    return out


def promote_config(cfg: Config) -> dict:
    """The promotion gate's settings (the champion it meets is the registry's at run time, not hashed)."""
    p = cfg.pipeline
    return {"metric": p.promote_metric, "margin": p.promote_margin, "split": promote_split(cfg),
            "topk": list(promote_topk(cfg)), "exclude_history": cfg.eval.exclude_history,
            "registered_model": cfg.tracking.registered_model}


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
    if step == "promote":
        return promote_config(cfg), {}
    raise PipelineError(f"unknown pipeline step {step!r} (steps: {', '.join(STEPS)})")


def stage_config(cfg: Config, stage: str, data_fp: Optional[str] = None) -> Tuple[dict, dict]:
    """``(config subset, versions)`` of a stage of the default pipeline (:func:`eimf_stages`)."""
    st = next((s for s in eimf_stages(cfg) if s.name == stage), None)
    if st is None:
        raise PipelineError(f"unknown pipeline stage {stage!r} (stages: {', '.join(STAGES)})")
    return step_config(st.step, st.cfg, data_fp, eimf=stage == "train")
