"""Parsers for interaction logs and item catalogues, with row-level validation and drop counting.

Every parser has the form ``parse_x(path, raw: bytes, spec) -> ParseResult``; ``path`` is only used in
messages. Compressed input (gzip, bz2, xz) is recognised by its magic bytes, whatever the file name.

Interaction tables have the columns

=========  ================================================================================================
``user``   string (numeric ids normalised: ``" 007"`` -> ``"7"``, ``12.0`` -> ``"12"``)
``item``   string (same)
``ts``     int64 (or float64 when some times have fractions): the order key. Without a time column it is
           the row's position in the file (0, 1, ...)
``row``    int64, 0-based position of the interaction in the file (stable tie-breaker)
``line``   int64, 1-based line (text formats) or row (Parquet) number, used in messages
=========  ================================================================================================

Catalogue tables have ``item`` (string), ``text`` (string) and ``line``.

A malformed row is either dropped and counted by reason in :class:`Drops` (``on_bad_rows="drop"``) or stops
the run with a :class:`DataError` naming the file, the line and the field (``on_bad_rows="error"``). Reasons:
``missing_user``, ``missing_item``, ``missing_time``, ``non_numeric_user``, ``non_numeric_item``,
``non_numeric_time``, ``wrong_field_count`` (a delimited row with too many fields), ``invalid_json``
(a JSON-lines row that is neither JSON nor a Python dict literal, or not an object) and, for catalogues,
``duplicate_item`` (first row wins). By construction ``rows_in == len(table) + drops.total()``. Blank lines
are not rows; their number is reported as ``blank_lines``. A file without any data row raises
:class:`EmptyFileError`.

Line numbers of delimited files assume no quoted field spans several lines (otherwise they are the row
number plus the header).
"""
from __future__ import annotations

import ast
import bz2
import collections
import csv
import gzip
import io
import json
import lzma
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

INTERACTION_FORMATS = ("csv", "tsv", "parquet", "jsonl", "sequences", "dat")
CATALOGUE_FORMATS = ("csv", "tsv", "parquet", "jsonl", "dat", "ml1m-movies", "ml100k-items", "p5-datamaps")
BAD_ROW_POLICIES = ("drop", "error")
MAX_EXAMPLES = 5

#: Genre flag order of MovieLens 100K (the content of ``u.genre``); used when ``u.genre`` is not given.
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]


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


# ------------------------------------------------------------------------------------------------ helpers
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


def _check_policy(policy: str) -> None:
    if policy not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_rows must be one of {BAD_ROW_POLICIES}, got {policy!r}")


def _empty(path: str, what: str = "no data rows") -> EmptyFileError:
    return EmptyFileError(f"{path}: file is empty ({what})")


def _as_series(values) -> pd.Series:
    return values if isinstance(values, pd.Series) else pd.Series(values, dtype=object)


