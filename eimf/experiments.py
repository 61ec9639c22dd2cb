"""Grids of runs and their mean +- std tables: backbones alone (datasets x models x seeds), and EIMF against its
backbone with the ablations of docs/design.md section 5 (datasets x models x seeds x variants, one MLflow parent run)."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from eimf.config import Config

log = logging.getLogger(__name__)

TABLE_METRICS = ["recall@20", "ndcg@20", "hitrate@20", "recall@50", "ndcg@50", "hitrate@50"]
COST_COLUMNS = [("train_seconds", "train s", "{:.0f}"), ("examples_per_s", "ex/s", "{:.0f}"),
                ("peak_rss_mb", "peak MB", "{:.0f}")]


def _log_only(cfg) -> None:
    """Grid runs are compared, not deployed: their models are logged but not registered, unless a name is set."""
    if cfg.tracking.registered_model is None:
        cfg.tracking.registered_model = ""


def read_rows(raw_path: Path) -> List[dict]:
    """A grid's rows (its ``.jsonl``; the last row of each run), per-user table paths made absolute:
    :func:`append_row` stores those under the file's folder relative to it, so a results folder keeps its paired
    comparisons wherever it is checked out."""
    raw_path = Path(raw_path)
    if not raw_path.exists():
        return []
    latest: Dict[tuple, dict] = {}  # a run scored on test later appears again: its last row counts
    for line in raw_path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r["dataset"], r["model"], r.get("variant", "backbone"), r["seed"])] = r
    rows = list(latest.values())
    for r in rows:
        if r.get("per_user"):
            r["per_user"] = {s: p if "://" in p or Path(p).is_absolute() else str(raw_path.parent / p)
                             for s, p in r["per_user"].items()}
    return rows


def append_row(raw_path: Path, row: dict) -> None:
    """Append ``row`` to a grid's ``.jsonl``; per-user tables under its folder are written as relative paths."""
    raw_path = Path(raw_path)
    stored = dict(row)
    if row.get("per_user"):
        home = raw_path.parent.resolve()

        def rel(p: str) -> str:
            if "://" in p:
                return p
            try:
                return str(Path(p).resolve().relative_to(home))
            except ValueError:
                return p

        stored["per_user"] = {s: rel(p) for s, p in row["per_user"].items()}
    with raw_path.open("a") as f:
        f.write(json.dumps(stored) + "\n")


#: Splits whose per-user metrics a grid keeps for paired comparisons (valid chooses settings, test reports).
PER_USER_SPLITS = ("valid", "test")


def save_per_user(export_dir: str, data_path: str, out_dir: Path, name: str,
                  splits: Sequence[str] = PER_USER_SPLITS) -> Dict[str, str]:
    """Each user's metrics of an exported model on ``splits``, through the evaluate step, as
    ``<out_dir>/<name>/per_user.<split>.parquet`` (read back by :func:`load_per_user`); returns ``{split: path}``."""
    from eimf.steps import evaluate

    got = evaluate.run(None, {"model_dir": export_dir, "data_path": data_path}, str(Path(out_dir) / name),
                       splits=tuple(splits), with_baseline=False, per_user=True, log_to_mlflow=False)
    return {split: got.outputs[f"per_user_{split}"] for split in splits}


def score_on_test(row: dict, data_path: str, per_user_dir: Path) -> dict:
    """A run scored on valid only (``eval.score_test=false``) whose configuration won there: its exported model
    scored on test now, without training again. Returns the row with ``test/*`` metrics and the test per-user
    table; it replaces the old one in the ``.jsonl`` (:func:`read_rows` keeps the last row of a run)."""
    from eimf import fs

    if not row.get("export_dir") or not fs.exists(row["export_dir"]):
        raise FileNotFoundError(f"run {row.get('run')}: its export {row.get('export_dir')!r} is gone, so it cannot "
                                "be scored on test; train it again (remove its row from the .jsonl)")
    path = save_per_user(row["export_dir"], data_path, per_user_dir, row["run"], ("test",))["test"]
    import pandas as pd

    table = pd.read_parquet(path)
    metrics = {**row["metrics"], **{f"test/{m}": float(table[m].mean()) for m in TABLE_METRICS},
               "test/n_users": len(table)}
    log.info("%s: scored on test after choosing it on valid, recall@50 %.4f", row["run"], metrics["test/recall@50"])
    return {**row, "metrics": metrics, "per_user": {**(row.get("per_user") or {}), "test": path},
            "test_scored_after_training": True}


