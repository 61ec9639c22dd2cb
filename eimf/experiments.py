"""Grids of runs (datasets x models x seeds) and their mean +- std tables."""
from __future__ import annotations

import copy
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Iterable, List, Optional

import numpy as np

from eimf.config import Config

log = logging.getLogger(__name__)

TABLE_METRICS = ["recall@20", "ndcg@20", "hitrate@20", "recall@50", "ndcg@50", "hitrate@50"]
COST_COLUMNS = [("train_seconds", "train s", "{:.0f}"), ("examples_per_s", "ex/s", "{:.0f}"),
                ("peak_rss_mb", "peak MB", "{:.0f}")]


def _done(raw_path: Path) -> List[dict]:
    if not raw_path.exists():
        return []
    return [json.loads(line) for line in raw_path.read_text().splitlines() if line.strip()]


def run_grid(base: Config, datasets: Iterable[str], models: Iterable[str], seeds: Iterable[int],
             raw_path: Path, overrides: Optional[list] = None) -> List[dict]:
    """Train every (dataset, model, seed); rows already in ``raw_path`` are not run again."""
    from eimf.data.preprocess import load_prepared, prepare
    from eimf.evaluation import most_popular
    from eimf.training.runner import train

    raw_path.parent.mkdir(parents=True, exist_ok=True)
    rows = _done(raw_path)
    have = {(r["dataset"], r["model"], r["seed"]) for r in rows}
    data_paths = {}
    for dataset in datasets:
        cfg_d = copy.deepcopy(base)
        cfg_d.data.dataset = dataset
        data_paths[dataset] = str(prepare(cfg_d.data).path)
        if (dataset, "mostpop", 0) not in have:
            data = load_prepared(data_paths[dataset])
            m = most_popular(data.train, data.test, topk=tuple(base.eval.topk))
            row = {"dataset": dataset, "model": "mostpop", "seed": 0,
                   "metrics": {f"test/{k}": v for k, v in m.items()}}
            rows.append(row)
            with raw_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
    # Seeds outermost: a grid cut short still covers every (dataset, model) pair.
    for seed in seeds:
        for dataset in datasets:
            for model in models:
                if (dataset, model, seed) in have:
                    continue
                cfg = copy.deepcopy(base)
                cfg.data.dataset = dataset
                cfg.model.backbone = model
                cfg.train.seed = seed
                cfg.train.run_name = None
                result = train(cfg, data_path=data_paths[dataset])
                row = {"dataset": dataset, "model": model, "seed": seed, "run": result.run_name,
                       "overrides": overrides or [], "metrics": result.metrics}
                rows.append(row)
                with raw_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                log.info("%s %s seed %d: test recall@50 %.4f", dataset, model, seed,
                         result.metrics.get("test/recall@50", float("nan")))
    return rows


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
            vals = np.array([x[f"{split}/{m}"] for x in ms if f"{split}/{m}" in x])
            cells.append(f"{vals.mean():.4f} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.4f}" if len(vals) else "-")
        for key, _, fmt in COST_COLUMNS:
            vals = [x[key] for x in ms if key in x]
            cells.append(fmt.format(float(np.mean(vals))) if vals else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
