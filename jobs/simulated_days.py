"""Simulated days (docs/cold_start.md, "Warm start against retraining"): each day the log grows by a slice; one arm
retrains from scratch on everything, the other warm-starts from yesterday's model, on the same data (``--replay 1``)
or on the new slice and a replayed share of the older log. Both are scored on the slice after.

    python jobs/simulated_days.py --dataset amazon-beauty --shares 0.55 0.70 0.85 --replay 1 --seeds 1 2 3 \\
        --work /tmp/eimf-days --out docs/cold_start -- model.backbone=comirec_sa train.patience=4 \\
        train.eval_every=500 train.max_steps=40000

The protocol is eimf.experiments.simulated_days. Writes ``<out>/days_<dataset>_<model>.jsonl`` (one row per seed,
day and arm: next-slice metrics, training steps and time, catalogue), the per-user tables under
``<out>/per_user/`` and ``<out>/days_<dataset>_<model>.md``. Trainings whose export is in ``--work`` are reused (their
recorded time too). Arguments after ``--`` are config overrides for every training.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from eimf.cli import exits_2_on_user_error
from eimf.experiments.runs import run_record, train_or_reuse

log = logging.getLogger("simulated_days")
ARMS = ("warm", "scratch", "stale")


def report_tables(rows: list, arms: dict) -> list:
    """Markdown: per day and arm the next-slice metrics and the training cost (mean ± std over seeds), then the
    paired per-user bootstrap of warm against scratch and of each against stale."""
    from eimf.evaluation.compare import paired_bootstrap

    def ms(vals, fmt="{:.4f}"):
        vals = [v for v in vals if v is not None]
        return (fmt + " ± " + fmt).format(np.mean(vals), np.std(vals)) if vals else "—"

    lines = ["| day | trained on | arm | next-slice R@20 | R@50 | N@50 | users | catalogue | truth known | "
             "steps (best) | train min |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for day in sorted({r["day"] for r in rows}):
        for arm in ("day0", *ARMS):
            rs = [r for r in rows if r["day"] == day and r["arm"] == arm]
            if not rs:
                continue
            m = [r["metrics"] for r in rs]
            trained = rs[0]["trained_on"]
            steps = (f"{np.mean([r['steps'] for r in rs]):.0f} ({np.mean([r['best_step'] for r in rs]):.0f})"
                     if rs[0].get("steps") is not None else "—")
            minutes = ms([r.get("train_seconds") and r["train_seconds"] / 60 for r in rs], "{:.1f}")
            lines.append(f"| {day} | {trained} | {arm} | {ms([x['recall@20'] for x in m])} | "
                         f"{ms([x['recall@50'] for x in m])} | {ms([x['ndcg@50'] for x in m])} | {rs[0]['users']} | "
                         f"{np.mean([r['catalogue'] for r in rs]):.0f} | "
                         f"{np.mean([r['truth_known_share'] for r in rs]):.3f} | {steps} | {minutes} |")
    lines += ["", "Paired per-user bootstrap (95 % CI) on the next slice:", "",
              "| day | metric | comparison | Δ [95 % CI] | verdict |", "|---|---|---|---|---|"]
    for day in sorted({d for d, _ in arms}):
        for a, b in (("warm", "scratch"), ("warm", "stale"), ("scratch", "stale")):
            if (day, a) in arms and (day, b) in arms:
                for metric in ("recall@50", "ndcg@50"):
                    d = paired_bootstrap(arms[(day, a)], arms[(day, b)], metric)
                    lines.append(f"| {day} | {metric} | {a} − {b} | {d.describe()} | {d.verdict} |")
    return lines


@exits_2_on_user_error("simulated_days")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--shares", type=float, nargs="+", default=[0.55, 0.70, 0.85],
                   help="the cutoffs as shares of the log's interactions: day 0 trains up to the first; each later "
                        "one adds a day, scored on the slice after it")
    p.add_argument("--replay", type=float, default=1.0,
                   help="warm arm: the share of the older log replayed beside the new slice; 1 (default): all of it, "
                        "the scratch arm's own prepared data")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--work", default="/tmp/eimf-days")
    p.add_argument("--out", default="docs/cold_start")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import dataclasses

    from eimf.config import apply_overrides, load_config
    from eimf.data.preprocess import prepare
    from eimf.experiments import simulated_days as sd
    from eimf.serving.folder import ModelFolder

    # the models of an experiment are logged, not registered: they would otherwise become versions of eimf-<dataset>
    cfg = load_config(overrides=[f"data.dataset={args.dataset}", "tracking.registered_model=''", *args.overrides])
    work, out = Path(args.work), Path(args.out)
    (out / "per_user").mkdir(parents=True, exist_ok=True)
    raw = sd.read_log(cfg.data)
    cuts = sd.day_cutoffs(raw["ts"].to_numpy(), args.shares)
    bounds = cuts + [float("inf")]
    frames = [sd.next_slice_frame(raw, bounds[d], bounds[d + 1], cfg.model.maxlen) for d in range(len(cuts))]
    log.info("%s: cutoffs %s; next-slice users per day %s", args.dataset, [sd.date_of(c) for c in cuts],
             [len(f) for f in frames])

    def data_of(**window) -> str:
        return str(prepare(dataclasses.replace(cfg.data, **window)).path)

    model_name, tag = cfg.model.backbone, f"days_{args.dataset}_{cfg.model.backbone}"
    rows, arms = [], {}

    def record(day, arm, seed, export, name, trained_on):
        folder = ModelFolder.load(export, index=False)
        per_user, scored = sd.score_folder(folder, frames[day], cfg.model.maxlen,
                                           exclude_history=cfg.eval.exclude_history)
        per_user.to_parquet(out / "per_user" / f"{tag}_d{day}_{arm}_s{seed}.parquet", index=False)
        arms.setdefault((day, arm), {})[seed] = per_user
        run = run_record(work, name) if name else {}
        m = run.get("metrics", {})
        rows.append({"dataset": args.dataset, "model": model_name, "day": day, "arm": arm, "seed": seed,
                     "trained_on": trained_on, "cutoff": sd.date_of(cuts[day]), **scored,
                     "metrics": {k: float(per_user[k].mean()) for k in per_user.columns if "@" in k},
                     "steps": m.get("step"), "best_step": m.get("best_step"),
                     "train_seconds": m.get("train_seconds"), "wall_seconds": run.get("wall_seconds"),
                     "warm_start": {k: v for k, v in m.items() if k.startswith("warm_start/")}})

    for seed in args.seeds:
        name0 = f"{tag}-d0-s{seed}"
        day0 = train_or_reuse(cfg, data_of(until=cuts[0]), name0, work, seed)
        record(0, "day0", seed, day0, name0, f"< {sd.date_of(cuts[0])}")
        previous = day0
        for day in range(1, len(cuts)):
            since, until = sd.date_of(cuts[day - 1]), sd.date_of(cuts[day])
            name = f"{tag}-d{day}-scratch-s{seed}"
            export = train_or_reuse(cfg, data_of(until=cuts[day]), name, work, seed)
            record(day, "scratch", seed, export, name, f"< {until}")
            name = f"{tag}-d{day}-warm-r{args.replay:g}-s{seed}"
            warm_cfg = apply_overrides(cfg, [f"pipeline.from_model={previous}"])
            if args.replay >= 1:  # everything: the very data of the scratch arm, so only the start differs
                data, trained_on = data_of(until=cuts[day]), f"< {until}"
            else:
                data = data_of(since=cuts[day - 1], until=cuts[day], replay=args.replay)
                trained_on = f"[{since}, {until}) + {args.replay:g} of the rest"
            previous = train_or_reuse(warm_cfg, data, name, work, seed)
            record(day, "warm", seed, previous, name, trained_on)
            record(day, "stale", seed, day0, None, f"< {sd.date_of(cuts[0])}")
        with open(out / f"{tag}.jsonl", "w") as f:  # rewritten after each seed: a cut run keeps what it had
            f.writelines(json.dumps(r, default=float) + "\n" for r in rows)

    lines = [f"<!-- generated by: python jobs/simulated_days.py {' '.join(argv if argv is not None else sys.argv[1:])}"
             " -->", "", f"{args.dataset}, {model_name}: cutoffs {', '.join(sd.date_of(c) for c in cuts)} (shares "
             f"{' '.join(f'{s:g}' for s in args.shares)}); warm replays {args.replay:g} of the older log; seeds "
             f"{' '.join(map(str, args.seeds))}; mean ± std over seeds.", ""]
    lines += report_tables(rows, arms)
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
