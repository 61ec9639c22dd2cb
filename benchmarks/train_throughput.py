"""Training throughput on CPU: examples/s of the single-process step and the input pipeline's share.

    python benchmarks/train_throughput.py --dataset ml-1m --threads 2 --steps 300 \
        --backbones comirec_sa comirec_dr mind remi --precision fp32 bf16 --compile off on

Measures, per backbone and per setting (each ``--precision`` with each ``--compile``: a row each), after a warm-up:
examples/s of the full step (sample batch -> forward -> sampled softmax -> backward -> Adam), the share of step
time spent producing batches (outside the model), and the sampler alone. With compile on, the warm-up builds the
graphs (their seconds are the ``compile_s`` column) and the timed steps run compiled. Results go to stdout as a
Markdown table (and JSON with --json).
"""
from __future__ import annotations

import argparse
import json
import time

from eimf.config import load_config
from eimf.data.preprocess import prepare
from eimf.formats.prepared import load_prepared
from eimf.data.sampling import TrainSampler
from eimf.training.components import build_components, peak_rss_mb
from eimf.training.hardware import set_threads
from eimf.training.loop import Trainer, seed_everything


def bench(cfg, data, steps: int, warmup: int) -> dict:
    seed_everything(0)
    model, loss_fn, runner, _ = build_components(cfg, data.n_items)
    sampler = TrainSampler(list(data.train["items"]), maxlen=cfg.model.maxlen,
                           batch_size=cfg.train.batch_size, min_cut=cfg.train.min_cut, seed=0)
    it = iter(sampler)
    trainer = Trainer(cfg, model, loss_fn, runner, it, data.valid, data.test)
    t0 = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step(next(it))
    warmup_s = time.perf_counter() - t0
    t_data = t_model = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        trainer.train_step(batch)
        t2 = time.perf_counter()
        t_data += t1 - t0
        t_model += t2 - t1
    total = t_data + t_model
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    sampler_only = steps * cfg.train.batch_size / (time.perf_counter() - t0)
    compiled = runner.compiled
    return {
        "precision": cfg.train.precision,
        "compile": "off" if compiled is None else ("fell back" if compiled.fell_back else "on"),
        "compile_s": compiled.compile_seconds if compiled is not None else 0.0,
        "warmup_s": warmup_s,
        "examples_per_s": steps * cfg.train.batch_size / total,
        "ms_per_step": 1000 * total / steps,
        "input_share": t_data / total,
        "sampler_examples_per_s": sampler_only,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--backbones", nargs="+", default=["comirec_sa", "comirec_dr", "mind", "remi"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="train.precision of the rows (each one a row per backbone)")
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                   help="train.compile of the rows (each one a row per backbone and precision)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    set_threads(args.threads)
    cfg = load_config(None, [f"data.dataset={args.dataset}", *args.overrides])
    data = load_prepared(prepare(cfg.data).path)
    rows = []
    for backbone in args.backbones:
        for precision in args.precision:
            for compile_ in args.compile:
                cfg.model.backbone, cfg.train.precision, cfg.train.compile = backbone, precision, compile_ == "on"
                r = {"backbone": backbone, **bench(cfg, data, args.steps, args.warmup)}
                rows.append(r)
                print(json.dumps(r) if args.json else
                      f"{backbone:<11} {precision} compile {r['compile']:<9} {r['examples_per_s']:>8.0f} ex/s  "
                      f"{r['ms_per_step']:6.1f} ms/step  input {100 * r['input_share']:4.1f}%  "
                      f"sampler alone {r['sampler_examples_per_s']:>9.0f} ex/s  compile {r['compile_s']:.1f} s",
                      flush=True)
    print("\n| backbone | precision | compile | examples/s | ms/step | input share | sampler alone (ex/s) | "
          "compile s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['precision']} | {r['compile']} | {r['examples_per_s']:.0f} | "
              f"{r['ms_per_step']:.1f} | {100 * r['input_share']:.1f}% | {r['sampler_examples_per_s']:.0f} | "
              f"{r['compile_s']:.1f} |")
    print(f"\nthreads={args.threads} batch={cfg.train.batch_size} maxlen={cfg.model.maxlen} "
          f"dim={cfg.model.dim} K={cfg.model.num_interests} n_items={data.n_items} "
          f"peak RSS {rows[-1]['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
