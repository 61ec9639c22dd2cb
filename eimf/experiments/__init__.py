"""Experiments: grids of pipelines and their results tables.

    variants.py   the named variants of an EIMF grid (:data:`VARIANTS`) and ``name[key=value,...]`` specs
    grid.py       a grid as a set of pipeline runs (eimf.pipeline) sharing their stages: backbones alone
                  (:func:`run_grid`) or EIMF against its backbone (:func:`run_eimf_grid`)
    tables.py     a grid's rows (``.jsonl``), per-user tables and the Markdown tables made from them
"""
from eimf.experiments.grid import (PER_USER_SPLITS, cell_config, cell_stages, run_cell, run_eimf_grid, run_grid,
                                   save_per_user, score_on_test, scored_splits)
from eimf.experiments.tables import (COST_COLUMNS, SUMMARY_PAIRS, TABLE_METRICS, append_row, by_variant_and_seed,
                                     format_eimf_table, format_summary, format_table, format_where_table,
                                     load_per_user, metric_key, read_rows, summary_rows)
from eimf.experiments.variants import VARIANTS, Variant, resolve_variant, with_overrides

__all__ = ["COST_COLUMNS", "PER_USER_SPLITS", "SUMMARY_PAIRS", "TABLE_METRICS", "VARIANTS", "Variant", "append_row",
           "by_variant_and_seed", "cell_config", "cell_stages", "format_eimf_table", "format_summary",
           "format_table", "format_where_table", "load_per_user", "metric_key", "read_rows", "resolve_variant",
           "run_cell", "run_eimf_grid", "run_grid", "save_per_user", "score_on_test", "scored_splits",
           "summary_rows", "with_overrides"]
