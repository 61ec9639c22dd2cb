"""What ``retrieval.index=auto``'s guard decides on trained tables, and what it costs at export.

For each model folder (``eimf export``'s output, or a training run's ``export`` folder): the item table, the check
queries the export step uses (the interests of up to 500 VALID users, ``eimf.serving.folder.check_interests``), then
the guarded build (the 4-bit candidate, checked, kept or replaced by the IVF,Flat fallback) against the build of
the fallback alone (what ``auto`` built before the guard). Reports the decision, the candidate's recall of the
exact top-50 on the check users, and the seconds of each part.

    python benchmarks/auto_guard.py --model /tmp/ann/runs/sa1m-3k/export /tmp/ann/runs/sa10m/export \\
        --output docs/benchmarks/auto_guard.json

The test users' recall of each index on the same tables is ann_recall.py's (docs/serving.md): this script
shows whether the VALID users' check reaches the same verdict. Times are wall seconds with ``--threads`` faiss
threads; they mean something only alone on the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402,F401  (before faiss: import-order crashes are reported on Linux wheels)

from eimf.evaluation.retrieval import ItemIndex, resolve_index, set_faiss_threads  # noqa: E402
from eimf.serving.folder import ModelFolder, check_interests  # noqa: E402


def measure(model_dir: str, threads: int) -> dict:
    folder = ModelFolder.load(model_dir, index=False)
    model, cfg = folder.model, folder.cfg
    table = model.item_embeddings().detach().float().cpu().numpy()
    n = len(table) - 1
    t0 = time.perf_counter()
    queries = check_interests(model, cfg, folder.data_path)
    check_s = time.perf_counter() - t0
    auto = dataclasses.replace(cfg.retrieval, index="auto", nprobe=None, refine_k=None)
    t0 = time.perf_counter()
    guarded = ItemIndex.from_config(table, auto, threads, check_queries=queries)
    guarded_s = time.perf_counter() - t0
    fallback_spec = resolve_index("auto", n)
    del guarded.index
    t0 = time.perf_counter()
    ItemIndex.from_config(table, dataclasses.replace(auto, index=fallback_spec), threads)
    fallback_s = time.perf_counter() - t0
    check = guarded.auto_check or {}
    return {"model": model_dir, "items": n, "dim": int(table.shape[1]), "chosen": guarded.spec,
            "params": guarded.params, "candidate": check.get("candidate"),
            "candidate_recall_of_exact": check.get("candidate_recall_of_exact"), "kept": check.get("kept"),
            "reason": check.get("reason"), "check_users": check.get("check_users"),
            "check_queries_s": check_s, "guarded_build_s": guarded_s, "fallback_alone_build_s": fallback_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="model folders with the prepared data they record")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output")
    args = p.parse_args()
    set_faiss_threads(args.threads)
    rows = []
    for m in args.model:
        rows.append(measure(m, args.threads))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| table | items | candidate recall of exact (check users) | kept | chosen | check queries s | "
          "guarded build s | fallback alone s |\n|---|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        rec = "-" if r["candidate_recall_of_exact"] is None else f"{r['candidate_recall_of_exact']:.3f}"
        print(f"| {r['model']} | {r['items']:,} | {rec} ({r['check_users']}) | {r['kept']} | `{r['chosen']}` | "
              f"{r['check_queries_s']:.1f} | {r['guarded_build_s']:.1f} | {r['fallback_alone_build_s']:.1f} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
