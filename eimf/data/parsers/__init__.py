"""Parsers for interaction logs and item catalogues, with row-level validation and drop counting.

``spec`` (settings, results, drops, errors), ``validate`` (row checks), ``interactions`` (log formats),
``catalogues`` (generic catalogue tables); a dataset's own layouts are parsed in :mod:`eimf.data.datasets`, and
:func:`eimf.data.ingest.parse_catalogue` dispatches over both.

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

from eimf.data.parsers.catalogues import parse_catalogue_table
from eimf.data.parsers.interactions import (interaction_columns, parse_delimited, parse_interactions, parse_jsonl,
                                            parse_parquet, parse_parquet_frame, parse_sequences, read_parquet_columns)
from eimf.data.parsers.spec import (BAD_ROW_POLICIES, INTERACTION_FORMATS, MAX_EXAMPLES, TABLE_FORMATS, CatalogueSpec,
                                    DataError, Drops, EmptyFileError, InteractionSpec, ParseResult, decompress,
                                    detect_format)
from eimf.data.parsers.validate import join_text

__all__ = [
    "BAD_ROW_POLICIES", "INTERACTION_FORMATS", "MAX_EXAMPLES", "TABLE_FORMATS", "CatalogueSpec", "DataError", "Drops",
    "EmptyFileError", "InteractionSpec", "ParseResult", "decompress", "detect_format", "interaction_columns",
    "join_text", "parse_catalogue_table", "parse_delimited", "parse_interactions", "parse_jsonl", "parse_parquet",
    "parse_parquet_frame", "parse_sequences", "read_parquet_columns",
]