def scored_splits(cfg: Config) -> Tuple[str, ...]:
    """The splits a run's final model is scored on: valid only while settings are being chosen
    (``eval.score_test=false``), so the test split is read once, by the final configuration."""
    return PER_USER_SPLITS if cfg.eval.score_test else ("valid",)


def metric_key(split: str, metric: str) -> str:
    """Where a run's metrics hold ``metric`` of ``split``'s final scoring (valid: of the best weights)."""
    return f"best_valid/{metric}" if split == "valid" else f"{split}/{metric}"


def load_per_user(row: dict, split: str):
    """The per-user table a grid row points to, or None (rows from before per-user tables were kept)."""
    import pandas as pd

    path = (row.get("per_user") or {}).get(split)
    return pd.read_parquet(path) if path and Path(path).exists() else None


def run_grid(base: Config, datasets: Iterable[str], models: Iterable[str], seeds: Iterable[int],
             raw_path: Path, overrides: Optional[list] = None, per_user_dir: Optional[Path] = None) -> List[dict]:
    """Train every (dataset, model, seed); rows already in ``raw_path`` are not run again. With
    ``per_user_dir``, each run's per-user valid and test metrics go there (:func:`save_per_user`)."""
    from eimf.data.preprocess import load_prepared, prepare
    from eimf.evaluation import most_popular
    from eimf.steps import train

    raw_path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(raw_path)
    have = {(r["dataset"], r["model"], r["seed"]) for r in rows}
    data_paths = {}
    for dataset in datasets:
        cfg_d = copy.deepcopy(base)
        cfg_d.data.dataset = dataset
        data_paths[dataset] = str(prepare(cfg_d.data).path)
        if (dataset, "mostpop", 0) not in have and base.eval.score_test:
            data = load_prepared(data_paths[dataset])
            m = most_popular(data.train, data.test, topk=tuple(base.eval.topk))
            row = {"dataset": dataset, "model": "mostpop", "seed": 0,
                   "metrics": {f"test/{k}": v for k, v in m.items()}}
            rows.append(row)
            append_row(raw_path, row)
    # Seeds outermost: a grid cut short still covers every (dataset, model) pair.
    for seed in seeds:
        for dataset in datasets:
            for model in models:
                if (dataset, model, seed) in have:
                    continue
                cfg = copy.deepcopy(base)
                cfg.data.dataset = dataset
                cfg.model.backbone = model
                cfg.train.seed = seed
                cfg.train.run_name = None
                _log_only(cfg)
                result = train.run(cfg, {"data_path": data_paths[dataset]})
                export_dir, run_name = result.outputs["model_dir"], result.info["train_run_name"]
                row = {"dataset": dataset, "model": model, "seed": seed, "run": run_name,
                       "overrides": overrides or [], "metrics": result.metrics, "export_dir": export_dir}
                if per_user_dir is not None:
                    row["per_user"] = save_per_user(export_dir, data_paths[dataset], Path(per_user_dir), run_name,
                                                    scored_splits(cfg))
                rows.append(row)
                append_row(raw_path, row)
                log.info("%s %s seed %d: test recall@50 %.4f", dataset, model, seed,
                         result.metrics.get("test/recall@50", float("nan")))
    return rows


