"""The types of the dataset catalogue: a dataset (:class:`DatasetSpec`), its raw layouts (:class:`Source`), what to
download (:class:`DownloadSpec` of :class:`RemoteFile`) and what one prepare run reads (:class:`Inputs`).

The publishers' checksums are data, in ``checksums.json`` beside this module (:func:`published_checksums`);
:func:`remote_file` attaches them to a file by its name.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from eimf.data.parsers import CatalogueSpec, DataError, InteractionSpec

#: The publishers' checksums, shipped as package data beside this module.
CHECKSUMS_JSON = "checksums.json"
#: ``RemoteFile.checksum_source`` of a file without published checksums.
TOFU = "trust on first use: no published checksum"

#: ``user item item ...`` per line, chronological, no time (S3-Rec, P5, ML-1M sequences).
SEQUENCES = InteractionSpec(format="sequences", user_col="user", item_col="item", time_col=None)


class DatasetNotFoundError(DataError):
    """The dataset folder (or the files of the requested source) is not there."""


# --------------------------------------------------------------------------------------------- download
@dataclass(frozen=True)
class RemoteFile:
    """One file as its publisher serves it."""

    filename: str
    base_url: str
    #: Published checksums (lower-case hex) and size; None where the publisher gives none.
    sha256: Optional[str] = None
    md5: Optional[str] = None
    size: Optional[int] = None
    #: Where the checksums come from, or why there are none.
    checksum_source: str = TOFU
    #: A zip whose members go into the dataset folder (a single top-level folder is stripped).
    extract: bool = False

    def url(self, mirror: Optional[str] = None) -> str:
        base = mirror if mirror else self.base_url
        return base.rstrip("/") + "/" + self.filename

    @property
    def published(self) -> bool:
        return bool(self.sha256 or self.md5)


@dataclass(frozen=True)
class DownloadSpec:
    name: str
    description: str
    files: Tuple[RemoteFile, ...]
    #: Files the readers need, each a tuple of acceptable alternatives; all present = nothing to download.
    required: Tuple[Tuple[str, ...], ...]
    homepage: str = ""
    terms: str = ""

    def is_complete(self, folder: Path) -> bool:
        return all(any((folder / alt).is_file() for alt in alts) for alts in self.required)

    def missing(self, folder: Path) -> List[str]:
        return [" or ".join(alts) for alts in self.required if not any((folder / a).is_file() for a in alts)]


@functools.lru_cache(maxsize=None)
def published_checksums() -> Dict[str, dict]:
    """``checksums.json``: file name -> ``sha256``, ``md5``, ``size``, ``source`` (and ``provenance``)."""
    text = resources.files(__package__).joinpath(CHECKSUMS_JSON).read_text(encoding="utf-8")
    return json.loads(text)["files"]


def remote_file(filename: str, base_url: str, *, extract: bool = False) -> RemoteFile:
    """``filename`` at ``base_url`` with its published checksums, if ``checksums.json`` lists it (else trust on first
    use)."""
    c = published_checksums().get(filename, {})
    return RemoteFile(filename, base_url, sha256=c.get("sha256"), md5=c.get("md5"), size=c.get("size"),
                      checksum_source=c.get("source", TOFU), extract=extract)


# ---------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Source:
    """One raw layout of a dataset: interaction file(s) and an optional catalogue."""

    name: str
    description: str
    #: Alternative file names (relative to the dataset folder): the first one present is read.
    interactions: Tuple[str, ...]
    spec: InteractionSpec
    catalogue: Tuple[str, ...] = ()
    catalogue_spec: Optional[CatalogueSpec] = None
    #: ``(catalogue spec, dataset folder, names present there) -> catalogue spec``: settings read from the folder
    #: (ML-100K's genre names from ``u.genre``); None: the spec as it is.
    adapt_catalogue: Optional[Callable[[CatalogueSpec, str, set], CatalogueSpec]] = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    sources: Tuple[Source, ...]
    homepage: str = ""
    #: What ``eimf data download`` (and ``data.download=auto``) fetches; None: not downloadable.
    download: Optional[DownloadSpec] = None

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise DataError(f"dataset {self.name!r} has no source {name!r}; sources: "
                        f"{', '.join(s.name for s in self.sources)} (or auto)")


@dataclass
class Inputs:
    """What to read for one prepare run."""

    dataset: str
    source: str
    #: Dataset folder (built-in datasets) or None (custom).
    root: Optional[str]
    interaction_files: List[str]
    interaction_spec: InteractionSpec
    catalogue_files: List[str] = field(default_factory=list)
    catalogue_spec: Optional[CatalogueSpec] = None
