"""Generic item catalogue tables (csv, tsv, ``::``, Parquet, JSON lines): ``spec.item_col`` plus ``spec.text_cols``
joined into the item text. A dataset's own catalogue layouts (MovieLens' ``movies.dat``, ...) are parsed in its
module of :mod:`eimf.data.datasets`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from eimf.data.parsers.interactions import read_delimited, read_jsonl, read_parquet
from eimf.data.parsers.spec import CatalogueSpec, DataError, ParseResult, detect_format
from eimf.data.parsers.validate import catalogue_table, join_text


def parse_catalogue_table(path: str, raw: bytes, spec: CatalogueSpec, fmt: Optional[str] = None) -> ParseResult:
    """csv / tsv / dat / parquet / jsonl catalogue: ``spec.item_col`` plus ``spec.text_cols``."""
    fmt = fmt or (spec.format if spec.format != "auto" else detect_format(path))
    extra_bad, blank, unit = None, 0, "line"
    if fmt in ("csv", "tsv", "dat"):
        df, lines, extra_bad, blank = read_delimited(path, raw, spec, fmt, [spec.item_col])
        cols = {c: (df[c].tolist() if c in df.columns else [None] * len(df)) for c in [spec.item_col, *spec.text_cols]}
    elif fmt == "parquet":
        df = read_parquet(path, raw, [spec.item_col], spec.text_cols)
        lines, unit = np.arange(1, len(df) + 1, dtype=np.int64), "row"
        cols = {c: (df[c].tolist() if c in df.columns else [None] * len(df)) for c in [spec.item_col, *spec.text_cols]}
    elif fmt == "jsonl":
        cols, lines, extra_bad, blank = read_jsonl(path, raw, [spec.item_col, *spec.text_cols], spec.encoding)
    else:
        raise DataError(f"{path}: unknown catalogue format {fmt!r}")
    texts = [join_text(parts) for parts in zip(*(cols[c] for c in spec.text_cols))] if spec.text_cols \
        else [""] * len(lines)
    table, drops = catalogue_table(path, cols[spec.item_col], texts, lines, spec, extra_bad, unit,
                                   "invalid_json" if fmt == "jsonl" else "wrong_field_count")
    return ParseResult(table, drops, rows_in=len(lines), blank_lines=blank)

