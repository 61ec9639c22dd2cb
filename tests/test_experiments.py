"""The experiment runner: variants map to the right settings, the comparison table's arithmetic, and (e2e, small)
an EIMF grid whose runs are MLflow children of one parent run in one experiment."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eimf.config import load_config
from eimf.experiments import VARIANTS, Variant, cell_config, cell_stages, format_eimf_table
from eimf.experiments.variants import with_overrides as _apply
from eimf.pipeline import Pipeline

DATA_DIR = os.environ.get("EIMF_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


def test_variants_are_one_switch_each():
    base = load_config(None, ["semantic.budget=0.2"])
    assert not VARIANTS["backbone"].eimf and VARIANTS["eimf"].eimf
    eimf = _apply(_apply(base, VARIANTS["eimf"].annotation), VARIANTS["eimf"].train)
    assert (eimf.semantic.annotator, eimf.semantic.selection, eimf.semantic.budget) == ("metadata", "typical", 0.2)
    no_sp = _apply(base, VARIANTS["no-sp"].train)
    assert (no_sp.eimf.lambda_sp, no_sp.eimf.lambda_ma) == (0.0, base.eimf.lambda_ma)
    no_ma = _apply(base, VARIANTS["no-ma"].train)
    assert (no_ma.eimf.lambda_sp, no_ma.eimf.lambda_ma) == (base.eimf.lambda_sp, 0.0)
    assert _apply(base, VARIANTS["random"].annotation).semantic.selection == "random"
    assert _apply(base, VARIANTS["budget-1%"].annotation).semantic.budget == 0.01
    assert _apply(base, VARIANTS["budget-100%"].annotation).semantic.budget == 1.0
    assert _apply(base, VARIANTS["llm-5%"].annotation).semantic.annotator == "vllm"
    text = VARIANTS["eimf-text"]  # EIMF on the text-initialised table, on the eimf runs' annotation set
    assert text.eimf and text.annotation == VARIANTS["eimf"].annotation
    assert _apply(base, text.train).model.item_init == "text" and not VARIANTS["text-init"].eimf
    assert base.semantic.budget == 0.2 and base.eimf.lambda_sp > 0  # _apply copies, never mutates


def test_annotation_sets_are_keyed_by_the_pipelines_fingerprints(tmp_path, monkeypatch):
    """One reuse rule for grids and the pipeline: a grid cell is a pipeline, and its annotation set's fingerprint is
    its semantic settings plus the warm-up's."""
    base = load_config(None, [f"pipeline.storage_path={tmp_path}"])

    def plan(cfg, data_fp="d1", variant=Variant("x", "EIMF as configured", annotation=()), seed=1):
        monkeypatch.setattr("eimf.pipeline.data_fingerprint", lambda data_cfg: data_fp)
        cell = cell_config(cfg, "ml-100k", cfg.model.backbone, seed, 1, "g-cell")
        return {sp.name: sp for sp in Pipeline(cell, cell_stages(cell, variant)).plan()}

    def fp(cfg, data_fp="d1"):
        return plan(cfg, data_fp)["annotate"].fingerprint

    same = fp(_apply(base, VARIANTS["eimf"].annotation))
    assert same == fp(_apply(base, VARIANTS["no-sp"].annotation))  # one annotation set, two runs
    assert same != fp(_apply(base, VARIANTS["random"].annotation))
    assert same != fp(_apply(base, VARIANTS["budget-1%"].annotation))
    assert same != fp(_apply(base, ["model.backbone=comirec_dr", *VARIANTS["eimf"].annotation]))  # another warm-up
    assert same != fp(_apply(base, VARIANTS["eimf"].annotation), data_fp="d2")  # other data
    # where the cache lives or how many prompts go per chunk does not change the answers
    assert same == fp(_apply(base, [*VARIANTS["eimf"].annotation, "semantic.chunk_size=7",
                                    "semantic.cache_dir=/elsewhere"]))
    # nor does scoring the warm-up on valid only: a grid choosing settings reuses the final grid's annotation sets
    assert same == fp(_apply(base, [*VARIANTS["eimf"].annotation, "eval.score_test=false"]))
    sp = plan(base)["annotate"]
    assert not sp.skip and sp.reason == "not run yet" and sp.dir.startswith(str(tmp_path))
    # every seed and variant of a cell is annotated from one warm-up: the first seed's backbone run itself
    eimf = {seed: plan(base, variant=VARIANTS["eimf"], seed=seed) for seed in (1, 2)}
    text = plan(base, variant=VARIANTS["eimf-text"], seed=2)  # its item_init=text does not reach the warm-up
    backbone = {seed: plan(base, variant=VARIANTS["backbone"], seed=seed) for seed in (1, 2)}
    warmup = eimf[1]["warmup"]
    assert eimf[2]["warmup"].dir == text["warmup"].dir == backbone[1]["train"].dir == warmup.dir
    assert backbone[2]["train"].dir != warmup.dir and "warmup" not in backbone[1]
    assert eimf[2]["annotate"].dir == eimf[1]["annotate"].dir and eimf[2]["train"].dir != eimf[1]["train"].dir