def format_table(rows: List[dict], split: str = "test") -> str:
    """Markdown: one line per (dataset, model), mean +- std over seeds of each metric and cost."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["model"])].append(r["metrics"])
    head = ["dataset", "model", "seeds"] + list(TABLE_METRICS) + [c[1] for c in COST_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dataset, model), ms in sorted(groups.items()):
        cells = [dataset, model, str(len(ms))]
        for m in TABLE_METRICS:
            vals = np.array([x[metric_key(split, m)] for x in ms if metric_key(split, m) in x])
            cells.append(f"{vals.mean():.4f} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.4f}" if len(vals) else "-")
        for key, _, fmt in COST_COLUMNS:
            vals = [x[key] for x in ms if key in x]
            cells.append(fmt.format(float(np.mean(vals))) if vals else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ EIMF grids
@dataclass(frozen=True)
class Variant:
    """One line of an EIMF comparison: the backbone alone, or EIMF with its annotation settings and loss
    weights. ``annotation`` holds the ``semantic.*`` overrides of the annotation step (None: no annotation,
    EIMF off); ``train`` any further overrides of the EIMF training (e.g. ``eimf.lambda_sp=0``)."""

    name: str
    description: str
    annotation: Optional[Tuple[str, ...]] = None
    train: Tuple[str, ...] = ()
    #: A second annotation set whose answered users replace theirs in the first (``coverage``: metadata for
    #: everyone, the LLM's for the typical users); None: one set.
    overlay: Optional[Tuple[str, ...]] = None

    @property
    def eimf(self) -> bool:
        return self.annotation is not None


_META = ("semantic.annotator=metadata",)
#: The named variants of ``jobs/experiments.py --variants`` (docs/design.md section 5's ablations).
VARIANTS: Dict[str, Variant] = {v.name: v for v in [
    Variant("backbone", "IBIM alone (also the warm-up model that picks the typical users)"),
    Variant("eimf", "EIMF, metadata annotator, typical users", _META),
    Variant("eimf-llm", "EIMF, LLM annotator (vLLM, semantic.vllm_model), typical users", ("semantic.annotator=vllm",)),
    # An LLM on CPU annotates ~0.2 prompts/s: this pairs with budget-5% where 20 % would take too long.
    Variant("llm-5%", "EIMF, LLM annotator, 5 % of training users (pair with budget-5%)",
            ("semantic.annotator=vllm", "semantic.budget=0.05")),
    Variant("llm-1%", "EIMF, LLM annotator, 1 % of training users (pair with budget-1%)",
            ("semantic.annotator=vllm", "semantic.budget=0.01")),
    Variant("no-sp", "EIMF without semantic prediction (lambda_sp = 0)", _META, ("eimf.lambda_sp=0",)),
    Variant("no-ma", "EIMF without modality alignment (lambda_ma = 0)", _META, ("eimf.lambda_ma=0",)),
    Variant("no-aux", "EIMF batches, both auxiliary weights 0 (isolates the sampling)", _META,
            ("eimf.lambda_sp=0", "eimf.lambda_ma=0")),
    Variant("random", "EIMF with random instead of typical users", _META + ("semantic.selection=random",)),
    Variant("extra", "EIMF, typical rows added for the auxiliary losses only (eimf.typical_sampling=extra)",
            _META, ("eimf.typical_sampling=extra",)),
    Variant("extra-1%", "as extra, 1 % of training users annotated (pair with budget-1%)",
            _META + ("semantic.budget=0.01",), ("eimf.typical_sampling=extra",)),
    *[Variant(f"budget-{p}%", f"EIMF, metadata, {p} % of training users annotated",
              _META + (f"semantic.budget={p / 100:g}",)) for p in (1, 5, 20, 100)],
    # round 2: each change alone, then together (eimf-r2); text-init is the no-EIMF way to use the same text
    Variant("eimf-proj", "EIMF, alignment through a behaviour projection h(v)", _META, ("eimf.ma_projection=mlp",)),
    Variant("eimf-mask", "EIMF, own interests and near-duplicates (cos > 0.9) are not negatives", _META,
            ("eimf.mask_own_interests=true", "eimf.duplicate_cos=0.9")),
    Variant("eimf-ground", "EIMF, matching against the cited items' embeddings", _META,
            ("eimf.matching_space=evidence",)),
    Variant("eimf-window", "EIMF, typical cuts with >= 50 % of the history in the prompted window", _META,
            ("eimf.window_overlap=0.5",)),
    Variant("eimf-r2", "EIMF with all four round-2 changes", _META,
            ("eimf.ma_projection=mlp", "eimf.mask_own_interests=true", "eimf.duplicate_cos=0.9",
             "eimf.matching_space=evidence", "eimf.window_overlap=0.5")),
    Variant("text-init", "the backbone, item table initialised from the item texts (no EIMF)",
            train=("model.item_init=text",)),
    Variant("eimf-text", "EIMF on the text-initialised item table (does EIMF add to text-init?)", _META,
            ("model.item_init=text",)),
    Variant("coverage", "every training user's metadata interests, the LLM's for the typical users",
            _META + ("semantic.budget=1.0",), overlay=("semantic.annotator=vllm",)),
    Variant("item-align", "item-level alignment only (item rows <-> MLP of their text), the backbone's batches",
            _META, ("eimf.lambda_sp=0", "eimf.lambda_ma=0", "eimf.lambda_item=0.1", "eimf.typical_sampling=extra")),
]}


def resolve_variant(spec: str) -> Variant:
    """A named variant, or ``name[key=value,...]``: that variant with more settings, e.g.
    ``eimf[eimf.lambda_ma=0.03,eimf.temperature=0.2]`` to choose weights on valid. ``semantic.*`` keys change the
    annotation set, every other key the training."""
    name, _, rest = spec.partition("[")
    if name not in VARIANTS:
        raise ValueError(f"unknown variants [{spec!r}]; known: {sorted(VARIANTS)} (or name[key=value,...])")
    if not rest:
        return VARIANTS[name]
    if not rest.endswith("]") or not rest[:-1].strip():
        raise ValueError(f"variant {spec!r}: expected name[key=value,...]")
    extra = [kv.strip() for kv in rest[:-1].split(",")]
    bad = [kv for kv in extra if "=" not in kv or not kv.split("=", 1)[0].strip()]
    if bad:
        raise ValueError(f"variant {spec!r}: {bad} are not key=value")
    base = VARIANTS[name]
    annotation = [kv for kv in extra if kv.startswith("semantic.")]
    if annotation and not base.eimf:
        raise ValueError(f"variant {spec!r}: {name} trains without annotations, so {annotation} would do nothing")
    train = tuple(kv for kv in extra if not kv.startswith("semantic."))
    return Variant(spec, f"{base.description}; {', '.join(extra)}",
                   None if base.annotation is None else base.annotation + tuple(annotation),
                   base.train + train, base.overlay)


def _is_eimf(name: str) -> bool:
    try:
        return resolve_variant(name).eimf
    except ValueError:  # a row of a variant this version no longer defines
        return False


def _variant_order(name: str) -> Tuple[int, str]:
    """Table order: the order of :data:`VARIANTS`, a ``name[...]`` spec after its base variant."""
    base = name.partition("[")[0]
    order = list(VARIANTS)
    return (order.index(base) if base in order else len(order), name)


def _apply(cfg: Config, overrides: Sequence[str]) -> Config:
    from omegaconf import OmegaConf

    if not overrides:
        return copy.deepcopy(cfg)
    merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(merged)


def warmup_fingerprint(cfg: Config, data_fp: str) -> str:
    """The fingerprint of a grid's warm-up (its backbone run on the first seed): what its typical users
    depend on. Same function as the pipeline's stages (eimf.pipeline), so the two share one reuse rule."""
    from eimf.pipeline import fingerprint, training_config

    return fingerprint("warmup", training_config(cfg), {"prepare": data_fp})


