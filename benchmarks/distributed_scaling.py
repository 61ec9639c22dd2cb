"""Ray Train + DeepSpeed on CPU: examples/s and memory per worker for 1-2 workers and ZeRO 0/2/3, and the
memory each configuration spends per catalogue item.

    python benchmarks/distributed_scaling.py --dataset ml-1m --steps 300 --output docs/benchmarks/distributed.md

Part 1 trains the real model on the real dataset through ``eimf.steps.train.train`` (the same code path as
``eimf train``) and reads examples/s, input share and peak RSS of the chief worker from its final report.
Part 2 measures bytes per item: each configuration builds the model for two synthetic catalogue sizes, runs a
few steps (so gradients and Adam states exist), and records every rank's resident memory growth; the
difference between the two sizes divided by the difference in items is the cost of one more item on one worker.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

CONFIGS = [  # (label, workers, strategy, zero stage)
    ("1 worker, torch", 1, "torch", 0),
    ("1 worker, ZeRO-0", 1, "deepspeed", 0),
    ("2 workers, ZeRO-0", 2, "deepspeed", 0),
    ("2 workers, ZeRO-2", 2, "deepspeed", 2),
    ("2 workers, ZeRO-3", 2, "deepspeed", 3),
]


def throughput(args) -> list:
    from eimf.config import load_config
    from eimf.data.preprocess import prepare
    from eimf.steps.train import train

    base = load_config(None, [f"data.dataset={args.dataset}"])
    data_path = str(prepare(base.data).path)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, workers, strategy, stage in CONFIGS:
            cfg = load_config(None, [
                f"data.dataset={args.dataset}", f"train.scaling.num_workers={workers}", f"train.strategy={strategy}",
                f"train.deepspeed.zero_stage={stage}", f"train.max_steps={args.steps}", "train.eval_every=1000000",
                f"train.log_every={args.steps}", f"train.storage_path={tmp}", "tracking.enabled=false",
                f"train.run_name=bench-{workers}-{strategy}-{stage}", f"train.batch_size={args.batch_size}",
            ])
            t0 = time.perf_counter()
            m = train(cfg, data_path=data_path).metrics
            rows.append({
                "config": label, "workers": workers, "zero_stage": stage if strategy == "deepspeed" else None,
                "examples_per_s_per_worker": m["examples_per_s"],
                "examples_per_s_total": m["examples_per_s"] * workers,
                "input_share": m["input_share"], "peak_rss_mb_chief": m["peak_rss_mb"],
                "wall_s": time.perf_counter() - t0,
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _probe(loop_config: dict) -> None:
    """One Ray Train worker: build the model for ``n_items``, take a few steps, record peak memory growth."""
    import numpy as np
    import psutil
    import ray.train
    import torch

    from eimf.config import from_dict
    from eimf.training.components import build_components, peak_rss_mb, per_worker_batch

    torch.set_num_threads(1)
    cfg = from_dict(loop_config["config"])
    n_items, rank = loop_config["n_items"], ray.train.get_context().get_world_rank()
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    micro = per_worker_batch(cfg)
    model, loss_fn, runner, _ = build_components(cfg, n_items, micro)
    if loop_config["strategy"] == "deepspeed":
        from eimf.training.deepspeed_step import DeepSpeedStepRunner, deepspeed_config

        runner = DeepSpeedStepRunner(model, runner.optimizer, deepspeed_config(micro, cfg.train.deepspeed.zero_stage, "fp32"))
    rng = np.random.default_rng(rank)
    for _ in range(3):
        hist = torch.as_tensor(rng.integers(1, n_items + 1, (micro, cfg.model.maxlen)))
        mask = torch.ones_like(hist, dtype=torch.float32)
        target = torch.as_tensor(rng.integers(1, n_items + 1, micro))
        out = runner.forward(hist, mask, target, loss_fn)
        runner.backward_and_step(out["loss"])
    # Resident after the steps (what stays: weights, optimizer state, kept gradients) and the peak during
    # them (transient full gradients and ZeRO-3's gathered parameters also have to fit).
    resident = proc.memory_info().rss - rss0
    peak = peak_rss_mb() * 2**20 - rss0
    Path(loop_config["out"], f"rank{rank}.json").write_text(
        json.dumps({"rank": rank, "resident_bytes": resident, "peak_bytes": peak}))
    ray.train.report({"peak_bytes": peak})


def bytes_per_item(args) -> list:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from eimf.config import load_config, to_dict

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, workers, strategy, stage in CONFIGS:
            grown = {}
            for n_items in args.catalogue_sizes:
                out = Path(tmp, f"{workers}-{strategy}-{stage}-{n_items}")
                out.mkdir()
                cfg = load_config(None, [f"train.scaling.num_workers={workers}", f"train.deepspeed.zero_stage={stage}",
                                         f"train.batch_size={args.batch_size}"])
                TorchTrainer(
                    _probe,
                    train_loop_config={"config": to_dict(cfg), "n_items": n_items, "strategy": strategy,
                                       "out": str(out)},
                    torch_config=TorchConfig(backend="gloo"),
                    scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                    run_config=RunConfig(name=out.name, storage_path=tmp),
                ).fit()
                grown[n_items] = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
            small, large = args.catalogue_sizes

            def per_item(key):  # the worst rank: the one that runs out of memory first
                return max((b[key] - a[key]) / (large - small) for a, b in zip(grown[small], grown[large]))

            rows.append({"config": label, "workers": workers, "resident_bytes_per_item": per_item("resident_bytes"),
                         "peak_bytes_per_item": per_item("peak_bytes"), "ranks": grown})
            print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    return rows


def to_markdown(tp: list, mem: list, args, dim: int) -> str:
    lines = [f"### Throughput on {args.dataset} ({args.steps} steps, global batch {args.batch_size}, "
             f"{os.cpu_count()} CPU cores)", "",
             "| configuration | examples/s (all workers) | examples/s per worker | input share | "
             "peak RSS per worker (MB) |", "|---|---|---|---|---|"]
    for r in tp:
        lines.append(f"| {r['config']} | {r['examples_per_s_total']:.0f} | {r['examples_per_s_per_worker']:.0f} | "
                     f"{100 * r['input_share']:.1f}% | {r['peak_rss_mb_chief']:.0f} |")
    lines += ["", f"### Memory per catalogue item (d={dim}, fp32, Adam; sizes {args.catalogue_sizes})", "",
              "| configuration | resident bytes per item per worker | peak bytes per item per worker | "
              "items per 16 GiB worker (peak) |", "|---|---|---|---|"]
    for r in mem:
        b = r["peak_bytes_per_item"]
        lines.append(f"| {r['config']} | {r['resident_bytes_per_item']:.0f} | {b:.0f} | {16 * 2**30 / max(b, 1):.2e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--catalogue-sizes", type=int, nargs=2, default=[100_000, 1_100_000])
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--output", help="write the Markdown tables here (and the raw rows to <output>.json)")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from eimf.config import load_config

    tp = [] if args.skip_throughput else throughput(args)
    mem = [] if args.skip_memory else bytes_per_item(args)
    md = to_markdown(tp, mem, args, load_config().model.dim)
    print(md)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(md)
        Path(args.output).with_suffix(".json").write_text(json.dumps({"throughput": tp, "memory": mem}, indent=1))


if __name__ == "__main__":
    main()
