"""A grid's results: its rows (one JSON line per run, :func:`read_rows` / :func:`append_row`), each run's per-user
tables, and the Markdown tables made from them: mean ± std over seeds (:func:`format_table`), each variant against
the backbone with per-user paired bootstrap CIs (:func:`format_eimf_table`), where the change lies
(:func:`format_where_table`) and several grids' comparisons in one table (:func:`format_summary`)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from eimf.formats.prepared import load_prepared
from eimf.evaluation.compare import delta_by_quartile, paired_bootstrap, user_features
from eimf.experiments.variants import is_eimf, variant_order
from eimf.formats.model_folder import read_manifest as read_model_manifest


TABLE_METRICS = ["recall@20", "ndcg@20", "hitrate@20", "recall@50", "ndcg@50", "hitrate@50"]
COST_COLUMNS = [("train_seconds", "train s", "{:.0f}"), ("examples_per_s", "ex/s", "{:.0f}"),
                ("peak_rss_mb", "peak MB", "{:.0f}")]


def read_rows(raw_path: Path) -> List[dict]:
    """A grid's rows (its ``.jsonl``; the last row of each run), per-user table paths made absolute:
    :func:`append_row` stores those under the file's folder relative to it, so a results folder keeps its paired
    comparisons wherever it is checked out."""
    raw_path = Path(raw_path)
    if not raw_path.exists():
        return []
    latest: Dict[tuple, dict] = {}  # a run scored on test later appears again: its last row counts
    for line in raw_path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r["dataset"], r["model"], r.get("variant", "backbone"), r["seed"])] = r
    rows = list(latest.values())
    for r in rows:
        if r.get("per_user"):
            r["per_user"] = {s: p if "://" in p or Path(p).is_absolute() else str(raw_path.parent / p)
                             for s, p in r["per_user"].items()}
    return rows


def append_row(raw_path: Path, row: dict) -> None:
    """Append ``row`` to a grid's ``.jsonl``; per-user tables under its folder are written as relative paths."""
    raw_path = Path(raw_path)
    stored = dict(row)
    if row.get("per_user"):
        home = raw_path.parent.resolve()

        def rel(p: str) -> str:
            if "://" in p:
                return p
            try:
                return str(Path(p).resolve().relative_to(home))
            except ValueError:
                return p

        stored["per_user"] = {s: rel(p) for s, p in row["per_user"].items()}
    with raw_path.open("a") as f:
        f.write(json.dumps(stored) + "\n")


def metric_key(split: str, metric: str) -> str:
    """Where a run's metrics hold ``metric`` of ``split``'s final scoring (valid: of the best weights)."""
    return f"best_valid/{metric}" if split == "valid" else f"{split}/{metric}"


def load_per_user(row: dict, split: str):
    """The per-user table a grid row points to, or None (rows from before per-user tables were kept)."""
    path = (row.get("per_user") or {}).get(split)
    return pd.read_parquet(path) if path and Path(path).exists() else None


