"""The experiment runner: variants map to the right settings, the comparison table's arithmetic, and (e2e, small)
an EIMF grid whose runs are MLflow children of one parent run in one experiment."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eimf.config import load_config
from eimf.experiments import VARIANTS, _apply, annotation_plan, format_eimf_table, warmup_fingerprint

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


def test_annotation_sets_are_keyed_by_the_pipelines_fingerprints(tmp_path):
    """One reuse rule for grids and the pipeline: a set's fingerprint is its semantic settings plus the warm-up's."""
    base = load_config(None, [])

    def fp(cfg, data_fp="d1"):
        return annotation_plan(cfg, warmup_fingerprint(cfg, data_fp), lambda f: str(tmp_path / f[:10])).fingerprint

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
    sp = annotation_plan(base, "w", lambda f: str(tmp_path / f[:10]))
    assert not sp.skip and sp.reason == "not run yet" and sp.dir.startswith(str(tmp_path))


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
    """backbone + EIMF (metadata annotator) on ML-100K, one seed, 40 steps: the warm-up is the backbone run, the
    annotation and both trainings are children of the grid's parent run, the table and raw rows are written,
    a second call runs nothing, and a third with one more variant reuses the annotation set."""
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
    assert rows[1]["annotations"].startswith(str(tmp_path / "work" / "annotations"))
    assert all(np.isfinite(r["metrics"]["test/recall@50"]) for r in rows)
    # how much of a typical row's history its prompt showed, measured on every EIMF run
    assert 0 < rows[1]["metrics"]["window_overlap_share"] <= 1 and "window_overlap_share" not in rows[0]["metrics"]
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
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.data.tags.get("variant") for r in children) == ["backbone", "eimf", "eimf"]  # + annotation
    trained = {r.data.tags["variant"]: r for r in children if r.data.tags.get("stage") != "annotate"}
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
    assert [(r.data.tags.get("variant"), r.data.tags.get("stage")) for r in new] == [("no-sp", None)]

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
