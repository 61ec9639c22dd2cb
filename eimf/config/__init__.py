"""Typed defaults for every stage, in one place.

A run's configuration is these dataclasses, overlaid by an optional YAML file, overlaid by ``key=value``
command-line overrides (OmegaConf dot-list syntax, e.g. ``model.backbone=comirec_dr train.seed=3``). Sections
that mix concerns have sub-sections, as Ray Train splits its ScalingConfig, FailureConfig and RunConfig:
``train.scaling``, ``train.failure``, ``train.deepspeed``, ``train.sharded``, ``semantic.openai``,
``semantic.vllm``, and ``eimf.experimental`` for the switches that stay off by default.

Every setting is checked when the config loads (types, ``Literal`` choices, ranges, and settings that must agree
such as ``train.batch_size`` and ``train.scaling.num_workers``): a wrong one raises :class:`ConfigError`, one line
naming the key, the value and what it accepts, before anything runs. Old flat keys (:data:`RENAMED`) still load,
with a warning naming the new key.

    base.py      ConfigError, ``operational`` fields (left out of fingerprints), the per-section checks
    data.py      ``data``
    train.py     ``model``, ``negatives``, ``train`` (+ sub-sections), ``eval``, ``retrieval``
    semantic.py  ``semantic`` (+ ``openai``, ``vllm``), ``eimf`` (+ ``experimental``)
    run.py       ``tracking``, ``pipeline``
    load.py      :class:`Config`, :func:`load_config`, the old-key map, dict and YAML forms
"""
from __future__ import annotations

import os

from eimf.config.base import (OPERATIONAL, ConfigError, SettingValueError, UnknownSettingError, choices_of,
                              operational, operational_fields, without_operational)
from eimf.config.data import DataConfig
from eimf.config.load import (RENAMED, Config, apply_overrides, flatten, from_dict, load_config, to_dict,
                              to_yaml)
from eimf.config.run import PipelineConfig, TrackingConfig
from eimf.config.semantic import EIMFConfig, ExperimentalConfig, OpenAIConfig, SemanticConfig, VLLMConfig
from eimf.config.train import (BACKBONES, DeepSpeedConfig, EvalConfig, FailureConfig, ModelConfig,
                               NegativesConfig, RetrievalConfig, ScalingConfig, ShardedConfig, TrainConfig)

#: Root of everything a local run writes (preprocessed data, runs, MLflow store). Override with EIMF_HOME.
DEFAULT_HOME = ".eimf"


def eimf_home() -> str:
    return os.environ.get("EIMF_HOME", DEFAULT_HOME)


__all__ = [
    "BACKBONES", "Config", "ConfigError", "DataConfig", "DeepSpeedConfig", "DEFAULT_HOME", "EIMFConfig",
    "EvalConfig", "ExperimentalConfig", "FailureConfig", "ModelConfig", "NegativesConfig", "OPERATIONAL",
    "OpenAIConfig", "PipelineConfig", "RENAMED", "RetrievalConfig", "ScalingConfig", "SemanticConfig",
    "SettingValueError", "ShardedConfig", "TrackingConfig", "TrainConfig", "UnknownSettingError", "VLLMConfig",
    "apply_overrides", "choices_of", "eimf_home", "flatten", "from_dict", "load_config", "operational",
    "operational_fields", "to_dict", "to_yaml", "without_operational",
]