def _stand_in_steps(monkeypatch, calls):
    """Every step replaced by one that writes its output files and records (step, seed, max_steps, run name)."""
    from eimf.steps import StepOutput

    def stand_in(step, files):
        def run(cfg, inputs, out_dir, tags=None, run_name=None, **kwargs):
            seed_steps = (cfg.train.seed, cfg.train.max_steps) if cfg is not None else (None, None)
            calls.append((step, *seed_steps, run_name))
            names = dict(files)
            if kwargs.get("per_user"):
                names.update({f"per_user_{s}": f"per_user.{s}.parquet" for s in kwargs["splits"]})
            out = {k: str(Path(out_dir) / v) for k, v in names.items()}
            for path in out.values():
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text("x")
            return StepOutput(out, {"test/recall@50": 0.1} if step == "train" else {})
        return run

    for step, files in {"prepare": {"data_path": "data"}, "train": {"model_dir": "export"},
                        "annotate": {"annotations": "annotations.parquet"}, "evaluate": {"metrics": "metrics.json"},
                        "export": {"model_dir": "model"}}.items():
        monkeypatch.setattr(f"eimf.steps.{step}.run", stand_in(step, files))
    monkeypatch.setattr("eimf.pipeline.data_fingerprint", lambda data_cfg: "fixed")
    monkeypatch.setattr("eimf.ray_init.init_ray", lambda **kw: None)