def annotation_plan(cfg: Config, warmup_fp: str, folder_of: "callable"):
    """The plan of one annotation set: its fingerprint (``semantic.*`` + the warm-up's), its folder
    ``folder_of(fingerprint)``, and whether a complete manifest there lets a resumed grid reuse it."""
    from eimf.pipeline import annotation_config, fingerprint, plan_stage

    config, versions = annotation_config(cfg)
    inputs = {"warmup": warmup_fp}
    return plan_stage("annotate", config, inputs, versions, folder_of(fingerprint("annotate", config, inputs,
                                                                                    versions)))


def run_eimf_grid(base: Config, datasets: Sequence[str], backbones: Sequence[str], seeds: Sequence[int],
                  variants: Sequence[str], raw_path: Path, grid_name: str, out_dir: str,
                  per_user_dir: Optional[Path] = None) -> List[dict]:
    """Train every (dataset, backbone, seed, variant) as MLflow children of one parent run ``grid_name``.

    Per (dataset, backbone), the ``backbone`` run of the first seed is the warm-up model: its export picks the
    typical users of every annotation set. Each annotation set (one per distinct ``semantic.*`` setting) is
    computed once, as its own child run, into ``<out_dir>/annotations/<dataset>-<backbone>-<hash>``; all
    seeds of a variant train on it. Rows already in ``raw_path`` are not run again (a cut-short grid resumes).
    Each run's per-user tables go to ``per_user_dir`` (default ``<out_dir>/per_user``), on the splits of
    :func:`scored_splits`. ``variants`` are names of :data:`VARIANTS` or specs ``name[key=value,...]``
    (:func:`resolve_variant`).
    """
    from eimf import fs, tracking
    from eimf.data.preprocess import prepare
    from eimf.pipeline import run_planned
    from eimf.semantic.annotate import STATS_FILE
    from eimf.steps import annotate, train

    resolved = {v: resolve_variant(v) for v in ["backbone", *variants]}  # the backbone: at least the warm-up
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    per_user_dir = Path(per_user_dir) if per_user_dir is not None else Path(out_dir) / "per_user"
    rows = read_rows(raw_path)
    have = {(r["dataset"], r["model"], r.get("variant", "backbone"), r["seed"]): r for r in rows}
    parent = tracking.start_run(base, grid_name, tags={"kind": "experiment-grid", "variants": ",".join(variants)})
    uri = tracking.tracking_uri(base)
    child = {"mlflow.parentRunId": parent, "grid": grid_name} if parent else {"grid": grid_name}

    def record(row: dict) -> None:
        key = (row["dataset"], row["model"], row["variant"], row["seed"])
        if key in have:  # scored on test later: the new row replaces the old
            rows.remove(have[key])
        rows.append(row)
        have[key] = row
        append_row(raw_path, row)

    status = "FAILED"
    try:
        for dataset in datasets:
            cfg_d = copy.deepcopy(base)
            cfg_d.data.dataset = dataset
            prepared = prepare(cfg_d.data)
            data_path, data_fp = str(prepared.path), prepared.manifest["fingerprint"]
            for backbone in backbones:
                cfg_b = copy.deepcopy(cfg_d)
                cfg_b.model.backbone = backbone
                cfg_w = copy.deepcopy(cfg_b)
                cfg_w.train.seed = seeds[0]
                warm_fp = warmup_fingerprint(cfg_w, data_fp)
                annotations: Dict[str, str] = {}
                # Seeds outermost: a grid cut short still has every variant on its first seeds.
                for seed in seeds:
                    names = [v for v in variants if v != "backbone"]
                    if "backbone" in variants or seed == seeds[0]:  # the first seed's backbone is the warm-up
                        names.insert(0, "backbone")
                    for name in names:
                        variant = resolved[name]
                        done = have.get((dataset, backbone, name, seed))
                        if done is not None:
                            if base.eval.score_test and "test/recall@50" not in done["metrics"]:
                                record(score_on_test(done, data_path, per_user_dir))
                            continue
                        cfg = copy.deepcopy(cfg_b)
                        cfg.train.seed, cfg.train.run_name = seed, f"{grid_name}-{dataset}-{backbone}-{name}-s{seed}"
                        _log_only(cfg)
                        ann_dir = None
                        if variant.eimf:
                            warmup = have[(dataset, backbone, "backbone", seeds[0])]["export_dir"]

                            def annotation_set(cfg_x: Config) -> str:
                                sp = annotation_plan(cfg_x, warm_fp, lambda fp: fs.join(
                                    out_dir, "annotations", f"{dataset}-{backbone}-{fp[:10]}"))
                                if sp.fingerprint not in annotations:
                                    # the pipeline's rule: a completed manifest with its outputs present is reused
                                    if sp.skip:
                                        log.info("annotation set %s is complete: reused", sp.dir)
                                    run_planned(sp, lambda: annotate.run(
                                        cfg_x, {"model_dir": warmup}, sp.dir, {**child, "variant": name},
                                        f"{grid_name}-annotate-{dataset}-{backbone}-{sp.fingerprint[:10]}"),
                                        owner=grid_name)
                                    annotations[sp.fingerprint] = sp.dir
                                return annotations[sp.fingerprint]

                            cfg_a = _apply(cfg, variant.annotation)
                            ann_dir = annotation_set(cfg_a)
                            if variant.overlay is not None:
                                from eimf.semantic.annotate import merge_annotations

                                top = annotation_set(_apply(cfg, variant.overlay))
                                merged = fs.join(out_dir, "annotations",
                                                 f"{Path(ann_dir).name}+{Path(top).name}")
                                if not fs.exists(fs.join(merged, STATS_FILE)):
                                    merge_annotations(ann_dir, top, merged)
                                ann_dir = merged
                            cfg = _apply(cfg_a, variant.train)
                        else:  # a baseline variant (e.g. text-init): its own overrides, no annotation
                            cfg = _apply(cfg, variant.train)
                        inputs = {"data_path": data_path, **({"annotations": ann_dir} if ann_dir else {})}
                        result = train.run(cfg, inputs,
                                           tags={**child, "variant": name, "seed": str(seed)})
                        export_dir, run_name = result.outputs["model_dir"], result.info["train_run_name"]
                        per_user = save_per_user(export_dir, data_path, per_user_dir, run_name, scored_splits(cfg)) \
                            if not fs.is_s3(str(per_user_dir)) else {}
                        record({"dataset": dataset, "model": backbone, "variant": name, "seed": seed,
                                "run": run_name, "mlflow_run_id": result.mlflow_run_id,
                                "export_dir": export_dir, "annotations": ann_dir,
                                "overrides": list(variant.annotation or ()) + list(variant.train),
                                "metrics": result.metrics, "per_user": per_user})
                        log.info("%s %s %s seed %d: test recall@50 %.4f", dataset, backbone, name, seed,
                                 result.metrics.get("test/recall@50", float("nan")))
        status = "FINISHED"
    finally:
        tracking.end_run(uri, parent, status=status)
    return rows


