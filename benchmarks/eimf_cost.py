"""What EIMF costs: training step time with and without the auxiliary tasks, and serving latency of an exported
EIMF model against its backbone's export (it must be the same: inference is the backbone alone).

    python benchmarks/eimf_cost.py --dataset ml-100k --annotations DIR/annotations.parquet \
        --exports BACKBONE_EXPORT EIMF_EXPORT --threads 2 --steps 300

Training: the single-process step (sample -> forward -> loss -> backward -> Adam) of the backbone alone and with
the EIMF head (matching + semantic prediction + modality alignment on the typical rows), same batch size, after
a warm-up; examples/s and ms/step, and the share of the EIMF step spent in the head. Serving: for each export,
the model folder's interest extraction + its retrieval index's top-50 over the test users in batches, best-of-N
ms/batch, and the parameter count and file size of ``model.pt``. Markdown to stdout.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from eimf.config import load_config
from eimf.data.preprocess import prepare
from eimf.formats.prepared import load_prepared
from eimf.data.sampling import TrainSampler, eval_batches
from eimf.training.loop import seed_everything
from eimf.training.components import build_components


def train_step_cost(cfg, data, annotations, steps: int, warmup: int) -> dict:
    from eimf.training.multitask import EIMFTrainer, build_eimf, eimf_batches

    out = {}
    for mode in ("backbone", "eimf"):
        seed_everything(0)
        model, loss_fn, runner, _ = build_components(cfg, data.n_items)
        seqs, users = list(data.train["items"]), list(data.train["user"])
        if mode == "eimf":
            cfg.eimf.annotations = annotations
            semantics = build_eimf(cfg, runner)
            sampler = eimf_batches(cfg, users, seqs, semantics, cfg.train.batch_size, seed=0)
        else:
            sampler = TrainSampler(seqs, maxlen=cfg.model.maxlen, batch_size=cfg.train.batch_size,
                                   min_cut=cfg.train.min_cut, seed=0)
        it = iter(sampler)
        trainer = EIMFTrainer(cfg, model, loss_fn, runner, it, data.valid, data.test)
        head_s = [0.0]
        if runner.head is not None:  # time the head's forward (matching + both losses)
            fwd = runner.head.forward

            def timed(*a, **k):
                t = time.perf_counter()
                r = fwd(*a, **k)
                head_s[0] += time.perf_counter() - t
                return r

            runner.head.forward = timed
        for _ in range(warmup):
            trainer.train_step(next(it))
        head_s[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(next(it))
        total = time.perf_counter() - t0
        out[mode] = {"examples_per_s": steps * cfg.train.batch_size / total, "ms_per_step": 1000 * total / steps,
                     "head_share": head_s[0] / total}
    return out


def serving_cost(export: str, data, batch_size: int, repeats: int) -> dict:
    from eimf.serving.folder import ModelFolder

    folder = ModelFolder.load(export)
    model, cfg = folder.model, folder.cfg

    def recommend(model, hist, mask, n):
        with torch.no_grad():
            v = model.interests(torch.as_tensor(hist), torch.as_tensor(mask)).numpy()
        return folder.index.search_multi(v, n)

    batches = [(h, m) for _, h, m, _, _ in eval_batches(data.test, cfg.model.maxlen, batch_size)]
    recommend(model, *batches[0], n=50)  # warm-up (faiss index build, first-call allocations)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for h, m in batches:
            recommend(model, h, m, n=50)
        best = min(best, (time.perf_counter() - t0) / len(batches))
    return {"ms_per_batch": 1000 * best, "params": sum(p.numel() for p in model.parameters()),
            "model_pt_bytes": os.path.getsize(os.path.join(export, "model.pt")), "users": len(data.test),
            "batches": len(batches)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--annotations", required=True, help="annotations.parquet (file or folder) of typical users")
    p.add_argument("--exports", nargs="*", default=[], help="export folders to time at serving (backbone, EIMF)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--serve-batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"data.dataset={args.dataset}", "eimf.enabled=true", *args.overrides])
    data = load_prepared(prepare(cfg.data).path)
    t = train_step_cost(cfg, data, args.annotations, args.steps, args.warmup)
    print(f"## Training step ({args.dataset}, {cfg.model.backbone}, batch {cfg.train.batch_size}, "
          f"typical share {cfg.eimf.typical_share}, {args.threads} threads, {args.steps} steps)\n")
    print("| step | examples/s | ms/step | head share |\n|---|---|---|---|")
    for mode, r in t.items():
        print(f"| {mode} | {r['examples_per_s']:.0f} | {r['ms_per_step']:.2f} | {100 * r['head_share']:.1f}% |")
    ratio = t["eimf"]["ms_per_step"] / t["backbone"]["ms_per_step"]
    print(f"\nEIMF step / backbone step: x{ratio:.2f}")
    if args.exports:
        print(f"\n## Serving (recommend top-50, {args.serve_batch} users per batch, best of {args.repeats})\n")
        print("| export | ms/batch | parameters | model.pt bytes |\n|---|---|---|---|")
        for e in args.exports:
            r = serving_cost(e, data, args.serve_batch, args.repeats)
            print(f"| {e} | {r['ms_per_batch']:.2f} | {r['params']:,} | {r['model_pt_bytes']:,} |")


if __name__ == "__main__":
    main()