def test_a_grid_and_a_pipeline_with_the_same_settings_share_their_stages(tiny_dataset, tmp_path, monkeypatch):
    """Grid then pipeline: the pipeline trains nothing (only its own export runs); pipeline then grid: the grid
    trains only the runs the pipeline did not (its warm-up is the first seed's backbone, its EIMF run that seed's)."""
    from eimf.experiments import run_eimf_grid

    calls = []
    _stand_in_steps(monkeypatch, calls)
    common = [*tiny_dataset, "tracking.enabled=false", "train.max_steps=9", "semantic.annotator=metadata"]

    def grid(store):
        base = load_config(None, [*common, f"pipeline.storage_path={store}"])
        return run_eimf_grid(base, ["custom"], ["comirec_sa"], [1, 2], ["backbone", "eimf"],
                             raw_path=store / "g.jsonl", grid_name="g")

    def pipeline(store):  # what jobs/pipeline.py runs with the grid's settings for its second seed
        Pipeline(load_config(None, [*common, f"pipeline.storage_path={store}", "pipeline.run_name=p",
                                    "train.seed=2", "pipeline.warmup_steps=9", "pipeline.warmup_seed=1"])).run()

    rows = grid(tmp_path / "a")
    trained = sorted((seed, steps) for step, seed, steps, _ in calls if step == "train")
    assert trained == [(1, 9), (1, 9), (2, 9), (2, 9)]  # backbone 1 (the warm-up), eimf 1, backbone 2, eimf 2
    assert [c[0] for c in calls].count("annotate") == 1 and [c[0] for c in calls].count("prepare") == 1
    eimf = [r for r in rows if r["variant"] == "eimf"]
    assert len(rows) == 4 and eimf[0]["annotations"] == eimf[1]["annotations"]
    assert all(Path(p).exists() for r in rows for p in r["per_user"].values())
    calls.clear()
    pipeline(tmp_path / "a")
    assert [c[0] for c in calls] == ["export"]  # prepare, warm-up, annotation, training, evaluation: the grid's
    manifests = {s: json.loads((tmp_path / "a" / "p" / s / "manifest.json").read_text()) for s in ("warmup", "train")}
    assert manifests["train"]["pipeline_run"] == "g-custom-comirec_sa-eimf-s2"
    assert manifests["warmup"]["pipeline_run"] == "g-custom-comirec_sa-backbone-s1"

    calls.clear()
    pipeline(tmp_path / "b")
    calls.clear()
    grid(tmp_path / "b")
    assert [c[0] for c in calls if c[0] in ("prepare", "annotate")] == []
    # the pipeline's warm-up is the backbone on seed 1, its EIMF run the eimf run on seed 2: two runs left
    trained = [c[3].rsplit("-", 1)[0] for c in calls if c[0] == "train"]
    assert trained == ["g-custom-comirec_sa-eimf-s1-train", "g-custom-comirec_sa-backbone-s2-train"]


def _row(variant, seed, r50, r20=0.1, per_user=None):
    return {"dataset": "ml-100k", "model": "comirec_sa", "variant": variant, "seed": seed,
            "metrics": {"test/recall@50": r50, "test/recall@20": r20, "test/ndcg@20": 0.0, "test/hitrate@20": 0.0,
                        "test/ndcg@50": 0.0, "test/hitrate@50": 0.0, "train_seconds": 10.0 * seed,
                        "examples_per_s": 1000.0},
            **({"per_user": per_user} if per_user else {})}


def _cells(table, variant):
    line = [x for x in table.splitlines() if f" {variant} " in x][0]
    return [c.strip() for c in line.strip("| ").split(" | ")]