def by_variant_and_seed(rows: List[dict]) -> Dict[Tuple[str, str], Dict[str, Dict[int, dict]]]:
    """``{(dataset, model): {variant: {seed: row}}}``: how every EIMF table pairs a grid's runs."""
    groups: Dict[Tuple[str, str], Dict[str, Dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        groups[(r["dataset"], r["model"])][r.get("variant", "backbone")][r["seed"]] = r
    return groups


def _mean_std(vals: Sequence[float]) -> Tuple[float, float]:
    a = np.asarray(vals, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def format_eimf_table(rows: List[dict], split: str = "test", metrics: Sequence[str] = ("recall@20", "recall@50"),
                      n_boot: int = 10_000, reference: str = "backbone") -> str:
    """Markdown per (dataset, backbone): one line per variant, mean ± std over seeds of every metric; against the
    ``reference`` variant (the backbone; ``no-aux`` asks what the auxiliary losses add over the same batches) on
    the same seeds, Δ of each of ``metrics`` with its per-user paired bootstrap 95 % CI
    (:mod:`eimf.evaluation.compare`), the per-seed Δ of the last one, and a verdict from its CI (gain / loss /
    no difference). Rows without per-user tables fall back to the per-seed mean ± std and no verdict. Against a
    reference other than the backbone only the EIMF variants are listed."""
    from eimf.evaluation.compare import paired_bootstrap

    groups = by_variant_and_seed(rows)
    head = (["dataset", "model", "variant", "seeds"] + list(TABLE_METRICS)
            + [f"Δ {m} [95 % CI]" for m in metrics] + [f"per-seed Δ {metrics[-1]}", "verdict", "train s", "ex/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dataset, model), by_variant in sorted(groups.items()):
        base = by_variant.get(reference, {})
        if not base:
            continue
        base_tables = {s: load_per_user(r, split) for s, r in base.items()}
        for name in sorted(by_variant, key=_variant_order):
            if reference != "backbone" and name != reference and not _is_eimf(name):
                continue
            runs = {seed: r for seed, r in by_variant[name].items() if metric_key(split, metrics[-1]) in r["metrics"]}
            if not runs:  # e.g. runs that chose settings on valid, in a table of test
                continue
            ms = [r["metrics"] for r in runs.values()]
            cells = [dataset, model, name, str(len(ms))]
            for m in TABLE_METRICS:
                vals = [x[metric_key(split, m)] for x in ms if metric_key(split, m) in x]
                cells.append("{:.4f} ± {:.4f}".format(*_mean_std(vals)) if vals else "-")
            paired = [s for s in runs if s in base]
            if name == reference or not paired:
                cells += ["-"] * (len(metrics) + 2)
            else:
                tables = {s: load_per_user(runs[s], split) for s in paired}
                complete = all(tables[s] is not None and base_tables[s] is not None for s in paired)
                delta = None
                for m in metrics:
                    if complete:
                        delta = paired_bootstrap({s: tables[s] for s in paired},
                                                 {s: base_tables[s] for s in paired}, m, n_boot=n_boot)
                        cells.append(delta.describe())
                    else:  # older rows: per-seed differences only
                        key = metric_key(split, m)
                        diffs = [runs[s]["metrics"][key] - base[s]["metrics"][key] for s in paired]
                        cells.append("{:+.4f} ± {:.4f} (per seed)".format(*_mean_std(diffs)))
                key = metric_key(split, metrics[-1])
                cells.append(", ".join(f"{runs[s]['metrics'][key] - base[s]['metrics'][key]:+.4f}"
                                       for s in sorted(paired)))
                cells.append(delta.verdict if delta is not None else "-")
            for k, fmt in (("train_seconds", "{:.0f}"), ("examples_per_s", "{:.0f}")):
                vals = [x[k] for x in ms if k in x]
                cells.append(fmt.format(float(np.mean(vals))) if vals else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_where_table(rows: List[dict], split: str = "test", metric: str = "recall@50",
                       n_boot: int = 10_000, data_paths: Optional[Dict[str, str]] = None) -> str:
    """Markdown: each variant's Δ ``metric`` against the backbone by quartile of history length and of target
    popularity (per-user paired bootstrap within each quartile). Variants without per-user tables are left out.
    ``data_paths``: dataset -> prepared folder (default: the one the first run's export names)."""
    from eimf.data.preprocess import load_prepared
    from eimf.evaluation.compare import delta_by_quartile, user_features
    from eimf.serving.folder import ModelFolder

    groups = by_variant_and_seed(rows)
    head = ["dataset", "model", "variant", "by"] + [f"Q{k} Δ [95 % CI] (range)" for k in range(1, 5)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dataset, model), by_variant in sorted(groups.items()):
        base = by_variant.get("backbone", {})
        base_tables = {s: load_per_user(r, split) for s, r in base.items()}
        features = None
        for name in sorted(by_variant, key=_variant_order):
            runs = by_variant[name]
            paired = [s for s in runs if s in base and base_tables[s] is not None]
            tables = {s: load_per_user(runs[s], split) for s in paired}
            if name == "backbone" or not paired or any(t is None for t in tables.values()):
                continue
            if features is None:
                path = (data_paths or {}).get(dataset) or \
                    ModelFolder.read_manifest(runs[paired[0]]["export_dir"]).get("data_path")
                data = load_prepared(path)
                features = user_features(getattr(data, split), data.train).set_index("user")
            for col in ("history_length", "target_popularity"):
                quart = delta_by_quartile(tables, {s: base_tables[s] for s in paired}, metric, features[col],
                                          n_boot=n_boot)
                cells = [f"{q['delta']:+.4f} [{q['low']:+.4f}, {q['high']:+.4f}] ({q['range']})" for q in quart]
                lines.append("| " + " | ".join([dataset, model, name, col.replace("_", " ")] + cells) + " |")
    return "\n".join(lines)


#: The summary's comparisons: (treated, reference) variant pairs, each a column when a grid has both.
SUMMARY_PAIRS = (("eimf", "backbone"), ("eimf", "no-aux"), ("eimf", "text-init"), ("no-aux", "backbone"),
                 ("text-init", "backbone"))


def _arm(runs: Dict[int, dict], seeds: Sequence[int], split: str):
    tables = {s: load_per_user(runs[s], split) for s in seeds}
    return tables if all(t is not None for t in tables.values()) else None


def summary_rows(rows: List[dict], split: str = "test", metrics: Sequence[str] = ("recall@20", "recall@50"),
                 pairs: Sequence[Tuple[str, str]] = SUMMARY_PAIRS, n_boot: int = 10_000) -> List[dict]:
    """One record per (dataset, model, treated, reference) of ``pairs`` present in ``rows``: seeds paired, each
    arm's mean ± std of the last metric, and Δ of each metric with its per-user paired bootstrap 95 % CI."""
    from eimf.evaluation.compare import paired_bootstrap

    groups = by_variant_and_seed(rows)
    out = []
    for (dataset, model), by_variant in sorted(groups.items()):
        for treated, reference in pairs:
            a, b = by_variant.get(treated, {}), by_variant.get(reference, {})
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            ta, tb = _arm(a, seeds, split), _arm(b, seeds, split)
            if ta is None or tb is None:
                continue
            rec = {"dataset": dataset, "model": model, "treated": treated, "reference": reference, "seeds": seeds}
            key = metric_key(split, metrics[-1])
            rec["treated_mean"], rec["treated_std"] = _mean_std([a[s]["metrics"][key] for s in seeds])
            rec["reference_mean"], rec["reference_std"] = _mean_std([b[s]["metrics"][key] for s in seeds])
            rec["deltas"] = {m: paired_bootstrap(ta, tb, m, n_boot=n_boot) for m in metrics}
            out.append(rec)
    return out


def format_summary(named_rows: Sequence[Tuple[str, List[dict]]], split: str = "test",
                   metrics: Sequence[str] = ("recall@20", "recall@50"), n_boot: int = 10_000) -> str:
    """Markdown: the comparisons of :data:`SUMMARY_PAIRS` found in each named grid, one line each."""
    last = metrics[-1]
    head = (["grid", "dataset", "model", "comparison", "seeds", f"{split} {last} (treated)",
             f"{split} {last} (reference)"] + [f"Δ {m} [95 % CI]" for m in metrics] + [f"per-seed Δ {last}", "verdict"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in named_rows:
        for rec in summary_rows(rows, split, metrics, n_boot=n_boot):
            d = rec["deltas"]
            lines.append("| " + " | ".join([
                name, rec["dataset"], rec["model"], f"{rec['treated']} vs {rec['reference']}", str(len(rec["seeds"])),
                f"{rec['treated_mean']:.4f} ± {rec['treated_std']:.4f}",
                f"{rec['reference_mean']:.4f} ± {rec['reference_std']:.4f}",
                *[d[m].describe() for m in metrics],
                ", ".join(f"{d[last].per_seed[s]:+.4f}" for s in d[last].seeds), d[last].verdict]) + " |")
    return "\n".join(lines)
