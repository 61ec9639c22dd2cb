"""Data parallelism on one host: one-thread replicas against one process using every core, without Ray.

    python benchmarks/data_parallel.py --dataset ml-1m --steps 600 --precision bf16

Rows, each after 30 warm-up steps, ``--steps`` timed steps of the real step (sample -> forward -> sampled softmax ->
backward -> Adam) of ``--backbone``:
- one process at ``--threads`` threads, batch ``--batch-size`` (what ``train.scaling.num_workers=1`` runs);
- one process at one thread, the same batch;
- ``--workers`` processes at one thread each, not synchronised: the ceiling of data parallelism on this host;
- ``--workers`` replicas through :class:`eimf.training.data_parallel.DataParallelStepRunner` (gloo, what
  ``train.strategy=torch`` runs), each with the whole batch (global batch x workers) and with an equal share of it
  (the same global batch);
and the gloo ``all_reduce`` alone, for a tiny tensor (its latency) and for the model's gradient. Global examples/s
counts every replica's examples. Run it alone on the machine: every figure is a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(rank: int, world: int, port: int, args, batch: int, threads: int, sync: bool, out) -> None:
    from eimf.config import load_config
    from eimf.data.preprocess import prepare
    from eimf.data.sampling import TrainSampler
    from eimf.formats.prepared import load_prepared
    from eimf.training.components import build_components
    from eimf.training.hardware import set_threads
    from eimf.training.loop import Trainer, seed_everything

    set_threads(threads)
    cfg = load_config(None, [f"data.dataset={args.dataset}", f"model.backbone={args.backbone}",
                             f"train.precision={args.precision}", f"train.batch_size={batch}"])
    data = load_prepared(prepare(cfg.data).path)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    seed_everything(0)
    model, loss_fn, runner, _ = build_components(cfg, data.n_items)
    if sync:
        from eimf.training.data_parallel import DataParallelStepRunner

        runner = DataParallelStepRunner(runner)
    it = iter(TrainSampler(list(data.train["items"]), maxlen=cfg.model.maxlen, batch_size=batch,
                           min_cut=cfg.train.min_cut, seed=rank))
    trainer = Trainer(cfg, model, loss_fn, runner, it, data.valid, data.test)
    for _ in range(30):
        trainer.train_step(next(it))
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(next(it))
    seconds = time.perf_counter() - t0
    if world > 1:
        took = [None] * world
        dist.all_gather_object(took, seconds)
        seconds = max(took)  # the slowest replica sets the pace
        dist.destroy_process_group()
    if rank == 0:
        out.put({"params": sum(p.numel() for p in model.parameters()), "seconds": seconds})


def _allreduce(rank: int, world: int, port: int, sizes, repeats: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result = {}
    for n in sizes:
        x = torch.zeros(n)
        for _ in range(20):
            dist.all_reduce(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(x)
        result[n] = 1000 * (time.perf_counter() - t0) / repeats
    dist.destroy_process_group()
    if rank == 0:
        out.put(result)


def _spawn(fn, world: int, *fn_args):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _port()  # one rendezvous port, chosen here and handed to every rank
    procs = [ctx.Process(target=fn, args=(r, world, port, *fn_args, out)) for r in range(world)]
    for p in procs:
        p.start()
    result = out.get()
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a rank of {fn.__name__} failed ({p.exitcode})")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--backbone", default="comirec_sa")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the one process's threads")
    args = p.parse_args()
    b, w = args.batch_size, args.workers
    plans = [  # (label, processes, threads, batch per process, synchronised)
        (f"1 process, {args.threads} threads", 1, args.threads, b, False),
        ("1 process, 1 thread", 1, 1, b, False),
        (f"{w} processes, 1 thread, not synchronised (ceiling)", w, 1, b, False),
        (f"{w} replicas, 1 thread, global batch {w * b}", w, 1, b, True),
        (f"{w} replicas, 1 thread, global batch {b}", w, 1, b // w, True),
    ]
    rows = []
    for label, world, threads, batch, sync in plans:
        got = _spawn(_steps, world, args, batch, threads, sync)
        rows.append({"setting": label, "processes": world, "batch_per_process": batch,
                     "examples_per_s": world * batch * args.steps / got["seconds"],
                     "ms_per_step": 1000 * got["seconds"] / args.steps, "params": got["params"]})
        print(json.dumps(rows[-1]), flush=True)
    gradient = rows[0]["params"]
    latency = _spawn(_allreduce, w, [256, gradient], 200)
    print(f"\n{args.backbone}, {args.dataset}, {args.precision}, {args.steps} steps\n\n"
          "| setting | batch per process | global examples/s | ms/step | vs first row |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['batch_per_process']} | {r['examples_per_s']:,.0f} | {r['ms_per_step']:.1f} | "
              f"{r['examples_per_s'] / rows[0]['examples_per_s']:.2f}x |")
    print(f"\ngloo all_reduce, {w} ranks: 256 floats {latency[256]:.2f} ms; the gradient ({gradient:,} floats, "
          f"{4 * gradient / 1e6:.1f} MB) {latency[gradient]:.2f} ms")


if __name__ == "__main__":
    main()
