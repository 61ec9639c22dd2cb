"""What every parser shares: the read settings (:class:`InteractionSpec`, :class:`CatalogueSpec`), the result
(:class:`ParseResult`), drop accounting (:class:`Drops`) and the errors (:class:`DataError`), plus decompression and
format detection. See :mod:`eimf.data.parsers` for the tables the parsers return and the drop reasons.
"""
from __future__ import annotations

import bz2
import collections
import gzip
import lzma
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import pandas as pd

INTERACTION_FORMATS = ("csv", "tsv", "parquet", "jsonl", "sequences", "dat")
#: Catalogue formats every dataset may use (:mod:`eimf.data.parsers.catalogues`); datasets add their own layouts.
TABLE_FORMATS = ("csv", "tsv", "parquet", "jsonl", "dat")
BAD_ROW_POLICIES = ("drop", "error")
MAX_EXAMPLES = 5


class DataError(ValueError):
    """Input data that cannot be used; the message says which file, line and field, or what to do."""


class EmptyFileError(DataError):
    """A file holds no data rows."""


class Drops(collections.Counter):
    """Rows dropped, by reason, with a few ``file:line`` examples per reason."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.examples: Dict[str, List[str]] = {}

    def add(self, reason: str, n: int = 1, examples: Sequence[str] = ()) -> None:
        if n <= 0:
            return
        self[reason] += int(n)
        ex = self.examples.setdefault(reason, [])
        ex.extend(list(examples)[: MAX_EXAMPLES - len(ex)])

    def merge(self, other: "Drops") -> "Drops":
        for reason, n in other.items():
            self.add(reason, n, getattr(other, "examples", {}).get(reason, ()))
        return self

    def to_dict(self) -> dict:
        return {"counts": {k: int(v) for k, v in sorted(self.items())},
                "examples": {k: list(v) for k, v in sorted(self.examples.items()) if k in self}}

    @classmethod
    def from_dict(cls, d: dict) -> "Drops":
        out = cls()
        for k, v in d.get("counts", {}).items():
            out.add(k, v, d.get("examples", {}).get(k, ()))
        return out


@dataclass
class InteractionSpec:
    """How to read one interaction file."""

    #: csv | tsv | parquet | jsonl | sequences (``user item item ...`` per line) | dat (``::``) | auto
    format: str = "auto"
    user_col: str = "user_id"
    item_col: str = "item_id"
    #: None: no time; the order is the row order in the file.
    time_col: Optional[str] = "timestamp"
    numeric_ids: bool = True
    on_bad_rows: str = "drop"
    #: Delimiter override (csv ``,``, tsv ``\\t``, dat ``::``).
    sep: Optional[str] = None
    #: Delimited files: the first line names the columns. Otherwise ``names`` does.
    header: bool = True
    names: Optional[List[str]] = None
    encoding: str = "utf-8"


@dataclass
class CatalogueSpec:
    """How to read one item catalogue file."""

    #: csv | tsv | parquet | jsonl | dat | ml1m-movies | ml100k-items | p5-datamaps | auto
    format: str = "auto"
    item_col: str = "item_id"
    #: Columns joined (``" | "``) into the item text; list values are joined with ``", "``.
    text_cols: List[str] = field(default_factory=lambda: ["title"])
    numeric_ids: bool = True
    on_bad_rows: str = "drop"
    sep: Optional[str] = None
    header: bool = True
    names: Optional[List[str]] = None
    encoding: str = "utf-8"
    #: ml100k-items: genre names in flag order (content of ``u.genre``); None: the standard 19.
    genre_names: Optional[List[str]] = None


@dataclass
class ParseResult:
    table: pd.DataFrame
    drops: Drops
    rows_in: int
    has_time: bool = False
    blank_lines: int = 0
    #: Lines of a sequence file with a user but no items (no interaction is lost).
    empty_sequences: int = 0

    @property
    def rows_kept(self) -> int:
        return len(self.table)


def decompress(raw: bytes) -> bytes:
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    return raw


_COMPRESSED_EXT = (".gz", ".bz2", ".xz")
_EXT_FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".dat": "dat",
}


def detect_format(path: str) -> str:
    """The format implied by a file name (``.csv``, ``.tsv.gz``, ``.parquet``, ``.jsonl``, ``.json``, ``.dat``)."""
    name = path.rsplit("/", 1)[-1].lower()
    for ext in _COMPRESSED_EXT:
        if name.endswith(ext):
            name = name[: -len(ext)]
    for ext, fmt in _EXT_FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise DataError(
        f"{path}: cannot tell the format from the file name; set data.format= to one of "
        f"csv, tsv, parquet, jsonl, sequences"
    )


def check_policy(policy: str) -> None:
    if policy not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_rows must be one of {BAD_ROW_POLICIES}, got {policy!r}")


def empty_file(path: str, what: str = "no data rows") -> EmptyFileError:
    return EmptyFileError(f"{path}: file is empty ({what})")