def test_table_gives_the_paired_bootstrap_ci_and_its_verdict(tmp_path):
    """Per-user tables on disk: Δ with its CI per metric, the per-seed Δ, and a verdict from the CI."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in (1, 2, 3):
        base = rng.uniform(0, 0.5, 800)
        arms = {"backbone": base, "eimf": base + 0.05 + rng.normal(0, 0.05, 800),  # a real gain
                "no-ma": base + rng.normal(0, 0.05, 800)}  # noise only
        for variant, r50 in arms.items():
            path = tmp_path / f"{variant}-{seed}.test.parquet"
            pd.DataFrame({"user": np.arange(800), "recall@20": r50 / 2, "recall@50": r50}).to_parquet(path)
            rows.append(_row(variant, seed, float(r50.mean()), float(r50.mean() / 2),
                             per_user={"test": str(path)}))
    table = format_eimf_table(rows, n_boot=500)
    head = [c.strip() for c in table.splitlines()[0].strip("| ").split(" | ")]
    assert head[10:14] == ["Δ recall@20 [95 % CI]", "Δ recall@50 [95 % CI]", "per-seed Δ recall@50", "verdict"]
    assert [line.split(" | ")[2] for line in table.splitlines()[2:]] == ["backbone", "eimf", "no-ma"]
    eimf, no_ma, base = _cells(table, "eimf"), _cells(table, "no-ma"), _cells(table, "backbone")
    assert eimf[3] == "3" and eimf[13] == "gain" and eimf[11].startswith("+0.05")
    low, high = (float(x) for x in eimf[11].split("[")[1].rstrip("]").split(", "))
    assert 0 < low < 0.05 < high
    assert len(eimf[12].split(", ")) == 3 and all(float(d) > 0.04 for d in eimf[12].split(", "))
    assert no_ma[13] == "no difference"
    assert base[10:14] == ["-"] * 4  # no delta against itself


def test_table_against_the_sampler_control_lists_only_eimf_variants(tmp_path):
    """reference="no-aux": Δ of each EIMF variant over the same batches without the auxiliary losses; the
    backbone and text-init (no EIMF) are not listed."""
    rng = np.random.default_rng(1)
    rows = []
    for seed in (1, 2, 3):
        base = rng.uniform(0, 0.5, 600)
        arms = {"backbone": base, "no-aux": base + 0.01, "eimf": base + 0.04 + rng.normal(0, 0.02, 600),
                "text-init": base + 0.02}
        for variant, r50 in arms.items():
            path = tmp_path / f"{variant}-{seed}.test.parquet"
            pd.DataFrame({"user": np.arange(600), "recall@20": r50 / 2, "recall@50": r50}).to_parquet(path)
            rows.append(_row(variant, seed, float(r50.mean()), float(r50.mean() / 2),
                             per_user={"test": str(path)}))
    table = format_eimf_table(rows, n_boot=500, reference="no-aux")
    assert [line.split(" | ")[2] for line in table.splitlines()[2:]] == ["eimf", "no-aux"]
    eimf = _cells(table, "eimf")
    assert eimf[11].startswith("+0.03") and eimf[13] == "gain"
    assert _cells(table, "no-aux")[10:14] == ["-"] * 4
    assert format_eimf_table([r for r in rows if r["variant"] != "no-aux"], reference="no-aux").count("\n") == 1


def test_table_without_per_user_tables_falls_back_to_per_seed_differences():
    rows = [_row("backbone", s, v) for s, v in zip((1, 2, 3), (0.20, 0.22, 0.24))]
    rows += [_row("eimf", s, v) for s, v in zip((1, 2, 3), (0.25, 0.27, 0.29))]
    cells = _cells(format_eimf_table(rows), "eimf")
    assert cells[11] == "+0.0500 ± 0.0000 (per seed)" and cells[12] == "+0.0500, +0.0500, +0.0500"
    assert cells[13] == "-"  # no verdict without the per-user interval
    partial = _cells(format_eimf_table(rows[:2] + rows[3:6]), "eimf")  # seed 3 lacks its backbone: left out
    assert partial[12] == "+0.0500, +0.0500"


def test_unknown_variant_is_rejected(tmp_path):
    from eimf.experiments import run_eimf_grid

    with pytest.raises(ValueError, match="unknown variants"):
        run_eimf_grid(load_config(None, []), ["ml-100k"], ["comirec_sa"], [1], ["eimf", "nope"],
                      raw_path=tmp_path / "r.jsonl", grid_name="g", out_dir=str(tmp_path))


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.skipif(not Path(DATA_DIR, "ml-100k").exists(), reason="ml-100k not in EIMF_DATA_DIR")
def test_eimf_grid_runs_are_children_of_one_parent_run(tmp_path, monkeypatch, ray_session):
    """backbone + EIMF (metadata annotator) on ML-100K, one seed, 40 steps: the warm-up is the backbone run, each
    run is a pipeline whose run is a child of the grid's parent run, the table and raw rows are written, a second
    call runs nothing, a third with one more variant reuses the annotation set, and a pipeline with the same
    settings trains nothing."""
    from mlflow.tracking import MlflowClient

    from eimf.experiments import run_eimf_grid

    monkeypatch.setenv("EIMF_HOME", str(tmp_path / "home"))
    base_overrides = [f"data.data_dir={DATA_DIR}", "tracking.experiment=grid-test", "train.max_steps=40",
                      "train.eval_every=20", "train.log_every=20", "semantic.budget=0.02",
                      f"data.output_dir={tmp_path / 'data'}"]
    base = load_config(None, base_overrides)
    raw = tmp_path / "rows.jsonl"
    rows = run_eimf_grid(base, ["ml-100k"], ["comirec_sa"], [1], ["backbone", "eimf"], raw_path=raw,
                         grid_name="g1", out_dir=str(tmp_path / "work"))
    assert [(r["variant"], r["seed"]) for r in rows] == [("backbone", 1), ("eimf", 1)]
    assert rows[1]["annotations"].startswith(str(tmp_path / "work" / "stages" / "annotate"))
    assert all(np.isfinite(r["metrics"]["test/recall@50"]) for r in rows)
    # how much of a typical row's history its prompt showed, measured on every EIMF run
    assert 0 < rows[1]["metrics"]["window_overlap_share"] <= 1 and "window_overlap_share" not in rows[0]["metrics"]
    # how the step ran: the precision train.precision=auto resolved to; no compile, so no compile seconds
    assert all(r["metrics"]["bf16"] in (0.0, 1.0) and "compile_seconds" not in r["metrics"] for r in rows)
    # each run's per-user tables (for the paired bootstrap) average to its logged test metrics
    from eimf.experiments import load_per_user

    for r in rows:
        test = load_per_user(r, "test")
        assert len(test) == r["metrics"]["test/n_users"] and load_per_user(r, "valid") is not None
        assert abs(test["recall@50"].mean() - r["metrics"]["test/recall@50"]) < 1e-6
    from eimf.experiments import format_where_table

    where = format_where_table(rows, n_boot=200).splitlines()
    assert [line.split(" | ")[2:4] for line in where[2:]] == [["eimf", "history length"],
                                                              ["eimf", "target popularity"]]

    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("grid-test")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("kind") == "experiment-grid"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    cells = {r.data.tags["variant"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert sorted(cells) == ["backbone", "eimf"] and {c.data.tags["stage"] for c in cells.values()} == {"pipeline"}
    stages = {(v, r.data.tags["stage"]): r for v, c in cells.items() for r in runs
              if r.data.tags.get("mlflow.parentRunId") == c.info.run_id}
    # the eimf pipeline's prepare and warm-up stages are the backbone pipeline's (run there, skipped here)
    assert sorted(stages) == [("backbone", "evaluate"), ("backbone", "export"), ("backbone", "prepare"),
                              ("backbone", "train"), ("eimf", "annotate"), ("eimf", "evaluate"), ("eimf", "export"),
                              ("eimf", "train")]
    trained = {v: stages[(v, "train")] for v in cells}
    assert trained["eimf"].data.tags["eimf"] == "on" and trained["backbone"].data.tags["eimf"] == "off"
    assert "train/loss/semantic_prediction" in trained["eimf"].data.metrics
    assert "train/loss/semantic_prediction" not in trained["backbone"].data.metrics
    assert "test/recall_at_50" in trained["eimf"].data.metrics

    again = run_eimf_grid(base, ["ml-100k"], ["comirec_sa"], [1], ["backbone", "eimf"], raw_path=raw,
                          grid_name="g1", out_dir=str(tmp_path / "work"))
    assert len(again) == 2 and len(raw.read_text().splitlines()) == 2
    assert len(client.search_runs([exp.experiment_id])) == len(runs)  # nothing new, the parent reused

    # a resumed grid with one more variant on the same annotation settings trains it on the set already on disk
    more = run_eimf_grid(base, ["ml-100k"], ["comirec_sa"], [1], ["backbone", "eimf", "no-sp"], raw_path=raw,
                         grid_name="g1", out_dir=str(tmp_path / "work"))
    assert [r["variant"] for r in more] == ["backbone", "eimf", "no-sp"]
    assert more[2]["annotations"] == rows[1]["annotations"]
    known = {r.info.run_id for r in runs}
    new = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id not in known]
    assert sorted((r.data.tags.get("variant", ""), r.data.tags["stage"]) for r in new) == [
        ("", "evaluate"), ("", "export"), ("", "train"), ("no-sp", "pipeline")]

    # a setting chosen on valid: its run reads no test split; the grid run again on test scores its export there,
    # without training it again, and the .jsonl's last row of that run counts
    spec = "eimf[eimf.lambda_ma=0.05]"
    valid_only = load_config(None, [*base_overrides, "eval.score_test=false"])
    tuned = run_eimf_grid(valid_only, ["ml-100k"], ["comirec_sa"], [1], [spec], raw_path=raw,  # warm-up implied
                          grid_name="g1", out_dir=str(tmp_path / "work"))[-1]
    assert tuned["variant"] == spec and not any(k.startswith("test/") for k in tuned["metrics"])
    assert set(tuned["per_user"]) == {"valid"}
    n_runs = len(client.search_runs([exp.experiment_id]))
    final = run_eimf_grid(base, ["ml-100k"], ["comirec_sa"], [1], ["backbone", spec], raw_path=raw,
                          grid_name="g1", out_dir=str(tmp_path / "work"))
    scored = [r for r in final if r["variant"] == spec]
    assert len(scored) == 1 and scored[0]["test_scored_after_training"]
    assert scored[0]["export_dir"] == tuned["export_dir"] and len(client.search_runs([exp.experiment_id])) == n_runs
    assert abs(load_per_user(scored[0], "test")["recall@50"].mean() - scored[0]["metrics"]["test/recall@50"]) < 1e-9
    from eimf.experiments import read_rows

    assert [r["variant"] for r in read_rows(raw)] == ["backbone", "eimf", "no-sp", spec]
    assert "test/recall@50" in read_rows(raw)[-1]["metrics"]

    # jobs/pipeline.py with the grid's settings: every stage is the grid's but its own export; nothing trains
    p = Pipeline(load_config(None, [*base_overrides, "data.dataset=ml-100k", "semantic.annotator=metadata",
                                    "pipeline.warmup_steps=40", "pipeline.warmup_seed=1", "train.seed=1",
                                    "pipeline.run_name=p",
                                    f"pipeline.storage_path={tmp_path / 'work'}"]))
    assert [(r.stage, r.status) for r in p.run()] == [(s, "skipped") for s in
                                                      ("prepare", "warmup", "annotate", "train", "evaluate")] + [
        ("export", "ran"), ("promote", "ran")]
    assert p.result("train").metrics == rows[1]["metrics"]


def test_grid_job_arguments_are_typed_and_checked(capsys, monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("grid_job", Path(__file__).resolve().parents[1] / "jobs" / "experiments.py")
    job = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "grid_job", job)  # dataclasses look their module up there
    spec.loader.exec_module(job)
    args, overrides = job.parse_args(["--datasets", "ml-100k", "--seeds", "1", "2", "--work-dir", "/w",
                                      "--variants", "backbone", "eimf", "--output", "t.md", "model.dim=8"])
    assert (args.datasets, args.seeds, args.variants, args.work_dir) == (["ml-100k"], [1, 2], ["backbone", "eimf"], "/w")
    assert overrides == ["model.dim=8"] and args.backbones == ["comirec_sa", "comirec_dr"]
    args, _ = job.parse_args(["--variants", "backbone", "eimf[eimf.lambda_ma=0.03]", "--split", "valid"])
    assert args.variants[1] == "eimf[eimf.lambda_ma=0.03]" and args.split == "valid"
    for bad, said in ((["--variants", "nope"], "unknown nope"), (["--seeds", "1", "1"], "repeats a seed"),
                      (["--split", "train"], "valid or test"), (["--variants", "eimf[x]"], "unknown eimf[x]")):
        with pytest.raises(SystemExit):
            job.parse_args(bad)
        assert said in capsys.readouterr().err


def test_rows_keep_their_per_user_tables_relative_to_the_results_folder(tmp_path):
    """A results folder moved elsewhere (another checkout) still finds each run's per-user tables."""
    import shutil

    from eimf.experiments import append_row, load_per_user, read_rows

    here = tmp_path / "docs"
    table = here / "per_user" / "g" / "run1" / "per_user.test.parquet"
    table.parent.mkdir(parents=True)
    pd.DataFrame({"user": [1, 2], "recall@50": [0.5, 0.0]}).to_parquet(table)
    outside = tmp_path / "elsewhere.parquet"
    append_row(here / "g.jsonl", _row("eimf", 1, 0.25, per_user={"test": str(table), "valid": str(outside)}))
    stored = (here / "g.jsonl").read_text()
    assert '"test": "per_user/g/run1/per_user.test.parquet"' in stored and str(outside) in stored
    shutil.move(str(here), str(tmp_path / "moved"))
    (row,) = read_rows(tmp_path / "moved" / "g.jsonl")
    assert row["per_user"]["test"] == str(tmp_path / "moved" / "per_user" / "g" / "run1" / "per_user.test.parquet")
    assert load_per_user(row, "test")["recall@50"].tolist() == [0.5, 0.0]
    assert read_rows(tmp_path / "none.jsonl") == []


