"""The promotion gate (eimf.steps.promote) against a real MLflow registry (`mlflow server`): the first registered
model becomes ``champion``, a worse one (1 training step) ``challenger``, a better one, warm-started from
``models:/<name>@champion`` on a newer log with new items, ``champion``; the comparison is in the gate's run. And
the pieces: the decision rule, the settings, the plan's pinned source (a moved alias is a new fingerprint)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eimf.config import ConfigError, load_config
from eimf.data.synthetic import custom_overrides, synthesize
from eimf.steps.promote import decide, promote_split


# ------------------------------------------------------------------------------------------------- fast
def test_the_first_model_is_champion_and_a_later_one_must_beat_it_by_the_margin():
    assert decide(0.10, None, 0.05) == (True, "no champion yet")
    assert decide(0.20, 0.10, 0.05)[0] and decide(0.20, 0.10, 0.0)[0]
    assert not decide(0.12, 0.10, 0.05)[0]  # better, by less than the margin
    assert not decide(0.10, 0.10, 0.0)[0]  # a tie keeps the champion
    assert not decide(0.05, 0.10, 0.0)[0]
    assert "not better by -0.05" in decide(0.05, 0.10, 0.0)[1]


def test_gate_settings_are_checked():
    cfg = load_config(None, [])
    assert cfg.pipeline.promote and cfg.pipeline.promote_metric == "recall@50" and promote_split(cfg) == "test"
    assert promote_split(load_config(None, ["pipeline.eval_splits=[test,valid]"])) == "valid"
    assert promote_split(load_config(None, ["pipeline.promote_split=valid"])) == "valid"
    for bad, msg in (("pipeline.promote_metric=recall", "<metric>@<k>"), ("pipeline.promote_margin=-0.1", ">= 0"),
                     ("pipeline.promote_split=train", "valid, test or null")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [bad])


def test_the_gate_runs_only_where_the_model_is_registered(tiny_dataset, tmp_path):
    from eimf.pipeline import Pipeline, backbone_stages, promotes
    from eimf.steps.promote import promote_topk

    base = [*tiny_dataset, f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    assert promotes(load_config(None, base))
    for off in ("tracking.registered_model=''", "tracking.log_model=false", "tracking.enabled=false",
                "pipeline.promote=false"):
        cfg = load_config(None, [*base, off])
        assert not promotes(cfg) and [s.name for s in backbone_stages(cfg)][-1] == "export", off
    cfg = load_config(None, [*base, "pipeline.run_name=gate", f"pipeline.storage_path={tmp_path / 'p'}"])
    plans = {sp.name: sp for sp in Pipeline(cfg, backbone_stages(cfg)).plan()}
    assert plans["promote"].inputs == {"prepare": plans["prepare"].fingerprint, "export": plans["export"].fingerprint}
    assert plans["promote"].dir == str(tmp_path / "p" / "gate" / "promote")  # the run's own: it meets the registry
    with pytest.raises(ConfigError, match="10 is not one of eval.topk"):
        promote_topk(load_config(None, ["pipeline.promote_metric=ndcg@10"]))


# ------------------------------------------------------------------------------------------------- e2e
def _newer_log(old: Path, new: Path) -> None:
    """The log one day later: the old one, plus 10 new items (with titles) seen by 8 users each, last."""
    shutil.copytree(old, new)
    ids = np.arange(5000, 5010)
    users = np.arange(80) * 7 % 600
    pd.DataFrame({"user_id": users, "item_id": np.repeat(ids, 8), "timestamp": 1_700_000_000 + np.arange(80)}) \
        .to_parquet(new / "interactions" / "part-new.parquet", index=False)
    items = pd.read_parquet(new / "items.parquet")
    pd.concat([items, pd.DataFrame({"item_id": ids, "title": [f"quiet tea sets #{i}" for i in ids]})]) \
        .to_parquet(new / "items.parquet", index=False)


@pytest.mark.e2e
def test_promotion_gate_in_both_directions_against_a_registry(tmp_path, ray_session, mlflow_server, monkeypatch):
    from eimf import tracking
    from eimf.pipeline import Pipeline, backbone_stages
    from eimf.steps.registry import version_by_alias

    monkeypatch.setenv("EIMF_HOME", str(tmp_path / "home"))
    old, new = tmp_path / "raw" / "old", tmp_path / "raw" / "new"
    synthesize(str(old), users=600, items=400, interactions=15000, seed=11, clusters=12)
    _newer_log(old, new)
    name = "eimf-promotion-test"

    def pipeline(run: str, folder: Path, *more):
        cfg = load_config(None, custom_overrides(str(folder)) + [
            f"data.output_dir={tmp_path / 'prepared'}", "model.dim=16", "model.num_interests=2", "model.maxlen=20",
            "train.log_every=50", "train.patience=100", f"pipeline.run_name={run}",
            f"pipeline.storage_path={tmp_path / 'pipelines'}", f"tracking.tracking_uri={mlflow_server}",
            f"tracking.registered_model={name}", "tracking.experiment=promotion", *more])
        return Pipeline(cfg, backbone_stages(cfg))

    def gate(run: str) -> dict:
        return json.loads((tmp_path / "pipelines" / run / "promote" / "decision.json").read_text())

    client = tracking.client(mlflow_server)
    # 1. the first registered model: champion, there being none
    pipeline("first", old, "train.max_steps=80", "train.eval_every=40").run()
    assert gate("first")["promoted"] and gate("first")["reason"] == "no champion yet"
    assert version_by_alias(mlflow_server, name, "champion").version == "1"

    # 2. one training step: worse, so challenger; the champion stays
    results = pipeline("worse", old, "train.max_steps=1", "train.eval_every=1").run()
    d = gate("worse")
    assert not d["promoted"] and d["alias"] == "challenger" and d["champion_version"] == "1"
    assert d["new"] < d["champion"], d
    assert version_by_alias(mlflow_server, name, "champion").version == "1"
    assert version_by_alias(mlflow_server, name, "challenger").version == "2"
    run = client.get_run(next(r for r in results if r.stage == "promote").mlflow_run_id)
    m = run.data.metrics
    assert m["promote/promoted"] == 0 and m["promote/margin"] == 0
    assert m["promote/new/recall_at_50"] == pytest.approx(d["new"])
    assert m["promote/champion/recall_at_50"] == pytest.approx(d["champion"])
    assert m["promote/difference"] == pytest.approx(d["new"] - d["champion"])
    assert run.data.tags["promote.decision"] == "challenger"
    assert run.data.tags["promote.champion"] == f"models:/{name}/1"
    assert client.get_model_version(name, "2").tags["eimf.promotion"] == "challenger"

    # 3. a newer log with new items, warm-started from the champion and trained longer: better, so champion. The
    #    plan pins the alias to version 1; the champion is scored on the new log's users, its items by raw id.
    better = pipeline("better", new, "train.max_steps=400", "train.eval_every=100",
                      f"pipeline.from_model=models:/{name}@champion")
    plans = {sp.name: sp for sp in better.plan()}
    assert plans["train"].config["from_model"] == {"uri": f"models:/{name}/1", "name": name, "version": "1",
                                                   "run_id": client.get_model_version(name, "1").run_id,
                                                   "alias": "champion"}
    results = better.run()
    d = gate("better")
    assert d["promoted"] and d["alias"] == "champion" and d["champion_version"] == "1" and d["new"] > d["champion"]
    assert version_by_alias(mlflow_server, name, "champion").version == "3"
    run = client.get_run(next(r for r in results if r.stage == "promote").mlflow_run_id)
    assert run.data.metrics["promote/champion/unknown_truth_share"] > 0  # it cannot retrieve the new items
    assert run.data.metrics["promote/new/unknown_truth_share"] == 0
    train_run = client.get_run(next(r for r in results if r.stage == "train").mlflow_run_id)
    assert train_run.data.tags["warm_start.requested"] == f"models:/{name}@champion"
    assert train_run.data.tags["warm_start.source_resolved"] == f"models:/{name}/1"
    assert train_run.data.metrics["warm_start/rows_matched"] > 300
    # the alias moved: the same settings plan to another fingerprint now (a warm start from version 3)
    again = {sp.name: sp for sp in pipeline("better", new, "train.max_steps=400", "train.eval_every=100",
                                            f"pipeline.from_model=models:/{name}@champion").plan()}
    assert again["train"].config["from_model"]["version"] == "3"
    assert again["train"].fingerprint != plans["train"].fingerprint
    parent = client.get_run(better.parent_run_id)
    assert parent.data.tags["pipeline.promotion"] == "champion"
    assert os.path.isdir(parent.data.tags["pipeline.model_dir"])
