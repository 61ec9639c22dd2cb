"""What EIMF's head costs on the row-sharded table: the step with and without it, and where the difference goes.

    python benchmarks/eimf_sharded_step.py --items 667000 --steps 60 --profile

Two gloo ranks (one thread each) on the sharded path (``ShardedStepRunner``, TorchRec's row-wise table), synthetic
ids over ``--items`` items, ComiRec-SA, d = 64, batch 128 per rank, 50-item histories, 1,280 shared negatives: no
Ray and no data, so the step is timed alone. Per rank and mode, after 5 warm-up steps, ``--steps`` steps:
- ``backbone``: the plain step (``Trainer.step``);
- ``eimf``: ``EIMFTrainer``'s step on a ``SemanticBatch`` whose first ``--typical-share`` of rows are typical users
  with 4 random 384-d semantic interests (``eimf.typical_sampling=oversample``, the default), the head attached.
The two modes alternate step by step, so both see the same machine. ``--profile`` adds torch.profiler over the EIMF
steps on rank 0: the operators and record-function ranges with the most time. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import os
import socket
import time
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BATCH, HIST, SEM_DIM, M = 128, 50, 384, 4


def _batch(n_items: int, rng: np.random.Generator, typical: int):
    from eimf.data.sampling import SemanticBatch

    hist = rng.integers(1, n_items + 1, (BATCH, HIST))
    mask = np.ones((BATCH, HIST), dtype=bool)
    target = rng.integers(1, n_items + 1, BATCH)
    sem = rng.standard_normal((typical, M, SEM_DIM)).astype(np.float32)
    sem /= np.linalg.norm(sem, axis=-1, keepdims=True)
    return SemanticBatch(hist, mask, target, np.arange(typical), sem, np.ones((typical, M), dtype=bool))


def _rank(rank: int, port: int, args, out) -> None:
    from eimf.config import Config
    from eimf.models.negatives import build_loss
    from eimf.modules.alignment import EIMFHead
    from eimf.training.loop import Trainer
    from eimf.training.multitask import EIMFTrainer
    from eimf.training.sharded import ShardedItemModel, ShardedStepRunner, sparse_optimizer_params

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = Config()
    cfg.negatives.num_negatives = 1280
    runners, trainers = {}, {}
    for mode in ("backbone", "eimf"):
        runner = ShardedStepRunner(ShardedItemModel(cfg.model, args.items), 1e-3, 0.0,
                                   sparse_optimizer_params("auto", 0.05, False), torch.device("cpu"), 1)
        loss = build_loss(cfg.negatives, args.items, BATCH, cfg.model)
        if mode == "eimf":
            runner.attach_head(EIMFHead.from_config(cfg, SEM_DIM))
        kind = EIMFTrainer if mode == "eimf" else Trainer
        trainers[mode] = kind(cfg, runner.model, loss, runner, iter(()), None, None, is_chief=rank == 0)
        runners[mode] = runner
    rng = np.random.default_rng(rank)
    typical = int(round(args.typical_share * BATCH))
    seconds = defaultdict(float)
    for i in range(5 + args.steps):
        for mode in ("backbone", "eimf"):
            batch = _batch(args.items, rng, typical)
            if mode == "backbone":
                batch = batch[:3]
            dist.barrier()
            t0 = time.perf_counter()
            trainers[mode].step(batch)
            if i >= 5:
                seconds[mode] += time.perf_counter() - t0
    table = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps // 2):
                trainers["eimf"].step(_batch(args.items, rng, typical))
        if rank == 0:
            table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60)
    took = [None] * 2
    dist.all_gather_object(took, dict(seconds))
    dist.destroy_process_group()
    if rank == 0:
        out.put({"seconds": {m: max(t[m] for t in took) for m in seconds}, "profile": table})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=667_000)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--typical-share", type=float, default=0.25)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, args, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    got = out.get()
    for proc in procs:
        proc.join()
    print(f"\n{args.items:,} items, 2 ranks x 1 thread, batch {BATCH} per rank, typical share {args.typical_share}, "
          f"{args.steps} steps each\n\n| mode | ms/step | examples/s (both ranks) |\n|---|---:|---:|")
    for mode, s in got["seconds"].items():
        print(f"| {mode} | {1000 * s / args.steps:.1f} | {2 * BATCH * args.steps / s:,.0f} |")
    if got["profile"]:
        print("\nEIMF step, rank 0, torch.profiler (sorted by total CPU time):\n")
        print(got["profile"])
    os.sys.stdout.flush()


if __name__ == "__main__":
    main()
