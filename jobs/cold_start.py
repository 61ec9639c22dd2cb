"""The cold-start evaluation (docs/cold_start.md): new items placed by their text, against the baselines.

    python jobs/cold_start.py --dataset amazon-beauty --rule time --log-share 0.3 --seeds 1 2 3 \\
        --work /tmp/cold --out docs/cold_start -- model.backbone=comirec_sa train.patience=5 train.max_steps=40000
    python jobs/cold_start.py --dataset ml-1m --rule year --from-year 2000 --seeds 1 2 3 ... -- ...

For each seed it trains two models (Ray Train, as ``jobs/train.py``): on the warm dataset (the cold items and all
their interactions held out) and, as the ceiling, on the whole dataset (``oracle``). A training whose export is
already in ``--work`` is reused. Each method then fills the cold items' rows (eimf.experiments.cold_start), and every
view is scored on the test users. Writes ``<out>/<dataset>_<model>.jsonl`` (one row per seed and method: the mean
metrics of each view), the per-user tables under ``<out>/per_user/`` and ``<out>/<dataset>_<model>.md`` (mean ± std
over seeds; the paired per-user bootstrap of the kept map against each other method). Arguments after ``--`` are
config overrides for every training.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from eimf.cli import exits_2_on_user_error
from eimf.experiments.runs import train_or_reuse

log = logging.getLogger("cold_start")
CONTROLS = ("text_map_raw", "random", "text_pca", "category_pop", "oracle", "eimf_text_map", "textinit_text_map")
#: Pairs of other arms compared with each other (both on their own text map), where both ran.
ARM_PAIRS = (("eimf_text_map", "textinit_text_map"),)


def _categories(dataset: str, data_dir: str, items):
    """raw item id -> category names, where the dataset has them (else None)."""
    from eimf.experiments import cold_start as cs

    if dataset.startswith("ml-"):
        return cs.categories_from_text(items)
    attrs = Path(data_dir) / dataset / f"{dataset.split('-', 1)[1].capitalize()}_item2attributes.json.gz"
    if dataset == "amazon-beauty" and attrs.exists():  # S3-Rec's attribute ids (categories and brand), by item id
        with gzip.open(attrs, "rt") as f:
            return {k: [str(a) for a in v] for k, v in json.load(f).items()}
    return None


def _train_eimf(cfg, data_path: str, warmup_export: str, name: str, work: Path, seed: int) -> str:
    """EIMF on ``data_path``: the metadata annotator's interests for the typical users that ``warmup_export``
    picks, then the multi-task training (as the pipeline's annotate and train stages); reused when present."""
    import dataclasses

    from eimf.config import apply_overrides
    from eimf.steps import annotate
    from eimf.steps.train import eimf_train_config

    export = work / "runs" / name / "export"
    if (export / "folder.json").exists():
        return str(export)
    ann_dir = work / "annotations" / name
    if not (ann_dir / "annotations.parquet").exists():
        annotate.run(apply_overrides(cfg, ["semantic.annotator=metadata"]), {"model_dir": warmup_export},
                     out_dir=str(ann_dir), run_name=f"{name}-annotate")
    train_cfg, _ = eimf_train_config(cfg.train)
    cfg = dataclasses.replace(cfg, train=train_cfg, eimf=dataclasses.replace(
        cfg.eimf, enabled=True, annotations=str(ann_dir / "annotations.parquet")))
    return train_or_reuse(cfg, data_path, name, work, seed)


def _interest_fn(model, to_model_ids=None):
    import torch

    lookup = None if to_model_ids is None else torch.from_numpy(to_model_ids)

    def fn(hist, mask):
        return model.interests(hist if lookup is None else lookup[hist], mask)
    return fn


COLUMNS = (("cold", "recall@20"), ("cold", "recall@50"), ("cold", "ndcg@50"), ("whole", "recall@50"),
           ("whole_cold", "recall@50"), ("whole_warm", "recall@50"), ("warm_only", "recall@50"))


def report_tables(arms: dict) -> list:
    """The Markdown tables of ``arms`` ((method, view) -> seed -> per-user table): one row per method, then the
    paired bootstrap of text_map against each other method, and what the cold items cost the warm targets."""
    from eimf.evaluation.compare import paired_bootstrap

    order = ("text_map", "text_map_raw", "eimf_text_map", "textinit_text_map", "text_pca", "random", "category_pop",
             "oracle")
    methods = sorted({k[0] for k in arms}, key=lambda m: (order.index(m) if m in order else 1.5, m))
    head = " | ".join(f"{v} {k.replace('recall', 'R').replace('ndcg', 'N')}" for v, k in COLUMNS)
    lines = [f"| method | {head} |", "|---|" + "---:|" * len(COLUMNS)]
    for m in methods:
        cells = []
        for view, metric in COLUMNS:
            vals = [df[metric].mean() for df in arms.get((m, view), {}).values()]
            cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if vals else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    users = {v: len(next(iter(arms[("text_map", v)].values()))) for v in ("cold", "whole", "whole_cold")
             if ("text_map", v) in arms}
    lines += ["", f"Users scored: {users}.", "", "Paired per-user bootstrap of text_map minus each method (95 % CI):", "",
              "| view | metric | against | Δ [95 % CI] | verdict |", "|---|---|---|---|---|"]
    for view, metric in (("cold", "recall@50"), ("cold", "ndcg@50"), ("whole", "recall@50"), ("whole_cold", "recall@50")):
        for other in CONTROLS:
            if ("text_map", view) in arms and (other, view) in arms:
                d = paired_bootstrap(arms[("text_map", view)], arms[(other, view)], metric)
                lines.append(f"| {view} | {metric} | {other} | {d.describe()} | {d.verdict} |")
    for a, b in ARM_PAIRS:
        if (a, "cold") in arms and (b, "cold") in arms:
            lines += ["", f"Paired per-user bootstrap of {a} minus {b} (95 % CI):", "",
                      "| view | metric | Δ [95 % CI] | verdict |", "|---|---|---|---|"]
            for view in ("cold", "whole", "whole_cold", "whole_warm"):
                d = paired_bootstrap(arms[(a, view)], arms[(b, view)], "recall@50")
                lines.append(f"| {view} | recall@50 | {d.describe()} | {d.verdict} |")
    slot_views = sorted({v for m, v in arms if m == "text_map" and v.startswith("whole_s") and v.count("_") == 1},
                        key=lambda v: int(v[len("whole_s"):]))
    if slot_views and ("text_map", "whole") in arms:
        lines += ["", "text_map served with places reserved for the cold items, against no reserve (recall@50; "
                  "Δ: paired bootstrap against the same rows with no reserve):", "",
                  "| reserved | whole | Δ whole | cold targets (reach) | warm targets | Δ warm targets |",
                  "|---:|---:|---|---:|---:|---|"]
        base = {"": arms[("text_map", "whole")], "_cold": arms[("text_map", "whole_cold")],
                "_warm": arms[("text_map", "whole_warm")]}

        def mean(arm):
            return np.mean([df["recall@50"].mean() for df in arm.values()])

        lines.append(f"| 0 | {mean(base['']):.4f} | — | {mean(base['_cold']):.4f} | {mean(base['_warm']):.4f} "
                     "| — |")
        for v in slot_views:
            whole, warm = arms[("text_map", v)], arms[("text_map", v + "_warm")]
            d_whole = paired_bootstrap(whole, base[""], "recall@50")
            d_warm = paired_bootstrap(warm, base["_warm"], "recall@50")
            lines.append(f"| {v[len('whole_s'):]} | {mean(whole):.4f} | {d_whole.describe()} {d_whole.verdict} | "
                         f"{mean(arms[('text_map', v + '_cold')]):.4f} | {mean(warm):.4f} | "
                         f"{d_warm.describe()} {d_warm.verdict} |")
    lines += ["", "What the cold items in the index cost the warm targets (whole_warm minus warm_only, recall@50):", "",
              "| method | Δ [95 % CI] | verdict |", "|---|---|---|"]
    for m in methods:
        if (m, "whole_warm") in arms and (m, "warm_only") in arms:
            d = paired_bootstrap(arms[(m, "whole_warm")], arms[(m, "warm_only")], "recall@50")
            lines.append(f"| {m} | {d.describe()} | {d.verdict} |")
    return lines


@exits_2_on_user_error("cold_start")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--rule", choices=("time", "year"), required=True)
    p.add_argument("--log-share", type=float, default=0.3, help="time rule: the last share of the log's interactions")
    p.add_argument("--from-year", type=int, default=2000, help="year rule: items released in or after this year")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--eimf", action="store_true",
                   help="also train EIMF on the warm data (metadata annotator, the warm model as its warm-up) and "
                        "score the text map of its table (method eimf_text_map)")
    p.add_argument("--text-init", action="store_true",
                   help="also train the backbone with a text-initialised table (model.item_init=text) on the warm "
                        "data and score the text map of its table (method textinit_text_map): the control for --eimf")
    p.add_argument("--methods", nargs="+", default=None,
                   help="row methods to score (default: eimf.experiments.cold_start.ROW_METHODS); also text_map_p<NN>, "
                        "the map's rows stretched to another percentile of the trained norms")
    p.add_argument("--oracle-seeds", type=int, nargs="*", default=None,
                   help="the seeds that also train the oracle (a second training each; default: every seed; none: "
                        "no oracle); its comparisons pair on these seeds")
    p.add_argument("--slots", type=int, nargs="*", default=[],
                   help="also score text_map served with this many places of each top-50 reserved for the cold items "
                        "(views whole_s<N>, whole_s<N>_cold, whole_s<N>_warm)")
    p.add_argument("--split", default="test", choices=("valid", "test"), help="whose next interactions are scored")
    p.add_argument("--work", default="/tmp/eimf-cold-start")
    p.add_argument("--out", default="docs/cold_start")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


    from eimf.config import apply_overrides, load_config
    from eimf.data.inputs import data_dir
    from eimf.data.preprocess import prepare
    from eimf.experiments import cold_start as cs
    from eimf.formats.prepared import read_split
    from eimf.models.text_init import item_text_embeddings
    from eimf.serving.folder import ModelFolder

    # the models of an experiment are logged, not registered: they would otherwise become versions of eimf-<dataset>
    cfg = load_config(overrides=[f"data.dataset={args.dataset}", "tracking.registered_model=''",
                                 *args.overrides])
    work, out = Path(args.work), Path(args.out)
    (out / "per_user").mkdir(parents=True, exist_ok=True)
    full = str(prepare(cfg.data).path)
    if args.rule == "time":
        cold, rule = cs.cold_by_time(cfg.data, full, args.log_share)
    else:
        cold, rule = cs.cold_by_year(full, args.from_year)
    warm = cs.derive_warm(full, cold, str(work / "data" / f"{args.dataset}-warm"), rule)
    items = read_split(full, "items")
    frame = cs.test_frame(full, cold, args.split)
    log.info("%s: %d cold items of %d (%s); %d %s users, %d with a cold target", args.dataset, len(cold), len(items),
             rule, len(frame), args.split, sum(bool(np.isin(t, cold).any()) for t in frame["truth"]))
    text = np.load(item_text_embeddings(full, cfg.semantic.encoder), mmap_mode="r")
    text = np.asarray(text)
    warm_items = np.flatnonzero(warm.warm_id > 0)
    categories = _categories(args.dataset, data_dir(cfg.data), items)
    model_name, tag = cfg.model.backbone, f"{args.dataset}_{cfg.model.backbone}"
    rows, arms = [], {}

    def record(method, seed, views, fit=None):
        for view, df in views.items():
            df.to_parquet(out / "per_user" / f"{tag}_{method}_s{seed}_{view}.parquet", index=False)
            arms.setdefault((method, view), {})[seed] = df
        rows.append({"dataset": args.dataset, "model": model_name, "method": method, "seed": seed,
                     "split": args.split, "rule": rule, "fit": fit or {},
                     "metrics": {v: {k: float(df[k].mean()) for k in df.columns if "@" in k} | {"n_users": len(df)}
                                 for v, df in views.items()}})

    for seed in args.seeds:
        warm_export = train_or_reuse(cfg, warm.path, f"cs-{tag}-warm-s{seed}", work, seed)
        folder = ModelFolder.load(warm_export, index=False)
        model_rows = folder.model.item_embeddings().detach().float().numpy()  # [W + 1, d]
        warm_rows = model_rows[warm.warm_id[warm_items]]
        counts = folder.items.set_index("item")["count"].to_numpy()[warm.warm_id[warm_items] - 1]
        fn = _interest_fn(folder.model, warm.warm_id)
        for method in args.methods or cs.ROW_METHODS:
            table = np.zeros((len(items) + 1, model_rows.shape[1]), dtype=np.float32)
            table[warm_items] = warm_rows
            table[cold], fit = cs.cold_rows(method, warm_rows, text, warm_items, cold, counts,
                                            cfg.semantic.encoder, seed=seed)
            views = cs.score_views(fn, table, frame, cold, cfg.model.maxlen)
            if method == "text_map":  # serving with places reserved for the new items
                for slots in args.slots:
                    views.update(cs.slot_views(fn, table, frame, cold, cfg.model.maxlen, slots))
            record(method, seed, views, fit)
        if categories:
            warm_counts = dict(zip(warm_items.tolist(), counts.tolist()))
            order, fit = cs.category_popularity(categories, items, warm_counts, cold)
            record("category_pop", seed, cs.fixed_ranking_views(order, frame, cold), fit)
        def mapped_arm(method, export):  # another warm model's table, its cold rows from its own text map
            other = ModelFolder.load(export, index=False)
            rows_o = other.model.item_embeddings().detach().float().numpy()[warm.warm_id[warm_items]]
            table = np.zeros((len(items) + 1, rows_o.shape[1]), dtype=np.float32)
            table[warm_items] = rows_o
            table[cold], fit = cs.cold_rows("text_map", rows_o, text, warm_items, cold, counts, cfg.semantic.encoder,
                                            seed=seed)
            record(method, seed, cs.score_views(_interest_fn(other.model, warm.warm_id), table, frame, cold,
                                                cfg.model.maxlen), fit)

        if args.eimf:
            mapped_arm("eimf_text_map", _train_eimf(cfg, warm.path, warm_export, f"cs-{tag}-eimf-s{seed}", work, seed))
        if args.text_init:
            mapped_arm("textinit_text_map", train_or_reuse(apply_overrides(cfg, ["model.item_init=text"]), warm.path,
                                                           f"cs-{tag}-textinit-s{seed}", work, seed))
        if args.oracle_seeds is None or seed in args.oracle_seeds:
            oracle = ModelFolder.load(train_or_reuse(cfg, full, f"cs-{tag}-oracle-s{seed}", work, seed), index=False)
            table = oracle.model.item_embeddings().detach().float().numpy()
            record("oracle", seed, cs.score_views(_interest_fn(oracle.model), table, frame, cold, cfg.model.maxlen))
        with open(out / f"{tag}.jsonl", "w") as f:  # rewritten after each seed: a cut run keeps what it had
            f.writelines(json.dumps(r, default=float) + "\n" for r in rows)

    lines = [f"<!-- generated by: python jobs/cold_start.py {' '.join(argv if argv is not None else sys.argv[1:])} -->",
             "", f"{args.dataset}, {model_name}: {len(cold)} cold items of {len(items)} ({rule}); {args.split} users; "
             f"seeds {' '.join(map(str, args.seeds))}; mean ± std over seeds.", ""]
    lines += report_tables(arms)
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
