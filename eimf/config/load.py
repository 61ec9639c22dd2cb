"""The whole config (:class:`Config`) and how it loads: typed defaults < YAML file < ``key=value`` overrides.

Every setting is checked here, when the config loads, so that a wrong one fails before anything runs, in one line
naming the key, the value and what it accepts (:class:`~eimf.config.base.ConfigError`). Keys renamed by the
nested layout (:data:`RENAMED`) still load for one release, with a warning naming the new key.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from eimf.config.base import (ConfigError, SettingValueError, UnknownSettingError, choice_message, choices_of,
                              section_type)
from eimf.config.data import DataConfig
from eimf.config.run import PipelineConfig, TrackingConfig
from eimf.config.semantic import EIMFConfig, SemanticConfig
from eimf.config.train import BACKBONES, EvalConfig, ModelConfig, NegativesConfig, RetrievalConfig, TrainConfig


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    eimf: EIMFConfig = field(default_factory=EIMFConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self):
        # settings checked across sections, or against a registry of a layer above (eimf.models.MODELS)
        if self.model.backbone not in BACKBONES:
            raise ConfigError(choice_message("model.backbone", self.model.backbone, BACKBONES))


def _renames() -> dict:
    out = {f"train.{k}": f"train.scaling.{k}" for k in ("num_workers", "use_gpu", "cpus_per_worker",
                                                         "placement_strategy")}
    out.update({f"train.{k}": f"train.failure.{k}" for k in ("max_failures", "restart_timeout_s")})
    # train.precision was train.deepspeed.precision's old name; it is the setting of every strategy now
    out.update({"train.zero_stage": "train.deepspeed.zero_stage", "train.deepspeed.precision": "train.precision",
                "train.sparse_optimizer": "train.sharded.optimizer", "train.sparse_lr": "train.sharded.lr"})
    out.update({f"semantic.openai_{k}": f"semantic.openai.{k}" for k in ("base_url", "model", "api_key_env")})
    out.update({f"semantic.{k}": f"semantic.openai.{k}" for k in (
        "structured_output", "request_timeout_s", "max_concurrency", "request_retries", "backoff_initial_s",
        "backoff_max_s")})
    out.update({f"semantic.vllm_{k}": f"semantic.vllm.{k}" for k in (
        "model", "concurrency", "tensor_parallel_size", "batch_size", "max_model_len", "max_num_seqs", "device",
        "cpus_per_engine", "cpu_kvcache_gib", "dtype", "enforce_eager", "timeout_s")})
    out.update({f"semantic.{k}": f"semantic.vllm.{k}" for k in ("repetition_penalty", "retry_temperature")})
    out.update({f"eimf.{k}": f"eimf.experimental.{k}" for k in (
        "ma_projection", "mask_own_interests", "matching_space", "window_overlap", "lambda_item")})
    return out


#: Old key -> new key. An old key in a YAML file or an override loads as the new one, with a FutureWarning;
#: remove this map in the release after the nested layout.
RENAMED = _renames()


def _warn_renamed(old: str, new: str, where: str) -> None:
    warnings.warn(f"{where}: config key {old} is now {new}; the old name is read for one release only",
                  FutureWarning, stacklevel=4)


def rename_overrides(overrides: List[str]) -> List[str]:
    """``key=value`` overrides with old keys (:data:`RENAMED`) replaced by the new ones, each with a warning."""
    given = {}  # the keys given under their new name, with their values
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if sep and key.strip() not in RENAMED:
            given[key.strip()] = value.strip()
    out = []
    for item in overrides:
        key, sep, value = str(item).partition("=")
        new = RENAMED.get(key.strip())
        if new is not None and sep:
            _check_agree(key.strip(), value.strip(), new, given, "overrides")
            _warn_renamed(key.strip(), new, "override")
            item = f"{new}={value}"
        out.append(item)
    return out


def _check_agree(old: str, value, new: str, given: dict, where: str) -> None:
    # both names given: a value silently dropped would be worse than a stop (e.g. train.deepspeed.precision=bf16
    # beside train.precision=fp32)
    if new in given and str(given[new]) != str(value):
        raise ConfigError(f"{where}: {new}={given[new]} and its old name {old}={value} disagree; give {new} only")


def rename_tree(tree: dict, where: str) -> dict:
    """A nested dict (a YAML file) with old keys moved to their new place, each with a warning; where both are
    given with one value, it loads once; with two, a :class:`ConfigError`."""
    for old, new in RENAMED.items():
        *parents, leaf = old.split(".")
        node = tree
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        _warn_renamed(old, new, where)
        *parents, leaf = new.split(".")
        node = tree
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        if leaf in node:
            _check_agree(old, value, new, {new: node[leaf]}, where)
        node.setdefault(leaf, value)
    return tree


def _known_keys(cls=None, prefix: str = "") -> List[str]:
    out = []
    for f in dataclasses.fields(cls or Config):
        out.append(f"{prefix}{f.name}")
        sub = section_type(cls or Config, f.name)
        if sub is not None:
            out.extend(_known_keys(sub, f"{prefix}{f.name}."))
    return out


def _section_class(path: List[str]):
    cls = Config
    for name in path:
        cls = section_type(cls, name)
        if cls is None:
            return None
    return cls


def _one_line(e: oc_errors.OmegaConfBaseException) -> ConfigError:
    """An OmegaConf error as one line naming the key, the value and what it accepts."""
    key = getattr(e, "full_key", None) or "config"
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    if isinstance(e, (oc_errors.ConfigKeyError, oc_errors.ConfigAttributeError)):
        near = difflib.get_close_matches(key, _known_keys(), n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        return UnknownSettingError(f"{key} is not a setting{hint}")
    *parents, name = key.split(".")
    cls = _section_class(parents)
    choices = choices_of(cls, name) if cls is not None else None
    value = re.match(r"(?:Invalid value|Value) '(.*?)'", msg)
    if choices is not None and value:
        return SettingValueError(choice_message(key, value.group(1), choices))
    if isinstance(e, oc_errors.InterpolationResolutionError):  # ${oc.env:VAR} and the like: the cause, then the key
        return SettingValueError(f"{msg} (setting {key})")
    return SettingValueError(f"{key}: {msg}")


def _to_object(merged) -> Config:
    try:
        return OmegaConf.to_object(merged)
    except oc_errors.OmegaConfBaseException as e:
        raise _one_line(e) from None


def _merge(*parts):
    try:
        return OmegaConf.merge(*parts)
    except oc_errors.OmegaConfBaseException as e:
        raise _one_line(e) from None


def _read_yaml(path) -> dict:
    try:
        raw = OmegaConf.to_container(OmegaConf.load(str(path))) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file holds sections (data:, model:, ...), got {type(raw).__name__}")
    return rename_tree(raw, str(path))


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> Config:
    """Defaults < YAML file < ``key=value`` overrides, every setting checked (a :class:`ConfigError` naming it)."""
    merged = OmegaConf.structured(Config)
    if path:
        merged = _merge(merged, OmegaConf.create(_read_yaml(path)))
    if overrides:
        merged = _merge(merged, OmegaConf.from_dotlist(rename_overrides(list(overrides))))
    return _to_object(merged)


def apply_overrides(cfg: Config, overrides: List[str]) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied and checked like :func:`load_config`'s."""
    if not overrides:
        return cfg
    return _to_object(_merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(rename_overrides(list(overrides)))))


def from_dict(d: dict) -> Config:
    """The :class:`Config` of :func:`to_dict`'s dict (e.g. inside a Ray worker)."""
    return _to_object(_merge(OmegaConf.structured(Config), d))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the form MLflow params and manifests use."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
