"""Run a grid of trainings and write a mean ± std comparison table.

Backbones alone (datasets x backbones x seeds, with the MostPopular baseline):

    python jobs/experiments.py --datasets ml-1m amazon-beauty --backbones comirec_sa comirec_dr \\
        --seeds 1 2 3 --output docs/results_backbones.md [key=value overrides for every run]

EIMF against its backbone, with ablations (``--variants``; see eimf.experiments.VARIANTS), all runs children of one
MLflow parent run ``--name`` in one experiment (``--experiment``):

    python jobs/experiments.py --datasets ml-100k --backbones comirec_sa --seeds 1 2 3 \\
        --variants backbone eimf no-sp no-ma random budget-1% --name eimf-ml100k --output docs/results_eimf.md

Each run is a pipeline run (eimf/pipeline/, named ``<name>-<dataset>-<backbone>[-<variant>]-s<seed>``) whose
stages live in the pipelines' stage store (``--work-dir``, default ``pipeline.storage_path``): the runs share their
prepare stage, the first seed's backbone run is the warm-up that picks the typical users (``train.max_steps``
steps), and each annotation set is computed once; ``jobs/pipeline.py`` with the same settings reuses them. Runs
already in the ``.jsonl`` next to the output are skipped, so a grid cut short resumes (and its interrupted
pipeline resumes its stage); a backbone grid whose ``.jsonl`` has runs from other overrides stops instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import List, Optional

from eimf.cli import exits_2_on_user_error
from eimf.config import BACKBONES, ConfigError, apply_overrides, load_config
from eimf.experiments import (VARIANTS, format_eimf_table, format_table, format_where_table, resolve_variant,
                              run_eimf_grid, run_grid)


@dataclass
class GridArguments:
    datasets: List[str] = field(default_factory=lambda: ["ml-1m"], metadata={"help": "built-in dataset names"})
    backbones: List[str] = field(default_factory=lambda: ["comirec_sa", "comirec_dr"],
                                 metadata={"help": "comirec_sa | comirec_dr | mind | remi"})
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3], metadata={"help": "train.seed of each run"})
    variants: Optional[List[str]] = field(default=None, metadata={
        "help": "EIMF grid: these variants against the backbone (eimf.experiments.VARIANTS); default: backbones alone"})
    name: str = field(default="eimf-grid", metadata={"help": "EIMF grid: the parent MLflow run (same name resumes)"})
    experiment: str = field(default="eimf-experiments", metadata={"help": "EIMF grid: the MLflow experiment"})
    work_dir: Optional[str] = field(default=None, metadata={
        "help": "the runs' pipeline storage: their stage store and run folders (default pipeline.storage_path, "
                "else <EIMF_HOME>/pipelines, which jobs/pipeline.py shares)"})
    config: Optional[str] = field(default=None, metadata={"help": "YAML file for every run"})
    output: str = field(default="docs/results_backbones.md", metadata={"help": "the Markdown table"})
    raw: Optional[str] = field(default=None, metadata={
        "help": "each run's metrics as JSON lines, appended (default: <output>.jsonl)"})
    per_user_dir: Optional[str] = field(default=None, metadata={
        "help": "each run's per-user metric tables, kept for paired comparisons (default: per_user/<name> beside "
                "the .jsonl, which stores their paths relative to itself)"})
    split: str = field(default="test", metadata={
        "help": "test: score and compare on test | valid: score the final models on valid only and compare there "
                "(choosing settings without reading test)"})

    def __post_init__(self):
        bad = []
        for v in self.variants or []:
            try:
                resolve_variant(v)
            except ValueError:
                bad.append(v)
        if bad:
            raise ConfigError(f"--variants: unknown {', '.join(bad)}; known: {', '.join(sorted(VARIANTS))} "
                              "(or name[key=value,...])")
        if self.split not in ("valid", "test"):
            raise ConfigError(f"--split must be valid or test, got {self.split!r}")
        if not self.datasets or not self.backbones or not self.seeds:
            raise ConfigError("--datasets, --backbones and --seeds need at least one value each")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds repeats a seed: {self.seeds}")
        unknown = [b for b in self.backbones if b not in BACKBONES]
        if unknown:
            raise ConfigError(f"--backbones must be one of {', '.join(BACKBONES)}, got {', '.join(unknown)}")


def parse_args(argv=None):
    """``(GridArguments, overrides)``, the parser built from the dataclass fields (as jobs/pipeline.py)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(GridArguments):
        default = f.default_factory() if f.default is MISSING else f.default
        kind = int if "int" in str(f.type) else str
        many = "List" in str(f.type)
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=default, type=kind,
                       nargs="+" if many else None, help=f.metadata["help"])
    p.add_argument("overrides", nargs="*", help="key=value overrides of eimf.config.Config for every run")
    ns = p.parse_args(argv)
    try:
        args = GridArguments(**{f.name: getattr(ns, f.name) for f in fields(GridArguments)})
    except ConfigError as e:
        p.error(str(e))
    return args, ns.overrides


@exits_2_on_user_error("experiments")
def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    raw = Path(args.raw or Path(args.output).with_suffix(".jsonl"))
    split_overrides = ["eval.score_test=false"] if args.split == "valid" else []
    t0 = time.time()
    if args.variants:
        base = load_config(args.config, [f"tracking.experiment={args.experiment}", *overrides, *split_overrides])
        for spec in args.variants:  # every variant's settings checked now, not when its run comes up
            v = resolve_variant(spec)
            apply_overrides(base, [*(v.annotation or ()), *v.train, *(v.overlay or ())])
        per_user = Path(args.per_user_dir or raw.parent / "per_user" / args.name)
        rows = run_eimf_grid(base, args.datasets, args.backbones, args.seeds, args.variants, raw_path=raw,
                             grid_name=args.name, out_dir=args.work_dir, per_user_dir=per_user)
        table = format_eimf_table(rows, split=args.split)
        if any(r.get("variant") == "no-aux" for r in rows):
            table += "\n\nAgainst the sampler control: each EIMF variant against `no-aux` (the same batches, both " \
                     "auxiliary weights 0), so Δ is what the auxiliary losses add.\n\n" + \
                     format_eimf_table(rows, split=args.split, reference="no-aux")
        where = format_where_table(rows, split=args.split,
                                   data_paths={r["dataset"]: r["data_path"] for r in rows if r.get("data_path")})
        if where.count("\n") > 1:
            table += f"\n\nWhere the change lies: Δ {args.split} recall@50 by quartile of the user's history length " \
                     "and of the popularity of the held-out items (per-user paired bootstrap within each quartile)." \
                     "\n\n" + where
    else:
        base = load_config(args.config, [*overrides, *split_overrides])
        per_user = Path(args.per_user_dir or raw.parent / "per_user" / Path(args.output).stem)
        rows = run_grid(base, args.datasets, args.backbones, args.seeds, raw_path=raw, overrides=overrides,
                        per_user_dir=per_user, grid_name=Path(args.output).stem, out_dir=args.work_dir)
        table = format_table(rows, split=args.split)
    command = "python jobs/experiments.py " + " ".join(sys.argv[1:] if argv is None else argv)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(f"<!-- generated by: {command} ({time.time() - t0:.0f} s) -->\n\n{table}\n")
    print(table)
    print(json.dumps({"runs": len(rows), "seconds": round(time.time() - t0)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