def test_a_variant_spec_adds_settings_to_a_named_variant():
    from eimf.experiments import resolve_variant

    v = resolve_variant("eimf[eimf.lambda_ma=0.03, eimf.temperature=0.2,semantic.budget=0.1]")
    assert v.eimf and v.annotation == VARIANTS["eimf"].annotation + ("semantic.budget=0.1",)
    assert v.train == ("eimf.lambda_ma=0.03", "eimf.temperature=0.2")
    cfg = _apply(_apply(load_config(None, []), v.annotation), v.train)
    assert (cfg.eimf.lambda_ma, cfg.eimf.temperature, cfg.semantic.budget) == (0.03, 0.2, 0.1)
    assert resolve_variant("no-sp[eimf.lambda_ma=0.1]").train == ("eimf.lambda_sp=0", "eimf.lambda_ma=0.1")
    assert resolve_variant("eimf") is VARIANTS["eimf"]
    for bad, said in (("nope[eimf.tau=1]", "unknown variants"), ("eimf[]", "expected"), ("eimf[x]", "key=value"),
                      ("text-init[semantic.budget=0.1]", "without annotations")):
        with pytest.raises(ValueError, match=said):
            resolve_variant(bad)


def test_valid_tables_read_the_best_valid_metrics_and_specs_sort_after_their_variant(tmp_path):
    """--split valid: tables from ``best_valid/*`` and the valid per-user tables; no test metric needed."""
    rng = np.random.default_rng(2)
    rows = []
    for seed in (1, 2):
        base = rng.uniform(0, 0.5, 500)
        for variant, r50 in {"backbone": base, "eimf[eimf.lambda_ma=0.1]": base + 0.03, "eimf": base,
                             "no-aux": base}.items():
            path = tmp_path / f"{variant}-{seed}.valid.parquet"
            pd.DataFrame({"user": np.arange(500), "recall@20": r50 / 2, "recall@50": r50}).to_parquet(path)
            rows.append({"dataset": "ml-100k", "model": "comirec_sa", "variant": variant, "seed": seed,
                         "metrics": {"best_valid/recall@50": float(r50.mean()),
                                     "best_valid/recall@20": float(r50.mean() / 2)},
                         "per_user": {"valid": str(path)}})
    table = format_eimf_table(rows, split="valid", n_boot=300)
    assert [line.split(" | ")[2] for line in table.splitlines()[2:]] == [
        "backbone", "eimf", "eimf[eimf.lambda_ma=0.1]", "no-aux"]
    tuned = _cells(table, "eimf[eimf.lambda_ma=0.1]")
    assert tuned[11].startswith("+0.03") and tuned[13] == "gain" and tuned[7].startswith("0.")
    assert _cells(table, "eimf")[13] == "no difference"
    # in a table of test, runs scored on valid only are left out
    assert format_eimf_table(rows, n_boot=300).count("\n") == 1
    # against the sampler control a spec counts as the EIMF variant it extends
    against = format_eimf_table(rows, split="valid", n_boot=300, reference="no-aux")
    assert [line.split(" | ")[2] for line in against.splitlines()[2:]] == ["eimf", "eimf[eimf.lambda_ma=0.1]",
                                                                           "no-aux"]


