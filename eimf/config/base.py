"""What every config section shares: the error type, ``operational`` fields and the checks of a section.

A section is a dataclass with a ``PATH`` (``"train.scaling"``) that names its fields in messages. A field that
takes a fixed set of values is typed ``Literal[...]``: OmegaConf rejects any other value when the config loads,
and :func:`check_section` does the same for a section built in Python.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import field
from typing import ClassVar, Dict, Literal, Optional, Tuple, get_args, get_origin

from omegaconf import errors as oc_errors


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line naming the field as ``section.name``."""


class _AlsoOmegaConfError(ConfigError):
    """A ConfigError that is also the OmegaConf error it replaces (code that catches those still does)."""

    def __init__(self, msg: str) -> None:
        ConfigError.__init__(self, msg)
        self.msg = msg

    def __str__(self) -> str:
        return self.msg


class UnknownSettingError(_AlsoOmegaConfError, oc_errors.ConfigKeyError):
    """A key that is no setting (a typo): also an OmegaConf ``ConfigKeyError``."""


class SettingValueError(_AlsoOmegaConfError, oc_errors.ValidationError):
    """A value of the wrong type or outside a setting's choices: also an OmegaConf ``ValidationError``."""


#: Field metadata key: the field changes where or how fast a step runs, never its output, so fingerprints skip it.
OPERATIONAL = "operational"


def operational(default=None, **kwargs):
    """A dataclass field marked :data:`OPERATIONAL` (see :func:`operational_fields`)."""
    return field(default=default, metadata={OPERATIONAL: True}, **kwargs)


def _is_section(value) -> bool:
    return dataclasses.is_dataclass(value)


def operational_fields(section) -> tuple:
    """Names of the fields of a config section (class or instance) marked operational, those of its
    sub-sections as ``sub.name`` (``train``: ``log_every``, ``scaling.placement_strategy``, ...)."""
    out = []
    for f in dataclasses.fields(section):
        if f.metadata.get(OPERATIONAL):
            out.append(f.name)
        else:
            sub = section_type(type(section) if not isinstance(section, type) else section, f.name)
            if sub is not None:
                out.extend(f"{f.name}.{name}" for name in operational_fields(sub))
    return tuple(out)


def without_operational(section) -> dict:
    """A section as a dict (``dataclasses.asdict``) without its operational fields, at any depth: the part of
    it that a stage's output depends on (eimf/pipeline/stages.py hashes it)."""
    out = {}
    for f in dataclasses.fields(section):
        if f.metadata.get(OPERATIONAL):
            continue
        value = getattr(section, f.name)
        out[f.name] = without_operational(value) if _is_section(value) else copy.deepcopy(value)
    return out


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def section_type(cls, name: str):
    """The section class of field ``name`` of section class ``cls`` (``TrainConfig``, ``"scaling"``), else None."""
    hint = _hints(cls).get(name)
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def choices_of(cls, name: str) -> Optional[Tuple]:
    """The values a ``Literal``-typed field of a section class takes (``Optional[Literal]`` too), else None."""
    hint = _hints(cls).get(name)
    if get_origin(hint) is typing.Union:
        hint = next((a for a in get_args(hint) if a is not type(None)), None)
    return get_args(hint) if get_origin(hint) is Literal else None


def choice_message(key: str, value, choices) -> str:
    return f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}"


def check_section(section) -> None:
    """Every ``Literal`` field of ``section`` holds one of its values (OmegaConf checks this on load; a section
    built in Python is checked here), and every field in its ``MINIMUMS`` is at least that (or None)."""
    for f in dataclasses.fields(section):
        choices = choices_of(type(section), f.name)
        value = getattr(section, f.name)
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(choice_message(f"{section.PATH}.{f.name}", value, choices))
    for name, low in section.MINIMUMS.items():
        check_min(f"{section.PATH}.{name}", getattr(section, name), low)


class Section:
    """Base of the config sections (dataclasses): ``PATH`` names the section in messages, ``MINIMUMS`` maps a
    field to its least value; :func:`check_section` runs after ``__init__`` (a section with more to check
    extends ``__post_init__``)."""

    PATH: ClassVar[str] = ""
    MINIMUMS: ClassVar[Dict[str, float]] = {}

    def __post_init__(self):
        check_section(self)


def check_min(where: str, value, low) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{where} must be >= {low}, got {value}")


def check_positive(where: str, value) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{where} must be > 0, got {value}")


def check_share(where: str, value, low_open: bool = False) -> None:
    """``value`` in [0, 1] (``low_open``: (0, 1))."""
    if not (0 < value < 1 if low_open else 0 <= value <= 1):
        raise ConfigError(f"{where} must be in {'(0, 1)' if low_open else '[0, 1]'}, got {value}")
