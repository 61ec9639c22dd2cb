"""How much of an annotation set's semantic interests the item texts already hold.

    python benchmarks/annotation_text_overlap.py --dataset amazon-beauty --annotations DIR [DIR ...] [--folds 5]

For every answered interest m of every annotated user: s_m, its sentence embedding (the EIMF target), and t_m,
the mean sentence embedding of the item texts it cites as evidence (the same encoder; the texts that
``model.item_init=text`` starts the item table from). Reported per annotation set:

* cos(s_m, t_m), against cos(s_m, t_m') for the evidence of another interest drawn at random (the same set);
* the share of the variance of s that a ridge map of t explains on held-out interests (k-fold R^2);
* how often t_m, among the evidence means of all interests of the set, is the nearest to s_m (top-1) and its
  rank's median;
* how alike the targets are: distinct interest names, and the mean cos(s_m, s_m') of two interests drawn at random
  (coarse targets, e.g. a few genre labels, make many in-batch negatives near-duplicates of the positive).

High values say the targets are close to a function of the cited items' texts: an annotator whose interests are
built from the catalogue (``metadata``) cannot add to the items' texts what they do not hold. Markdown to stdout.
"""
from __future__ import annotations

import argparse

import numpy as np


def overlap(annotations: str, data_path: str, encoder: str, folds: int = 5, ridge: float = 1.0,
            seed: int = 0) -> dict:
    from eimf.models.text_init import item_text_embeddings
    from eimf.formats.annotations import STATUS_OK, read_annotations

    ann = read_annotations(annotations)
    ok = ann[(ann["status"] == STATUS_OK) & ann["evidence_items"].map(lambda x: x is not None and len(x) > 0)]
    texts = np.load(item_text_embeddings(data_path, encoder), mmap_mode="r")
    s = np.stack([np.asarray(v, dtype=np.float64) for v in ok["vector"]])
    t = np.stack([np.asarray(texts[np.asarray(e, dtype=np.int64)], dtype=np.float64).mean(0)
                  for e in ok["evidence_items"]])
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    n = len(s)
    rng = np.random.default_rng(seed)
    own = (s * t).sum(1)
    other = (s * t[rng.permutation(n)]).sum(1)
    # held-out R^2 of a ridge map t -> s
    order = rng.permutation(n)
    resid = total = 0.0
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        x, y = t[train], s[train]
        mx, my = x.mean(0), y.mean(0)
        w = np.linalg.solve((x - mx).T @ (x - mx) + ridge * np.eye(x.shape[1]), (x - mx).T @ (y - my))
        pred = (t[test] - mx) @ w + my
        resid += ((s[test] - pred) ** 2).sum()
        total += ((s[test] - s[train].mean(0)) ** 2).sum()
    sims = s @ t.T
    rank = (sims > sims[np.arange(n), np.arange(n)][:, None]).sum(1)  # 0: its own evidence is the nearest
    pairs = (s * s[rng.permutation(n)]).sum(1)
    return {"interests": n, "users": int(ok["user"].nunique()), "names": int(ok["name"].nunique()),
            "cos_pairs": float(pairs.mean()), "cos_own": float(own.mean()),
            "cos_other": float(other.mean()), "r2": float(1 - resid / total), "top1": float((rank == 0).mean()),
            "median_rank": float(np.median(rank))}


def main(argv=None) -> int:
    from eimf.config import load_config
    from eimf.data.preprocess import prepare

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--annotations", nargs="+", required=True, help="annotation folders (or annotations.parquet)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="key=value settings (data.*, semantic.encoder)")
    args = p.parse_args(argv)
    cfg = load_config(None, [f"data.dataset={args.dataset}", *args.overrides])
    data_path = str(prepare(cfg.data).path)
    print("| annotations | users | interests | distinct names | cos(s, s') random pair | cos(s, own evidence) | "
          "cos(s, other evidence) | R² of s from evidence text (held out) | own evidence nearest | median rank |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for a in args.annotations:
        r = overlap(a, data_path, cfg.semantic.encoder, folds=args.folds)
        print(f"| {a} | {r['users']} | {r['interests']} | {r['names']} | {r['cos_pairs']:.3f} | "
              f"{r['cos_own']:.3f} | {r['cos_other']:.3f} | "
              f"{r['r2']:.3f} | {100 * r['top1']:.1f} % | {r['median_rank']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
