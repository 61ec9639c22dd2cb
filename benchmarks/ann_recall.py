"""ANN indexes against exact search on large item tables: recall of the merged top-N, time per user, build time,
memory.

Two sources of tables and users:

* ``--model DIR``: a **trained** table. DIR is a model folder (``eimf export``'s output, or the ``export`` folder
  of a training run); the table is its item embeddings, the users are ``--users`` test users of the prepared
  dataset the folder records (a fixed-seed sample), and their interests come from the model itself. The
  ``reached`` training rows (``--train-rows``) are the items in the exact per-interest top-``--reach-n`` of
  ``--reach-users`` *valid* users (not the test users measured), ``popular`` samples rows by train-split
  popularity.

      python benchmarks/ann_recall.py --model /tmp/ann/runs/sa1m-3k/export --output docs/benchmarks/ann_recall_sa1m_3k.json

* ``--items N [N ...]`` (no ``--model``): synthetic. ``N`` items in ``clusters`` Gaussian
clusters on the unit sphere, each item's norm set by a Zipf popularity (norm = 0.5 + log1p(count)/log1p(max count),
so popular items score higher, as in trained tables); each user has ``K`` interests near clusters drawn by the same
popularity. Every user is ranked as serving ranks (eimf.evaluation.retrieval.ItemIndex.search_multi: top-N per
interest, merged by score); recall = |ANN top-N ∩ exact top-N| / N, averaged over users. Time per user = the wall
time of one batched search of all users (K queries each) / users, with ``--threads`` faiss threads; the exact
baseline is batched the same way (BLAS), which favours it.

    python benchmarks/ann_recall.py --items 1000000 10000000 --output docs/benchmarks/ann_recall.json

writes the JSON rows and prints a Markdown table (docs/serving.md). Timings: every search (exact included) runs
``--repeats`` times in this process and the fastest counts; with ``--model`` exact search runs again right after
each ANN setting and the speed-up is against that time, so both see the same machine load.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402,F401  (before faiss: import-order crashes are reported on Linux wheels)

from eimf.evaluation.evaluate import history_batch, item_popularity  # noqa: E402
from eimf.evaluation.retrieval import ItemIndex, set_faiss_threads  # noqa: E402
from eimf.formats.prepared import load_prepared  # noqa: E402
from eimf.serving.folder import ModelFolder  # noqa: E402

#: (index_factory string, {search parameter: values to sweep}) per catalogue size; {n} is replaced by nlist.
DEFAULT_SPECS = {
    "small": [("HNSW32", {"ef_search": [16, 32, 64, 128]}),
              ("IVF{n},Flat", {"nprobe": [8, 16, 32, 64]}),
              ("IVF{n},PQ32x4fs,RFlat", {"nprobe": [16, 32, 64]})],
    "large": [("HNSW32", {"ef_search": [16, 32, 64, 128]}),
              ("IVF{n},Flat", {"nprobe": [16, 32, 64, 128]}),
              ("IVF{n},PQ32x4fs,RFlat", {"nprobe": [32, 64, 128]})],
}


#: Trained tables: (index_factory string, {search parameter: values}, training rows). ``{n}`` is nlist (about
#: 4 sqrt(N), a multiple of 1024), ``{d}`` twice it, ``{q}`` and ``{e}`` a quarter and an eighth of it. ``MIPS,``
#: lifts items to L2 (eimf.evaluation.retrieval.ItemIndex); ``reached``/``popular``: see the module doc.
TRAINED_SPECS = [
    ("IVF{n},Flat", {"nprobe": [8, 16, 32, 64, 128]}, "uniform"),
    ("MIPS,IVF{n},Flat", {"nprobe": [8, 16, 32, 64, 128, 192, 256]}, "uniform"),
    ("MIPS,IVF{d},Flat", {"nprobe": [128, 192, 256, 384]}, "uniform"),
    ("MIPS,IVF{d}_HNSW32,Flat", {"nprobe": [128, 192, 256, 384]}, "uniform"),
    ("MIPS,IVF{q},Flat", {"nprobe": [8, 16, 24, 32, 48]}, "uniform"),
    ("MIPS,IVF{e},Flat", {"nprobe": [8, 12, 16, 24, 32]}, "uniform"),
    ("IVF{n},Flat", {"nprobe": [8, 16, 32, 64]}, "reached"),
    ("MIPS,IVF{n},Flat", {"nprobe": [8, 16, 32, 64]}, "reached"),
    ("MIPS,IVF{n},Flat", {"nprobe": [8, 16, 32, 64]}, "popular"),
    ("HNSW32", {"ef_search": [32, 64, 128, 256]}, "uniform"),
    ("MIPS,HNSW32", {"ef_search": [32, 64, 128, 256]}, "uniform"),
    ("IVF{n},PQ32x4fs,RFlat", {"nprobe": [16, 32, 64], "refine_k": [4, 16]}, "uniform"),
    ("MIPS,PCAR64,IVF{n},PQ32x4fs,RFlat", {"nprobe": [16, 32, 64], "refine_k": [4, 16]}, "uniform"),
    ("MIPS,IVF{n},PQ13x4fs,RFlat", {"nprobe": [128, 192, 256], "refine_k": [8, 16, 32]}, "uniform"),
    ("MIPS,IVF{n},PQ65x4fs,RFlat", {"nprobe": [96, 128, 160, 192, 256], "refine_k": [4, 8, 16, 32]}, "uniform"),
    ("MIPS,IVF{n},PQ65x4fsr,RFlat", {"nprobe": [96, 128, 160, 192, 256], "refine_k": [4, 8, 16, 32]}, "uniform"),
    ("MIPS,PCAR64,IVF{n},PQ32x4fs,RFlat", {"nprobe": [128, 192, 256], "refine_k": [8, 16, 32]}, "uniform"),
]


def synthetic(n_items: int, n_users: int, k: int, dim: int, clusters: int, seed: int,
              args_noise=(1.0, 0.8)):
    """``[N + 1, d]`` table (row 0 padding) and ``[U, K, d]`` interests; see the module doc. ``args_noise``: the
    norm of the Gaussian offset from the cluster centre (unit norm) of an item and of an interest."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    counts = (1e6 / np.arange(1, n_items + 1) ** 1.0).astype(np.float32)  # Zipf, item 1 most popular
    norms = 0.5 + np.log1p(counts) / np.log1p(counts[0])
    table = np.zeros((n_items + 1, dim), dtype=np.float32)
    cluster_of = rng.integers(0, clusters, n_items)
    step = 1_000_000  # in blocks: the noise of 10M x 64 float64 would need 5 GB at once
    for s in range(0, n_items, step):
        e = min(n_items, s + step)
        x = centers[cluster_of[s:e]] + args_noise[0] / np.sqrt(dim) * rng.standard_normal((e - s, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        table[1 + s:1 + e] = x * norms[s:e, None]
    cluster_pop = np.bincount(cluster_of[: max(1, n_items // 100)], minlength=clusters) + 1.0  # popular clusters
    picks = rng.choice(clusters, size=(n_users, k), p=cluster_pop / cluster_pop.sum())
    users = centers[picks] + args_noise[1] / np.sqrt(dim) * rng.standard_normal((n_users, k, dim)).astype(np.float32)
    users /= np.linalg.norm(users, axis=2, keepdims=True)
    return table, users.astype(np.float32)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def index_mb(index: ItemIndex) -> float:
    """The index's size as faiss writes it (what serving loads into memory)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        index.save(f.name)
        return os.path.getsize(f.name) / 2**20


def timed_search(index: ItemIndex, users: np.ndarray, topn: int, repeats: int = 1):
    """The top-N of every user and the fastest of ``repeats`` batched searches, in seconds."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        ids, _ = index.search_multi(users, topn)
        best = min(best, time.perf_counter() - t)
    return ids, best


def _grid(sweep: dict) -> list:
    """{a: [1, 2], b: [3]} -> [{a: 1, b: 3}, {a: 2, b: 3}] (every combination)."""
    combos = [{}]
    for name, values in sweep.items():
        combos = [{**c, name: v} for c in combos for v in values]
    return combos


def trained_inputs(args):
    """(table [N + 1, d], test interests [U, K, d], reached train rows, popular train rows, description) of
    ``--model``; see the module doc."""
    folder = ModelFolder.load(args.model, index=False)
    model, cfg = folder.model, folder.cfg
    data = load_prepared(args.data or folder.data_path)
    table = model.item_embeddings().detach().float().cpu().numpy()
    rng = np.random.default_rng(args.seed)

    def interests(split_df, n):
        part = split_df.iloc[np.sort(rng.choice(len(split_df), min(n, len(split_df)), replace=False))]
        out = []
        for s in range(0, len(part), 1024):
            hist, mask = history_batch(list(part["history"].iloc[s:s + 1024]), cfg.model.maxlen)
            with torch.no_grad():
                out.append(model.interests(torch.from_numpy(hist), torch.from_numpy(mask)).float().numpy())
        return np.concatenate(out)

    users = interests(data.test, args.users)
    flat = ItemIndex(table, index="Flat", threads=args.threads)
    probe = interests(data.valid, args.reach_users)
    ids, _ = flat.search(probe.reshape(-1, probe.shape[-1]), args.reach_n)
    reached = np.unique(ids[ids > 0]) - 1  # row positions in the index (item id - 1)
    counts = item_popularity(data.train, len(table) - 1)[1:].astype(np.float64) + 1e-3
    take = min(args.train_size, len(counts))
    popular = np.sort(rng.choice(len(counts), take, replace=False, p=counts / counts.sum()))
    norms = np.linalg.norm(table[1:], axis=1)
    about = {"model": args.model, "data": str(args.data or folder.data_path), "backbone": cfg.model.backbone,
             "items": len(table) - 1, "dim": int(table.shape[1]), "interests": int(users.shape[1]),
             "test_users": len(users), "reach_users": len(probe), "reached_rows": int(len(reached)),
             "metrics": {k: v for k, v in (folder.metrics or {}).items() if "recall@50" in k},
             "item_norm": {"p50": float(np.median(norms)), "p99": float(np.quantile(norms, 0.99)),
                           "max": float(norms.max())}}
    del flat
    return table, users, {"reached": reached, "popular": popular, "uniform": None}, about


def run_trained(args) -> list:
    set_faiss_threads(args.threads)
    table, users, train_rows, about = trained_inputs(args)
    n_items = len(table) - 1
    print(f"  {about}", flush=True)
    nlist = args.nlist or max(1024, int(4 * np.sqrt(n_items)) // 1024 * 1024)
    t = time.perf_counter()
    flat = ItemIndex(table, index="Flat", threads=args.threads)
    build = time.perf_counter() - t
    exact, secs = timed_search(flat, users, args.topn, args.repeats)
    exact_ms = 1000 * secs / len(users)
    base = {"items": n_items, "table": about}
    rows = [{**base, "index": "Flat", "train_rows": "", "params": "", "recall": 1.0, "ms_per_user": exact_ms,
             "speedup": 1.0, "build_s": build, "memory_mb": index_mb(flat)}]
    print(f"  N={n_items:,} Flat: {exact_ms:.2f} ms/user", flush=True)
    for spec, sweep, rows_kind in TRAINED_SPECS:
        spec = spec.format(n=nlist, d=2 * nlist, q=nlist // 4, e=nlist // 8)
        if args.only and not any(spec.startswith(o) for o in args.only):
            continue
        if args.train_rows and rows_kind not in args.train_rows:
            continue
        t = time.perf_counter()
        index = ItemIndex(table, index=spec, threads=args.threads, train_size=args.train_size,
                          train_ids=train_rows[rows_kind])
        build = time.perf_counter() - t
        memory = index_mb(index)
        if args.nprobe and "nprobe" in sweep:
            sweep = {**sweep, "nprobe": args.nprobe}
        if args.ef_search and "ef_search" in sweep:
            sweep = {**sweep, "ef_search": args.ef_search}
        if args.refine_k and "refine_k" in sweep:
            sweep = {**sweep, "refine_k": args.refine_k}
        for params in _grid(sweep):
            index.set_params(**params)
            ids, secs = timed_search(index, users, args.topn, args.repeats)
            ms = 1000 * secs / len(users)
            # exact again right after: the speed-up compares two searches under the same load (a shared machine)
            _, exact_secs = timed_search(flat, users, args.topn, args.repeats)
            near_ms = 1000 * exact_secs / len(users)
            label = " ".join(f"{k}={v}" for k, v in params.items())
            rows.append({**base, "index": spec, "train_rows": rows_kind, "params": label,
                         "recall": recall(ids, exact), "ms_per_user": ms, "exact_ms_per_user": near_ms,
                         "speedup": near_ms / ms, "build_s": build, "memory_mb": memory})
            print(f"  N={n_items:,} {spec} [{rows_kind}] {label}: recall {rows[-1]['recall']:.4f}, {ms:.3f} ms/user "
                  f"(x{rows[-1]['speedup']:.1f}), build {build:.0f} s, {memory:.0f} MB", flush=True)
        del index
        gc.collect()
        if args.output:  # after every index: a sweep stopped half-way keeps what it measured
            with open(args.output, "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    # exact once more at the end: how much the machine's load moved during the sweep
    _, secs = timed_search(flat, users, args.topn, args.repeats)
    print(f"  exact again at the end: {1000 * secs / len(users):.2f} ms/user", flush=True)
    rows[0]["ms_per_user_end"] = 1000 * secs / len(users)
    return rows


def recall(ids: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(np.intersect1d(a[a > 0], b[b > 0])) / max(1, (b > 0).sum()) for a, b in zip(ids, exact)]
    return float(np.mean(hits))


def run(n_items: int, args) -> list:
    set_faiss_threads(args.threads)
    table, users = synthetic(n_items, args.users, args.interests, args.dim, args.clusters, args.seed)
    rows = []
    t = time.perf_counter()
    flat = ItemIndex(table, index="Flat", threads=args.threads)
    build = time.perf_counter() - t
    exact, secs = timed_search(flat, users, args.topn)
    exact_ms = 1000 * secs / len(users)
    rows.append({"items": n_items, "index": "Flat", "params": "", "recall": 1.0, "ms_per_user": exact_ms,
                 "speedup": 1.0, "build_s": build, "memory_mb": index_mb(flat)})
    print(f"  N={n_items:,} Flat: {exact_ms:.2f} ms/user", flush=True)
    del flat
    gc.collect()
    nlist = args.nlist or int(4 * np.sqrt(n_items) // 1024 * 1024) or 1024
    for spec, sweep in DEFAULT_SPECS["large" if n_items >= 5_000_000 else "small"]:
        spec = spec.format(n=nlist)
        if args.only and not any(spec.startswith(o) for o in args.only):
            continue
        t = time.perf_counter()
        index = ItemIndex(table, index=spec, threads=args.threads, train_size=args.train_size)
        build = time.perf_counter() - t
        memory = index_mb(index)
        (name, values), = sweep.items()
        for v in values:
            index.set_params(**{name: v})
            ids, secs = timed_search(index, users, args.topn)
            ms = 1000 * secs / len(users)
            rows.append({"items": n_items, "index": spec, "params": f"{name}={v}", "recall": recall(ids, exact),
                         "ms_per_user": ms, "speedup": exact_ms / ms, "build_s": build, "memory_mb": memory})
            print(f"  N={n_items:,} {spec} {name}={v}: recall {rows[-1]['recall']:.4f}, {ms:.3f} ms/user "
                  f"(x{rows[-1]['speedup']:.1f}), build {build:.0f} s, {memory:.0f} MB", flush=True)
        del index
        gc.collect()
    return rows


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(rows: list) -> str:
    trained = any("train_rows" in r for r in rows)
    head = "| items | index | centroids from | search | recall@50 vs exact | ms / user | exact ms / user | speed-up |" \
        if trained else "| items | index | search | recall@50 vs exact | ms / user | speed-up |"
    out = [head + " build s | index MB |", "|---:|---|" + ("---|---|---:|---:|---:|---:|" if trained else
                                                        "---|---:|---:|---:|") + "---:|---:|"]
    for r in rows:
        if trained:
            cells = (f" {r.get('train_rows') or '-'} | {r['params'] or 'exact'} | {r['recall']:.4f} | "
                     f"{r['ms_per_user']:.3f} | {_ms(r.get('exact_ms_per_user'))} |")
        else:
            cells = f" {r['params'] or 'exact'} | {r['recall']:.4f} | {r['ms_per_user']:.3f} |"
        out.append(f"| {r['items']:,} | {r['index']} |{cells} {r['speedup']:.1f}x | {r['build_s']:.1f} | "
                   f"{r['memory_mb']:.0f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model folder: measure its trained table on its own test users")
    p.add_argument("--data", help="with --model: the prepared dataset (default: the one the folder records)")
    p.add_argument("--reach-users", type=int, default=2000, help="valid users whose exact top lists are 'reached'")
    p.add_argument("--reach-n", type=int, default=100, help="per-interest top-N that counts as reached")
    p.add_argument("--train-rows", nargs="*", help="with --model: only these centroid training rows "
                   "(uniform reached popular)")
    p.add_argument("--nprobe", type=int, nargs="*", help="with --model: these nprobe values for every IVF index")
    p.add_argument("--ef-search", type=int, nargs="*", help="with --model: these efSearch values for HNSW")
    p.add_argument("--refine-k", type=int, nargs="*", help="with --model: these refine_k values for RFlat stages")
    p.add_argument("--repeats", type=int, default=2, help="timed searches per setting; the fastest counts")
    p.add_argument("--items", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--interests", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--topn", type=int, default=50)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default about 4 sqrt(N))")
    p.add_argument("--train-size", type=int, default=500_000, help="rows IVF/PQ train on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="index strings to run, by prefix (e.g. HNSW IVF)")
    p.add_argument("--output", help="write the rows as JSON here")
    args = p.parse_args()
    rows = []
    for n in ([None] if args.model else args.items):
        rows += run_trained(args) if args.model else run(n, args)
        if args.output:
            with open(args.output, "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print(markdown(rows))
    print(f"\npeak RSS {psutil.Process().memory_info().rss / 2**30:.1f} GiB (now); threads {args.threads}")


if __name__ == "__main__":
    main()