def format_table(rows: List[dict], split: str = "test") -> str:
    """Markdown: one line per (dataset, model), mean +- std over seeds of each metric and cost."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["model"])].append(r["metrics"])
    head = ["dataset", "model", "seeds"] + list(TABLE_METRICS) + [c[1] for c in COST_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dataset, model), ms in sorted(groups.items()):
        cells = [dataset, model, str(len(ms))]
        for m in TABLE_METRICS:
            vals = np.array([x[metric_key(split, m)] for x in ms if metric_key(split, m) in x])
            cells.append(f"{vals.mean():.4f} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.4f}" if len(vals) else "-")
        for key, _, fmt in COST_COLUMNS:
            vals = [x[key] for x in ms if key in x]
            cells.append(fmt.format(float(np.mean(vals))) if vals else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_variant_and_seed(rows: List[dict]) -> Dict[Tuple[str, str], Dict[str, Dict[int, dict]]]:
    """``{(dataset, model): {variant: {seed: row}}}``: how every EIMF table pairs a grid's runs."""
    groups: Dict[Tuple[str, str], Dict[str, Dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        groups[(r["dataset"], r["model"])][r.get("variant", "backbone")][r["seed"]] = r
    return groups


def _mean_std(vals: Sequence[float]) -> Tuple[float, float]:
    a = np.asarray(vals, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def format_eimf_table(rows: List[dict], split: str = "test", metrics: Sequence[str] = ("recall@20", "recall@50"),
                      n_boot: int = 10_000, reference: str = "backbone") -> str:
    """Markdown per (dataset, backbone): one line per variant, mean ± std over seeds of every metric; against the
    ``reference`` variant (the backbone; ``no-aux`` asks what the auxiliary losses add over the same batches) on
    the same seeds, Δ of each of ``metrics`` with its per-user paired bootstrap 95 % CI
    (:mod:`eimf.evaluation.compare`), the per-seed Δ of the last one, and a verdict from its CI (gain / loss /
    no difference). Rows without per-user tables fall back to the per-seed mean ± std and no verdict. Against a
    reference other than the backbone only the EIMF variants are listed."""
    groups = by_variant_and_seed(rows)
    head = (["dataset", "model", "variant", "seeds"] + list(TABLE_METRICS)
            + [f"Δ {m} [95 % CI]" for m in metrics] + [f"per-seed Δ {metrics[-1]}", "verdict", "train s", "ex/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dataset, model), by_variant in sorted(groups.items()):
        base = by_variant.get(reference, {})
        if not base:
            continue
        base_tables = {s: load_per_user(r, split) for s, r in base.items()}
        for name in sorted(by_variant, key=variant_order):
            if reference != "backbone" and name != reference and not is_eimf(name):
                continue
            runs = {seed: r for seed, r in by_variant[name].items() if metric_key(split, metrics[-1]) in r["metrics"]}
            if not runs:  # e.g. runs that chose settings on valid, in a table of test
                continue
            ms = [r["metrics"] for r in runs.values()]
            cells = [dataset, model, name, str(len(ms))]
            for m in TABLE_METRICS:
                vals = [x[metric_key(split, m)] for x in ms if metric_key(split, m) in x]
                cells.append("{:.4f} ± {:.4f}".format(*_mean_std(vals)) if vals else "-")
            paired = [s for s in runs if s in base]
            if name == reference or not paired:
                cells += ["-"] * (len(metrics) + 2)
            else:
                tables = {s: load_per_user(runs[s], split) for s in paired}
                complete = all(tables[s] is not None and base_tables[s] is not None for s in paired)
                delta = None
                for m in metrics:
                    if complete:
                        delta = paired_bootstrap({s: tables[s] for s in paired},
                                                 {s: base_tables[s] for s in paired}, m, n_boot=n_boot)
                        cells.append(delta.describe())
                    else:  # older rows: per-seed differences only
                        key = metric_key(split, m)
                        diffs = [runs[s]["metrics"][key] - base[s]["metrics"][key] for s in paired]
                        cells.append("{:+.4f} ± {:.4f} (per seed)".format(*_mean_std(diffs)))
                key = metric_key(split, metrics[-1])
                cells.append(", ".join(f"{runs[s]['metrics'][key] - base[s]['metrics'][key]:+.4f}"
                                       for s in sorted(paired)))
                cells.append(delta.verdict if delta is not None else "-")
            for k, fmt in (("train_seconds", "{:.0f}"), ("examples_per_s", "{:.0f}")):
                vals = [x[k] for x in ms if k in x]
                cells.append(fmt.format(float(np.mean(vals))) if vals else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_where_table(rows: List[dict], split: str = "test", metric: str = "recall@50",
                       n_boot: int = 10_000, data_paths: Optional[Dict[str, str]] = None) -> str:
    """Markdown: each variant's Δ ``metric`` against the backbone by quartile of history length and of target
    popularity (per-user paired bootstrap within each quartile). Variants without per-user tables are left out.
    ``data_paths``: dataset -> prepared folder (default: the first run's ``data_path``, else the one its export
    names)."""
    groups = by_variant_and_seed(rows)
    head = ["dataset", "model", "variant", "by"] + [f"Q{k} Δ [95 % CI] (range)" for k in range(1, 5)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dataset, model), by_variant in sorted(groups.items()):
        base = by_variant.get("backbone", {})
        base_tables = {s: load_per_user(r, split) for s, r in base.items()}
        features = None
        for name in sorted(by_variant, key=variant_order):
            runs = by_variant[name]
            paired = [s for s in runs if s in base and base_tables[s] is not None]
            tables = {s: load_per_user(runs[s], split) for s in paired}
            if name == "backbone" or not paired or any(t is None for t in tables.values()):
                continue
            if features is None:
                first = runs[paired[0]]
                path = (data_paths or {}).get(dataset) or first.get("data_path") or \
                    read_model_manifest(first["export_dir"]).get("data_path")
                data = load_prepared(path)
                features = user_features(getattr(data, split), data.train).set_index("user")
            for col in ("history_length", "target_popularity"):
                quart = delta_by_quartile(tables, {s: base_tables[s] for s in paired}, metric, features[col],
                                          n_boot=n_boot)
                cells = [f"{q['delta']:+.4f} [{q['low']:+.4f}, {q['high']:+.4f}] ({q['range']})" for q in quart]
                lines.append("| " + " | ".join([dataset, model, name, col.replace("_", " ")] + cells) + " |")
    return "\n".join(lines)


#: The summary's comparisons: (treated, reference) variant pairs, each a column when a grid has both.
SUMMARY_PAIRS = (("eimf", "backbone"), ("eimf", "no-aux"), ("eimf", "text-init"), ("no-aux", "backbone"),
                 ("text-init", "backbone"))


def _arm(runs: Dict[int, dict], seeds: Sequence[int], split: str):
    tables = {s: load_per_user(runs[s], split) for s in seeds}
    return tables if all(t is not None for t in tables.values()) else None


def summary_rows(rows: List[dict], split: str = "test", metrics: Sequence[str] = ("recall@20", "recall@50"),
                 pairs: Sequence[Tuple[str, str]] = SUMMARY_PAIRS, n_boot: int = 10_000) -> List[dict]:
    """One record per (dataset, model, treated, reference) of ``pairs`` present in ``rows``: seeds paired, each
    arm's mean ± std of the last metric, and Δ of each metric with its per-user paired bootstrap 95 % CI."""
    groups = by_variant_and_seed(rows)
    out = []
    for (dataset, model), by_variant in sorted(groups.items()):
        for treated, reference in pairs:
            a, b = by_variant.get(treated, {}), by_variant.get(reference, {})
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            ta, tb = _arm(a, seeds, split), _arm(b, seeds, split)
            if ta is None or tb is None:
                continue
            rec = {"dataset": dataset, "model": model, "treated": treated, "reference": reference, "seeds": seeds}
            key = metric_key(split, metrics[-1])
            rec["treated_mean"], rec["treated_std"] = _mean_std([a[s]["metrics"][key] for s in seeds])
            rec["reference_mean"], rec["reference_std"] = _mean_std([b[s]["metrics"][key] for s in seeds])
            rec["deltas"] = {m: paired_bootstrap(ta, tb, m, n_boot=n_boot) for m in metrics}
            out.append(rec)
    return out


def format_summary(named_rows: Sequence[Tuple[str, List[dict]]], split: str = "test",
                   metrics: Sequence[str] = ("recall@20", "recall@50"), n_boot: int = 10_000) -> str:
    """Markdown: the comparisons of :data:`SUMMARY_PAIRS` found in each named grid, one line each."""
    last = metrics[-1]
    head = (["grid", "dataset", "model", "comparison", "seeds", f"{split} {last} (treated)",
             f"{split} {last} (reference)"] + [f"Δ {m} [95 % CI]" for m in metrics] + [f"per-seed Δ {last}", "verdict"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in named_rows:
        for rec in summary_rows(rows, split, metrics, n_boot=n_boot):
            d = rec["deltas"]
            lines.append("| " + " | ".join([
                name, rec["dataset"], rec["model"], f"{rec['treated']} vs {rec['reference']}", str(len(rec["seeds"])),
                f"{rec['treated_mean']:.4f} ± {rec['treated_std']:.4f}",
                f"{rec['reference_mean']:.4f} ± {rec['reference_std']:.4f}",
                *[d[m].describe() for m in metrics],
                ", ".join(f"{d[last].per_seed[s]:+.4f}" for s in d[last].seeds), d[last].verdict]) + " |")
    return "\n".join(lines)