def test_summary_pairs_eimf_with_each_reference_a_grid_has(tmp_path):
    from eimf.experiments import format_summary

    rng = np.random.default_rng(3)
    rows = []
    for seed in (1, 2, 3):
        base = rng.uniform(0, 0.5, 400)
        for variant, r50 in {"backbone": base, "eimf": base + 0.04, "no-aux": base + rng.normal(0, 0.02, 400)}.items():
            path = tmp_path / f"{variant}-{seed}.test.parquet"
            pd.DataFrame({"user": np.arange(400), "recall@20": r50 / 2, "recall@50": r50}).to_parquet(path)
            rows.append(_row(variant, seed, float(r50.mean()), float(r50.mean() / 2), per_user={"test": str(path)}))
    table = format_summary([("g", rows), ("old", [_row("backbone", 1, 0.2), _row("eimf", 1, 0.3)])], n_boot=300)
    lines = table.splitlines()[2:]
    assert [line.split(" | ")[3] for line in lines] == ["eimf vs backbone", "eimf vs no-aux", "no-aux vs backbone"]
    eimf = [c.strip() for c in lines[0].strip("| ").split(" | ")]
    assert eimf[4] == "3" and eimf[8].startswith("+0.04") and eimf[10] == "gain"
    assert [c.strip() for c in lines[2].strip("| ").split(" | ")][10] == "no difference"
    # rows without per-user tables give no interval, so no line
    assert not any(line.startswith("| old") for line in lines)


