"""Interaction log parsers, ``parse_x(path, raw: bytes, spec) -> ParseResult``: delimited (csv, tsv, ``::``),
Parquet, JSON lines and sequence files (``user item item ...``); :func:`parse_interactions` dispatches on the format.
The delimited, Parquet and JSON-lines readers serve the catalogue parsers too.
"""
from __future__ import annotations

import ast
import csv
import io
import json
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from eimf.data.parsers.spec import (INTERACTION_FORMATS, DataError, InteractionSpec, ParseResult, check_policy,
                                    decompress, detect_format, empty_file)
from eimf.data.parsers.validate import validate_interactions


# ------------------------------------------------------------------------------------------ delimited
def _sep(fmt: str, spec) -> str:
    if spec.sep:
        return spec.sep
    return {"csv": ",", "tsv": "\t", "dat": "::"}[fmt]


def read_delimited(path: str, raw: bytes, spec, fmt: str, needed: Sequence[str], line_offset: int = 0) -> tuple:
    """-> (DataFrame of strings with the needed columns, 1-based lines, too-many-fields mask or None, blank lines).
    ``line_offset``: added to every line number (``raw`` is a block of a larger file, its header put in front)."""
    data = decompress(raw)
    sep = _sep(fmt, spec)
    if len(sep) > 1:  # multi-character separators (MovieLens "::") -> a single byte the C parser handles
        sub = "\x1f"
        data = data.replace(sep.encode(spec.encoding), sub.encode())
        sep = sub
    if not data.strip():
        raise empty_file(path)
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
        raise empty_file(path) from None
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
        raise empty_file(path, "header only" if spec.header else "blank lines only")
    return df, lines, extra_bad, n_blank


def _read_delimited_slow(path: str, data: bytes, sep: str, quoting: int, spec) -> tuple:
    """Rows with too many fields: the csv module, line by line, marking such rows."""
    text = data.decode(spec.encoding)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, quoting=quoting)
    if spec.header:
        try:
            names = next(reader)
        except StopIteration:
            raise empty_file(path) from None
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
    check_policy(spec.on_bad_rows)
    fmt = fmt or (spec.format if spec.format != "auto" else detect_format(path))
    needed = [spec.user_col, spec.item_col] + ([spec.time_col] if spec.time_col else [])
    df, lines, extra_bad, n_blank = read_delimited(path, raw, spec, fmt, needed, line_offset)
    table, drops = validate_interactions(
        path, df[spec.user_col], df[spec.item_col], df[spec.time_col] if spec.time_col else None,
        lines, spec, extra_bad=extra_bad)
    return ParseResult(table, drops, rows_in=len(lines), has_time=bool(spec.time_col), blank_lines=n_blank)


# ---------------------------------------------------------------------------------------------- parquet
def read_parquet(path: str, raw: bytes, needed: Sequence[str], optional: Sequence[str] = ()) -> pd.DataFrame:
    if not raw:
        raise empty_file(path, "0 bytes")
    return read_parquet_columns(path, pa.BufferReader(raw), needed, optional)


def read_parquet_columns(path: str, source, needed: Sequence[str], optional: Sequence[str] = (),
                         row_groups: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """The ``needed`` (and present ``optional``) columns of a Parquet file, of some ``row_groups`` only if given;
    ``source``: a pyarrow file (a buffer, or a file opened for random access: only those columns are read)."""
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
        raise empty_file(path, "0 rows")
    return table.to_pandas()


def interaction_columns(spec: InteractionSpec) -> List[str]:
    """The columns an interaction parser reads (the rest are never decoded)."""
    return [spec.user_col, spec.item_col] + ([spec.time_col] if spec.time_col else [])


def parse_parquet(path: str, raw: bytes, spec: InteractionSpec) -> ParseResult:
    check_policy(spec.on_bad_rows)
    return parse_parquet_frame(path, read_parquet(path, raw, interaction_columns(spec)), spec)


def parse_parquet_frame(path: str, df: pd.DataFrame, spec: InteractionSpec, line_offset: int = 0) -> ParseResult:
    """Validate rows already read from a Parquet file (``line_offset``: the rows before them, e.g. earlier row
    groups read by another task)."""
    check_policy(spec.on_bad_rows)
    lines = np.arange(1, len(df) + 1, dtype=np.int64) + line_offset
    table, drops = validate_interactions(
        path, df[spec.user_col], df[spec.item_col], df[spec.time_col] if spec.time_col else None,
        lines, spec, unit="row")
    return ParseResult(table, drops, rows_in=len(df), has_time=bool(spec.time_col))


# ------------------------------------------------------------------------------------------ json lines
def read_jsonl(path: str, raw: bytes, keys: Sequence[str], encoding: str = "utf-8", line_offset: int = 0) -> tuple:
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
        raise empty_file(path)
    return cols, np.asarray(lines, dtype=np.int64), np.asarray(invalid, dtype=bool), blank


def parse_jsonl(path: str, raw: bytes, spec: InteractionSpec, line_offset: int = 0) -> ParseResult:
    check_policy(spec.on_bad_rows)
    keys = interaction_columns(spec)
    cols, lines, invalid, blank = read_jsonl(path, raw, keys, spec.encoding, line_offset)
    table, drops = validate_interactions(
        path, cols[spec.user_col], cols[spec.item_col], cols[spec.time_col] if spec.time_col else None,
        lines, spec, extra_bad=invalid, extra_reason="invalid_json")
    return ParseResult(table, drops, rows_in=len(lines), has_time=bool(spec.time_col), blank_lines=blank)


# ---------------------------------------------------------------------------------------- sequence files
def parse_sequences(path: str, raw: bytes, spec: InteractionSpec, line_offset: int = 0) -> ParseResult:
    """``user item item ...`` per line (whitespace separated), items in chronological order.

    Rows are interactions (item tokens); ``ts`` is the token's position in the file.
    """
    check_policy(spec.on_bad_rows)
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
        raise empty_file(path, "no sequences" if not empty_seq else "no items after the user ids")
    lines_a = np.asarray(lines, dtype=np.int64)
    no_time = InteractionSpec(**{**spec.__dict__, "time_col": None})
    table, drops = validate_interactions(path, np.asarray(users, dtype=object), np.asarray(items, dtype=object),
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