def _strings(values) -> tuple:
    """-> (stripped strings as object ndarray, missing mask). Numbers become their text; integral floats lose ``.0``."""
    s = _as_series(values)
    s = s.reset_index(drop=True)
    if pd.api.types.is_bool_dtype(s.dtype):
        s = s.astype(object)
    if pd.api.types.is_integer_dtype(s.dtype):
        missing = s.isna().to_numpy()
        out = s.astype(str).to_numpy(dtype=object)
        return out, missing
    if pd.api.types.is_float_dtype(s.dtype):
        f = s.to_numpy(dtype="float64", na_value=np.nan)
        missing = np.isnan(f)
        integral = ~missing & np.isfinite(f) & (f == np.floor(f)) & (np.abs(f) < 2**63)
        out = s.astype(str).to_numpy(dtype=object)
        if integral.any():
            out[integral] = f[integral].astype(np.int64).astype(str)
        return out, missing
    if s.dtype == object:
        import pyarrow as pa

        try:  # all strings (or None): convert in C
            s = pd.Series(pa.array(s.to_numpy(), type=pa.string(), from_pandas=True).to_pandas(types_mapper=None),
                          dtype="str")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            s = None
    if s is None:
        s = _as_series(values).reset_index(drop=True)
        # JSON values may be numbers, strings, lists, None
        conv = [
            None if v is None or (isinstance(v, float) and np.isnan(v))
            else (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
            for v in s.tolist()
        ]
        s = pd.Series(conv, dtype="str")
    else:
        s = s.astype("str")
    s = s.str.strip()
    missing = (s.isna() | (s == "")).to_numpy()
    return s.to_numpy(dtype=object, na_value=None), missing


def _int_ids(strs: np.ndarray, missing: np.ndarray) -> tuple:
    """Numeric ids: -> (normalised strings, bad mask among the non-missing)."""
    out = strs.copy()
    bad = np.zeros(len(strs), dtype=bool)
    idx = np.flatnonzero(~missing)
    if len(idx) == 0:
        return out, bad
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = pa.array(strs[idx], type=pa.string())
    try:  # fast path: every id is a plain integer
        ints = pc.cast(arr, pa.int64())
        out[idx] = pc.cast(ints, pa.string()).to_numpy(zero_copy_only=False)
        return out, bad
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    num = pd.to_numeric(pd.Series(strs[idx], dtype="str"), errors="coerce")
    if pd.api.types.is_integer_dtype(num.dtype):
        out[idx] = num.astype("int64").astype(str).to_numpy(dtype=object)
        return out, bad
    f = num.to_numpy(dtype="float64", na_value=np.nan)
    ok = np.isfinite(f) & (f == np.floor(f)) & (np.abs(f) < 2**53)
    bad[idx[~ok]] = True
    good = idx[ok]
    out[good] = f[ok].astype(np.int64).astype(str)
    return out, bad


def _times(values, missing_hint: Optional[np.ndarray] = None) -> tuple:
    """-> (float64 times, missing mask, non-numeric mask). ISO-8601 strings are accepted if no value is a number."""
    s = _as_series(values).reset_index(drop=True)
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        missing = s.isna().to_numpy()
        return _epoch_seconds(s), missing, np.zeros(len(s), dtype=bool)
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        f = s.to_numpy(dtype="float64", na_value=np.nan)
        missing = np.isnan(f)
        return f, missing, np.zeros(len(s), dtype=bool) | (~missing & ~np.isfinite(f))
    strs, missing = _strings(s)
    f = np.full(len(strs), np.nan)
    idx = np.flatnonzero(~missing)
    if len(idx):
        import pyarrow as pa
        import pyarrow.compute as pc

        try:  # fast path: every time is a plain number
            num = pc.cast(pa.array(strs[idx], type=pa.string()), pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            num = pd.to_numeric(pd.Series(strs[idx], dtype="str"), errors="coerce").to_numpy(
                dtype="float64", na_value=np.nan)
        if not np.isfinite(num).any():
            dt = pd.to_datetime(pd.Series(strs[idx], dtype="str"), errors="coerce", utc=True, format="ISO8601")
            ok = dt.notna().to_numpy()
            num = np.full(len(idx), np.nan)
            num[ok] = _epoch_seconds(dt[ok])
        f[idx] = num
    bad = ~missing & ~np.isfinite(f)
    return f, missing, bad


def _epoch_seconds(s: pd.Series) -> np.ndarray:
    """datetime Series (any unit, naive = UTC) -> float seconds since 1970 (NaN where missing)."""
    if s.dt.tz is not None:
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    delta = (s - pd.Timestamp(0)) / pd.Timedelta(seconds=1)
    return delta.to_numpy(dtype="float64", na_value=np.nan)


def _ts_array(f: np.ndarray) -> np.ndarray:
    if len(f) and np.all(f == np.floor(f)) and np.all(np.abs(f) < 2**62):
        return f.astype(np.int64)
    return f.astype(np.float64)


def _fmt(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


class _Checker:
    """Assigns each row its first failing check; raises on the first bad row in error mode."""

    def __init__(self, path: str, n: int, lines: np.ndarray, policy: str, unit: str = "line"):
        self.path, self.n, self.lines, self.policy, self.unit = path, n, lines, policy, unit
        self.code = np.zeros(n, dtype=np.int16)
        self.checks: List[tuple] = []  # (reason, field, problem, values)

    def check(self, mask: np.ndarray, reason: str, fieldname: str, problem: str, values=None) -> None:
        mask = np.asarray(mask, dtype=bool)
        self.checks.append((reason, fieldname, problem, values))
        k = len(self.checks)
        self.code[(self.code == 0) & mask] = k

    def finish(self) -> tuple:
        """-> (keep mask, Drops)."""
        drops = Drops()
        bad = np.flatnonzero(self.code)
        if len(bad) and self.policy == "error":
            i = bad[0]
            reason, fieldname, problem, values = self.checks[self.code[i] - 1]
            value = "" if values is None else f": {_fmt(values[i])}"
            what = "the row" if fieldname == "*" else f"field {fieldname!r}"
            raise DataError(f"{self.path}, {self.unit} {int(self.lines[i])}: {what} {problem}{value} "
                            f"({reason}; use data.on_bad_rows=drop to drop and count such rows)")
        counts = np.bincount(self.code, minlength=len(self.checks) + 1)
        for k, (reason, fieldname, _, _) in enumerate(self.checks, start=1):
            if counts[k]:
                where = np.flatnonzero(self.code == k)[:MAX_EXAMPLES]
                drops.add(reason, counts[k], [f"{self.path}:{int(self.lines[i])} ({fieldname})" for i in where])
        return self.code == 0, drops


def _validate_interactions(path: str, user, item, ts, lines: np.ndarray, spec: InteractionSpec,
                           extra_bad: Optional[np.ndarray] = None, unit: str = "line",
                           extra_reason: str = "wrong_field_count",
                           user_field: Optional[str] = None, item_field: Optional[str] = None) -> tuple:
    n = len(lines)
    ufield, ifield = user_field or spec.user_col, item_field or spec.item_col
    chk = _Checker(path, n, lines, spec.on_bad_rows, unit)
    if extra_bad is not None:
        problem = "is not a JSON object" if extra_reason == "invalid_json" else "has more fields than the header"
        chk.check(extra_bad, extra_reason, "*", problem)
    users, u_missing = _strings(user)
    items, i_missing = _strings(item)
    chk.check(u_missing, "missing_user", ufield, "is missing")
    chk.check(i_missing, "missing_item", ifield, "is missing")
    if ts is not None:
        t, t_missing, t_bad = _times(ts)
        chk.check(t_missing, "missing_time", spec.time_col, "is missing")
    if spec.numeric_ids:
        users, u_bad = _int_ids(users, u_missing)
        items, i_bad = _int_ids(items, i_missing)
        chk.check(u_bad, "non_numeric_user", ufield, "is not an integer id", users)
        chk.check(i_bad, "non_numeric_item", ifield, "is not an integer id", items)
    if ts is not None:
        chk.check(t_bad, "non_numeric_time", spec.time_col, "is not a number (or ISO-8601 time)",
                  _strings(ts)[0])
    keep, drops = chk.finish()
    rows = np.flatnonzero(keep).astype(np.int64)
    table = pd.DataFrame({
        "user": pd.array(users[keep], dtype="str"),
        "item": pd.array(items[keep], dtype="str"),
        "ts": _ts_array(t[keep]) if ts is not None else rows.copy(),
        "row": rows,
        "line": np.asarray(lines, dtype=np.int64)[keep],
    })
    return table, drops


# ------------------------------------------------------------------------------------------ delimited
_PANDAS_FIELD_ERR = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def _sep(fmt: str, spec) -> str:
    if spec.sep:
        return spec.sep
    return {"csv": ",", "tsv": "\t", "dat": "::"}[fmt]


def _read_delimited(path: str, raw: bytes, spec, fmt: str, needed: Sequence[str], line_offset: int = 0) -> tuple:
    """-> (DataFrame of strings with the needed columns, 1-based lines, too-many-fields mask or None, blank lines).
    ``line_offset``: added to every line number (``raw`` is a block of a larger file, its header put in front)."""
    data = decompress(raw)
    sep = _sep(fmt, spec)
    if len(sep) > 1:  # multi-character separators (MovieLens "::") -> a single byte the C parser handles
        sub = "\x1f"
        data = data.replace(sep.encode(spec.encoding), sub.encode())
        sep = sub
    if not data.strip():
        raise _empty(path)
    quoting = csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE
    header_lines = 1 if spec.header else 0
    kwargs = dict(sep=sep, dtype=str, keep_default_na=False, na_values=[""], skip_blank_lines=False,
                  quoting=quoting, encoding=spec.encoding)
    if spec.header:
        kwargs["header"] = 0
    else:
        if not spec.names:
            raise ValueError("header=False needs names=")
        kwargs.update(header=None, names=list(spec.names))
    extra_bad = None
    try:
        df = pd.read_csv(io.BytesIO(data), **kwargs)
        lines = np.arange(len(df), dtype=np.int64) + 1 + header_lines + line_offset
    except pd.errors.EmptyDataError:
        raise _empty(path) from None
    except pd.errors.ParserError:
        df, lines, extra_bad = _read_delimited_slow(path, data, sep, quoting, spec)
        lines = lines + line_offset
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {spec.encoding} text ({e})") from None
    missing_cols = [c for c in needed if c not in df.columns]
    if missing_cols:
        raise DataError(f"{path}: no column {missing_cols[0]!r} (columns: {', '.join(map(str, df.columns))}); "
                        f"set the data.*_col options to the file's column names")
    blank = df.isna().all(axis=1).to_numpy().copy() if len(df.columns) else np.ones(len(df), bool)
    if extra_bad is not None:
        blank &= ~extra_bad
    n_blank = int(blank.sum())
    if n_blank:
        df, lines = df[~blank].reset_index(drop=True), lines[~blank]
        extra_bad = extra_bad[~blank] if extra_bad is not None else None
    if len(df) == 0:
        raise _empty(path, "header only" if spec.header else "blank lines only")
    return df, lines, extra_bad, n_blank


def _read_delimited_slow(path: str, data: bytes, sep: str, quoting: int, spec) -> tuple:
    """Rows with too many fields: the csv module, line by line, marking such rows."""
    text = data.decode(spec.encoding)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, quoting=quoting)
    if spec.header:
        try:
            names = next(reader)
        except StopIteration:
            raise _empty(path) from None
    else:
        names = list(spec.names)
    width = len(names)
    rows, lines, extra = [], [], []
    start = reader.line_num + 1
    for rec in reader:
        lines.append(start)
        start = reader.line_num + 1
        if not rec:
            rows.append([None] * width)
            extra.append(False)
            continue
        extra.append(len(rec) > width)
        rec = [v if v != "" else None for v in rec[:width]] + [None] * max(0, width - len(rec))
        rows.append(rec)
    df = pd.DataFrame(rows, columns=names, dtype=object)
    return df, np.asarray(lines, dtype=np.int64), np.asarray(extra, dtype=bool)


def parse_delimited(path: str, raw: bytes, spec: InteractionSpec, fmt: Optional[str] = None,
                    line_offset: int = 0) -> ParseResult:
    """CSV, TSV or ``::`` files (header line, or ``spec.names``)."""
    _check_policy(spec.on_bad_rows)
    fmt = fmt or (spec.format if spec.format != "auto" else detect_format(path))
    needed = [spec.user_col, spec.item_col] + ([spec.time_col] if spec.time_col else [])
    df, lines, extra_bad, n_blank = _read_delimited(path, raw, spec, fmt, needed, line_offset)
    table, drops = _validate_interactions(
        path, df[spec.user_col], df[spec.item_col], df[spec.time_col] if spec.time_col else None,
        lines, spec, extra_bad=extra_bad)
    return ParseResult(table, drops, rows_in=len(lines), has_time=bool(spec.time_col), blank_lines=n_blank)


# ---------------------------------------------------------------------------------------------- parquet
def _read_parquet(path: str, raw: bytes, needed: Sequence[str], optional: Sequence[str] = ()) -> pd.DataFrame:
    import pyarrow as pa

    if not raw:
        raise _empty(path, "0 bytes")
    return read_parquet_columns(path, pa.BufferReader(raw), needed, optional)


def read_parquet_columns(path: str, source, needed: Sequence[str], optional: Sequence[str] = (),
                         row_groups: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """The ``needed`` (and present ``optional``) columns of a Parquet file, of some ``row_groups`` only if given;
    ``source``: a pyarrow file (a buffer, or a file opened for random access: only those columns are read)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    missing = [c for c in needed if c not in names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)}); "
                        f"set the data.*_col options to the file's column names")
    cols = list(dict.fromkeys([*needed, *(c for c in optional if c in names)]))
    table = pf.read(columns=cols) if row_groups is None else pf.read_row_groups(list(row_groups), columns=cols)
    if table.num_rows == 0:
        raise _empty(path, "0 rows")
    return table.to_pandas()


def interaction_columns(spec: InteractionSpec) -> List[str]:
    """The columns an interaction parser reads (the rest are never decoded)."""
    return [spec.user_col, spec.item_col] + ([spec.time_col] if spec.time_col else [])


def parse_parquet(path: str, raw: bytes, spec: InteractionSpec) -> ParseResult:
    _check_policy(spec.on_bad_rows)
    return parse_parquet_frame(path, _read_parquet(path, raw, interaction_columns(spec)), spec)


def parse_parquet_frame(path: str, df: pd.DataFrame, spec: InteractionSpec, line_offset: int = 0) -> ParseResult:
    """Validate rows already read from a Parquet file (``line_offset``: the rows before them, e.g. earlier row
    groups read by another task)."""
    _check_policy(spec.on_bad_rows)
    lines = np.arange(1, len(df) + 1, dtype=np.int64) + line_offset
    table, drops = _validate_interactions(
        path, df[spec.user_col], df[spec.item_col], df[spec.time_col] if spec.time_col else None,
        lines, spec, unit="row")
    return ParseResult(table, drops, rows_in=len(df), has_time=bool(spec.time_col))


# ------------------------------------------------------------------------------------------ json lines
def _read_jsonl(path: str, raw: bytes, keys: Sequence[str], encoding: str = "utf-8", line_offset: int = 0) -> tuple:
    """-> (dict key -> list of values (None when absent), 1-based lines, invalid mask, blank lines).

    Lines that are not JSON are tried as Python dict literals (the 2014 Amazon metadata files are written so).
    """
    try:
        text = decompress(raw).decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {encoding} text ({e})") from None
    cols: Dict[str, list] = {k: [] for k in keys}
    lines, invalid = [], []
    blank = 0
    loads = json.loads
    for ln, line in enumerate(text.splitlines(), start=1 + line_offset):
        if not line.strip():
            blank += 1
            continue
        try:
            obj = loads(line)
        except ValueError:
            try:
                obj = ast.literal_eval(line.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                obj = None
        lines.append(ln)
        if not isinstance(obj, dict):
            invalid.append(True)
            for k in keys:
                cols[k].append(None)
            continue
        invalid.append(False)
        for k in keys:
            cols[k].append(obj.get(k))
    if not lines:
        raise _empty(path)
    return cols, np.asarray(lines, dtype=np.int64), np.asarray(invalid, dtype=bool), blank


def parse_jsonl(path: str, raw: bytes, spec: InteractionSpec, line_offset: int = 0) -> ParseResult:
    _check_policy(spec.on_bad_rows)
    keys = interaction_columns(spec)
    cols, lines, invalid, blank = _read_jsonl(path, raw, keys, spec.encoding, line_offset)
    table, drops = _validate_interactions(
        path, cols[spec.user_col], cols[spec.item_col], cols[spec.time_col] if spec.time_col else None,
        lines, spec, extra_bad=invalid, extra_reason="invalid_json")
    return ParseResult(table, drops, rows_in=len(lines), has_time=bool(spec.time_col), blank_lines=blank)


# ---------------------------------------------------------------------------------------- sequence files
def parse_sequences(path: str, raw: bytes, spec: InteractionSpec, line_offset: int = 0) -> ParseResult:
    """``user item item ...`` per line (whitespace separated), items in chronological order.

    Rows are interactions (item tokens); ``ts`` is the token's position in the file.
    """
    _check_policy(spec.on_bad_rows)
    try:
        text = decompress(raw).decode(spec.encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {spec.encoding} text ({e})") from None
    users, items, lines = [], [], []
    blank = empty_seq = 0
    for ln, line in enumerate(text.splitlines(), start=1 + line_offset):
        toks = line.split()
        if not toks:
            blank += 1
            continue
        k = len(toks) - 1
        if k == 0:
            empty_seq += 1
            continue
        users.extend([toks[0]] * k)
        items.extend(toks[1:])
        lines.extend([ln] * k)
    if not items:
        raise _empty(path, "no sequences" if not empty_seq else "no items after the user ids")
    lines_a = np.asarray(lines, dtype=np.int64)
    no_time = InteractionSpec(**{**spec.__dict__, "time_col": None})
    table, drops = _validate_interactions(path, np.asarray(users, dtype=object), np.asarray(items, dtype=object),
                                          None, lines_a, no_time, user_field="user", item_field="item")
    return ParseResult(table, drops, rows_in=len(items), has_time=False, blank_lines=blank,
                       empty_sequences=empty_seq)


def parse_interactions(path: str, raw: bytes, spec: InteractionSpec, line_offset: int = 0) -> ParseResult:
    """Dispatch on ``spec.format`` (``auto``: from the file name). ``line_offset`` is added to every line number,
    for a block cut out of a larger text file (a delimited block carries the file's header in front)."""
    fmt = spec.format if spec.format != "auto" else detect_format(path)
    if fmt in ("csv", "tsv", "dat"):
        return parse_delimited(path, raw, spec, fmt, line_offset)
    if fmt == "parquet":
        return parse_parquet(path, raw, spec)
    if fmt == "jsonl":
        return parse_jsonl(path, raw, spec, line_offset)
    if fmt == "sequences":
        return parse_sequences(path, raw, spec, line_offset)
    raise DataError(f"{path}: unknown interaction format {fmt!r}; use one of {', '.join(INTERACTION_FORMATS)}")


# ------------------------------------------------------------------------------------------- catalogues
def _text_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and np.isnan(v):
        return ""
    if isinstance(v, (list, tuple, np.ndarray)):
        flat, seen = [], set()
        stack = list(v)[::-1]
        while stack:
            x = stack.pop()
            if isinstance(x, (list, tuple, np.ndarray)):
                stack.extend(list(x)[::-1])
            elif x is not None and str(x).strip() and str(x).strip() not in seen:
                seen.add(str(x).strip())
                flat.append(str(x).strip())
        return ", ".join(flat)
    return str(v).strip()


def join_text(parts: Sequence) -> str:
    """Non-empty parts joined with ``" | "`` (lists inside a part with ``", "``)."""
    return " | ".join(t for t in (_text_value(p) for p in parts) if t)


def _catalogue_table(path: str, ids, texts: List[str], lines: np.ndarray, spec: CatalogueSpec,
                     extra_bad: Optional[np.ndarray] = None, unit: str = "line",
                     extra_reason: str = "wrong_field_count") -> tuple:
    _check_policy(spec.on_bad_rows)
    chk = _Checker(path, len(lines), lines, spec.on_bad_rows, unit)
    if extra_bad is not None:
        chk.check(extra_bad, extra_reason, "*", "is malformed")
    strs, missing = _strings(ids)
    chk.check(missing, "missing_item", spec.item_col, "is missing")
    if spec.numeric_ids:
        strs, bad = _int_ids(strs, missing)
        chk.check(bad, "non_numeric_item", spec.item_col, "is not an integer id", strs)
    ok_so_far = chk.code == 0
    dup = np.zeros(len(lines), dtype=bool)
    if ok_so_far.any():
        idx = np.flatnonzero(ok_so_far)
        dup[idx] = pd.Series(strs[idx], dtype=object).duplicated(keep="first").to_numpy()
    chk.check(dup, "duplicate_item", spec.item_col, "repeats an item id already listed", strs)
    keep, drops = chk.finish()
    table = pd.DataFrame({
        "item": pd.array(strs[keep], dtype="str"),
        "text": pd.array(np.asarray(texts, dtype=object)[keep], dtype="str"),
        "line": np.asarray(lines, dtype=np.int64)[keep],
    })
    return table, drops


def parse_catalogue_table(path: str, raw: bytes, spec: CatalogueSpec, fmt: Optional[str] = None) -> ParseResult:
    """csv / tsv / dat / parquet / jsonl catalogue: ``spec.item_col`` plus ``spec.text_cols``."""
    fmt = fmt or (spec.format if spec.format != "auto" else detect_format(path))
    extra_bad, blank, unit = None, 0, "line"
    if fmt in ("csv", "tsv", "dat"):
        df, lines, extra_bad, blank = _read_delimited(path, raw, spec, fmt, [spec.item_col])
        cols = {c: (df[c].tolist() if c in df.columns else [None] * len(df)) for c in [spec.item_col, *spec.text_cols]}
    elif fmt == "parquet":
        df = _read_parquet(path, raw, [spec.item_col], spec.text_cols)
        lines, unit = np.arange(1, len(df) + 1, dtype=np.int64), "row"
        cols = {c: (df[c].tolist() if c in df.columns else [None] * len(df)) for c in [spec.item_col, *spec.text_cols]}
    elif fmt == "jsonl":
        cols, lines, extra_bad, blank = _read_jsonl(path, raw, [spec.item_col, *spec.text_cols], spec.encoding)
    else:
        raise DataError(f"{path}: unknown catalogue format {fmt!r}")
    texts = [join_text(parts) for parts in zip(*(cols[c] for c in spec.text_cols))] if spec.text_cols \
        else [""] * len(lines)
    table, drops = _catalogue_table(path, cols[spec.item_col], texts, lines, spec, extra_bad, unit,
                                    "invalid_json" if fmt == "jsonl" else "wrong_field_count")
    return ParseResult(table, drops, rows_in=len(lines), blank_lines=blank)


def parse_ml1m_movies(path: str, raw: bytes, spec: CatalogueSpec) -> ParseResult:
    """MovieLens 1M ``movies.dat``: ``MovieID::Title::Genres`` (latin-1) -> "Title | Genre, Genre"."""
    text = decompress(raw).decode(spec.encoding if spec.encoding != "utf-8" else "latin-1")
    ids, texts, lines, bad = [], [], [], []
    blank = 0
    for ln, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            blank += 1
            continue
        parts = line.split("::")
        lines.append(ln)
        if len(parts) != 3:
            ids.append(parts[0] if parts else None)
            texts.append("")
            bad.append(True)
            continue
        ids.append(parts[0])
        texts.append(join_text([parts[1], [g for g in parts[2].split("|") if g]]))
        bad.append(False)
    if not lines:
        raise _empty(path)
    table, drops = _catalogue_table(path, ids, texts, np.asarray(lines), spec, np.asarray(bad))
    return ParseResult(table, drops, rows_in=len(lines), blank_lines=blank)


def parse_ml100k_items(path: str, raw: bytes, spec: CatalogueSpec) -> ParseResult:
    """MovieLens 100K ``u.item``: ``id|title|release|video release|url|19 genre flags`` (latin-1)."""
    genres = spec.genre_names or ML100K_GENRES
    text = decompress(raw).decode(spec.encoding if spec.encoding != "utf-8" else "latin-1")
    ids, texts, lines, bad = [], [], [], []
    blank = 0
    for ln, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            blank += 1
            continue
        parts = line.split("|")
        lines.append(ln)
        ids.append(parts[0])
        if len(parts) != 5 + len(genres):
            texts.append("")
            bad.append(True)
            continue
        flags = parts[5:]
        names = [g for g, f in zip(genres, flags) if f.strip() == "1"]
        texts.append(join_text([parts[1], names]))
        bad.append(False)
    if not lines:
        raise _empty(path)
    table, drops = _catalogue_table(path, ids, texts, np.asarray(lines), spec, np.asarray(bad))
    return ParseResult(table, drops, rows_in=len(lines), blank_lines=blank)


def parse_ml100k_genres(raw: bytes) -> List[str]:
    """``u.genre`` (``name|index`` lines) -> names in index order."""
    pairs = []
    for line in decompress(raw).decode("latin-1").splitlines():
        if "|" in line:
            name, idx = line.rsplit("|", 1)
            pairs.append((int(idx), name))
    return [n for _, n in sorted(pairs)]


def parse_p5_datamaps(path: str, raw: bytes, spec: CatalogueSpec) -> ParseResult:
    """P5 ``datamaps.json``: ``id2item`` (item id -> ASIN). The text is the ASIN (no titles exist)."""
    try:
        obj = json.loads(decompress(raw).decode("utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: not a JSON document ({e})") from None
    id2item = obj.get("id2item") if isinstance(obj, dict) else None
    if not id2item:
        raise _empty(path, "no id2item map")
    ids = list(id2item.keys())
    texts = [str(v) for v in id2item.values()]
    lines = np.arange(1, len(ids) + 1, dtype=np.int64)
    table, drops = _catalogue_table(path, ids, texts, lines, spec, unit="entry")
    return ParseResult(table, drops, rows_in=len(ids))


def parse_catalogue(path: str, raw: bytes, spec: CatalogueSpec) -> ParseResult:
    fmt = spec.format if spec.format != "auto" else detect_format(path)
    if fmt == "ml1m-movies":
        return parse_ml1m_movies(path, raw, spec)
    if fmt == "ml100k-items":
        return parse_ml100k_items(path, raw, spec)
    if fmt == "p5-datamaps":
        return parse_p5_datamaps(path, raw, spec)
    if fmt in ("csv", "tsv", "dat", "parquet", "jsonl"):
        return parse_catalogue_table(path, raw, spec, fmt)
    raise DataError(f"{path}: unknown catalogue format {fmt!r}; use one of {', '.join(CATALOGUE_FORMATS)}")