def test_a_grid_resumed_with_other_settings_stops_before_running_anything(tmp_path, monkeypatch):
    """A resumed grid skips the cells in its .jsonl: one there from other overrides would be silently kept."""
    from eimf.config import ConfigError
    from eimf.experiments import grid
    from eimf.experiments.tables import append_row

    monkeypatch.setattr(grid, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    monkeypatch.setattr(grid, "Pipeline", lambda *a, **k: pytest.fail("a pipeline ran"))
    raw = tmp_path / "grid.jsonl"
    append_row(raw, {"dataset": "ml-1m", "model": "mostpop", "seed": 0, "metrics": {}})
    append_row(raw, {"dataset": "ml-1m", "model": "remi", "seed": 1, "metrics": {},
                     "overrides": ["train.precision=bf16"]})
    base = load_config(None, [])
    with pytest.raises(ConfigError, match=r"grid.jsonl: ml-1m remi seed 1 .*train.precision=bf16.*model.beta=1"):
        grid.run_grid(base, ["ml-1m"], ["remi"], [1, 2], raw, overrides=["train.precision=bf16", "model.beta=1"])
    # The same overrides resume as before: seed 1 is skipped, seed 2 runs
    ran = []
    monkeypatch.setattr(grid, "run_cell", lambda cfg, *a, **k: ran.append(cfg.train.seed) or {"metrics": {}})
    monkeypatch.setattr(grid, "backbone_stages", lambda cfg: [])
    grid.run_grid(base, ["ml-1m"], ["remi"], [1, 2], raw, overrides=["train.precision=bf16"])
    assert ran == [2]
