"""The training runner's overhead: the same step inside Ray Train (``jobs/train.py``) against the raw step
(``benchmarks/train_throughput.py``), on the same settings, in alternating rounds so that both see the same machine.

    python benchmarks/runner_overhead.py --dataset ml-1m --backbone comirec_sa --steps 3000 --rounds 2 \\
        --precision fp32 bf16 --output docs/benchmarks/runner_overhead.json

Per round and setting: the raw step's examples/s over ``--steps`` timed steps (after 30 of warm-up), then one
``jobs/train.py`` run of ``--steps`` steps with evaluation off (``train.eval_every`` past the end), read from its
final metrics: the whole run's examples/s (``state.examples / state.train_seconds``: every step, the first ones and
a compiled step's graph building included) and the median of its logged windows after the first (the steady
state). The runner's share = runner / raw. Run it alone on the machine: each figure is a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WINDOW = re.compile(r"step (\d+)\s+loss \S+\s+(\d+) ex/s")


def raw_step(args, precision: str, compile_: str) -> float:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--dataset", args.dataset,
                          "--threads", str(args.threads), "--steps", str(args.steps), "--backbones", args.backbone,
                          "--precision", precision, "--compile", compile_, "--json", "--", *args.overrides],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return float(rows[-1]["examples_per_s"])


def runner(args, precision: str, compile_: str) -> dict:
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), f"data.dataset={args.dataset}",
           f"model.backbone={args.backbone}", f"train.max_steps={args.steps}", "train.eval_every=1000000000",
           f"train.precision={precision}", f"train.compile={'true' if compile_ == 'on' else 'false'}",
           *args.overrides]  # one worker: its threads are the node's cores (eimf.training.worker)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise SystemExit(f"jobs/train.py failed ({out.returncode}):\n{text[-3000:]}")
    final = json.loads(re.findall(r"final: (\{.*\})", text)[-1])
    windows = [int(rate) for _, rate in WINDOW.findall(text)]
    return {"whole_run": float(final["examples_per_s"]),
            "steady": float(statistics.median(windows[1:])) if len(windows) > 1 else float("nan"),
            "windows": windows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--backbone", default="comirec_sa")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="the raw step's threads (the worker takes the node's cores)")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--output")
    p.add_argument("overrides", nargs="*", help="key=value for both sides")
    args = p.parse_args()
    rows = []
    for r in range(args.rounds):
        for precision in args.precision:
            for compile_ in args.compile:
                raw = raw_step(args, precision, compile_)
                ran = runner(args, precision, compile_)
                row = {"round": r + 1, "precision": precision, "compile": compile_, "raw": raw, **ran,
                       "whole_run_share": ran["whole_run"] / raw, "steady_share": ran["steady"] / raw}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{args.backbone}, {args.dataset}, {args.steps} steps, {args.threads} threads\n\n"
          "| round | precision | compile | raw step ex/s | Ray Train whole run ex/s | share | steady ex/s | share |\n"
          "|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['round']} | {r['precision']} | {r['compile']} | {r['raw']:.0f} | {r['whole_run']:.0f} | "
              f"{100 * r['whole_run_share']:.0f} % | {r['steady']:.0f} | {100 * r['steady_share']:.0f} % |")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "date": time.strftime("%Y-%m-%d"),
                                                 "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
