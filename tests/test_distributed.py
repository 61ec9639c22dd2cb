"""Distributed training on real MovieLens-100K: DeepSpeed ZeRO-2 on 2 Ray Train workers against 1 worker,
metrics read back from a real MLflow server over REST, a worker killed mid-run, and a rerun by run name."""
import os
from pathlib import Path

import pytest
import requests

from eimf.config import load_config
from worker_kill import kill_a_worker_after_first_checkpoint

DATA_DIR = os.environ.get("EIMF_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(DATA_DIR, "ml-100k").exists(), reason="ml-100k not in EIMF_DATA_DIR"),
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from eimf.data.preprocess import prepare

    out = tmp_path_factory.mktemp("prepared")
    cfg = load_config(None, ["data.dataset=ml-100k", f"data.data_dir={DATA_DIR}", f"data.output_dir={out}"])
    return prepare(cfg.data, engine="local")


def _cfg(prepared, tmp_path, *overrides):
    return load_config(None, [
        "data.dataset=ml-100k", f"data.data_dir={DATA_DIR}",
        f"data.output_dir={Path(prepared.path).parent.parent}",
        "train.eval_every=100", "train.log_every=50", "train.patience=100",
        f"train.storage_path={tmp_path / 'runs'}",
        *overrides,
    ])


def _rest(url, path, **params):
    r = requests.get(f"{url}/api/2.0/mlflow/{path}", params=params, timeout=30)
    r.raise_for_status()
    return r.json()


def test_zero2_two_workers_matches_one_worker_logged_to_mlflow_server(prepared, tmp_path, ray_session,
                                                                      mlflow_server, monkeypatch):
    from eimf.steps.train import train

    monkeypatch.setenv("EIMF_HOME", str(tmp_path / "home"))
    common = ["train.max_steps=300", f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=dist-test"]
    one = train(_cfg(prepared, tmp_path, *common, "train.run_name=w1"), data_path=str(prepared.path)).metrics
    two = train(_cfg(prepared, tmp_path, *common, "train.run_name=w2z2", "train.scaling.num_workers=2",
                     "train.deepspeed.zero_stage=2"), data_path=str(prepared.path)).metrics
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["step"] == two["step"] == 300
    # Same global batch (128 = 2 x 64), same number of steps: the same model quality within seed noise
    # (94 test users on ML-100K: one user is ~0.01 of Recall@50).
    assert abs(two["test/recall@50"] - one["test/recall@50"]) < 0.05, (one, two)
    assert two["best_valid/recall@50"] > 0.10 and one["best_valid/recall@50"] > 0.10

    # Read the run back through the server's REST API, as the MLflow UI does.
    exp = _rest(mlflow_server, "experiments/get-by-name", experiment_name="dist-test")["experiment"]
    runs = requests.post(f"{mlflow_server}/api/2.0/mlflow/runs/search",
                         json={"experiment_ids": [exp["experiment_id"]]}, timeout=30).json()["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    assert set(by_name) == {"w1", "w2z2"}
    run = by_name["w2z2"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.scaling.num_workers"] == "2" and params["train.deepspeed.zero_stage"] == "2"
    assert params["model.backbone"] == "comirec_sa"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["dataset_fingerprint"] == prepared.manifest["fingerprint"]
    assert tags["eimf"] == "off" and tags["backbone"] == "comirec_sa" and tags["code_version"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["test/recall_at_50"] == pytest.approx(two["test/recall@50"])
    # Both runs carry the same metric names, so they line up column by column in the UI.
    names_one = {m["key"] for m in by_name["w1"]["data"]["metrics"]}
    assert {"test/recall_at_50", "test/ndcg_at_20", "valid/recall_at_50", "train/loss"} <= names_one
    assert names_one == set(metrics)
    history = _rest(mlflow_server, "metrics/get-history", run_id=run["info"]["run_id"],
                    metric_key="valid/recall_at_50")["metrics"]
    assert sorted(h["step"] for h in history) == [100, 200, 300]
    arts = _rest(mlflow_server, "artifacts/list", run_id=run["info"]["run_id"])["files"]
    assert {"learning_curve.png", "dataset_manifest.json"} <= {a["path"] for a in arts}
    assert "item_embeddings.npy" not in {a["path"] for a in arts}  # the item table is stored once, in the model
    # the model folder is stored once, inside the logged pyfunc model the run's tag points at
    assert "model" not in {a["path"] for a in arts} and tags["model_uri"]
    png = requests.get(f"{mlflow_server}/get-artifact", timeout=30,
                       params={"path": "learning_curve.png", "run_uuid": run["info"]["run_id"]})
    assert png.ok and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_run_name_resumes_instead_of_starting_over(prepared, tmp_path, ray_session, monkeypatch):
    from eimf import tracking
    from eimf.steps.train import train

    monkeypatch.setenv("EIMF_HOME", str(tmp_path / "home"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Also the streaming input: each epoch's random cut per user runs inside the Ray Data pipeline.
    # Steps are few (every 10 an evaluation and a checkpoint): each epoch of the streaming input (5 batches on
    # ML-100K) restarts its Ray Data pipeline, which costs more than the steps.
    base = ["train.run_name=again", f"tracking.tracking_uri={uri}", "train.input=ray_data", "train.eval_every=10",
            "train.log_every=10"]
    first = train(_cfg(prepared, tmp_path, *base, "train.max_steps=20"), data_path=str(prepared.path)).metrics
    assert first["step"] == 20 and first["resumes"] == 0
    # Asked for more steps under the same name: continues from step 20, not from 0.
    second = train(_cfg(prepared, tmp_path, *base, "train.max_steps=30"), data_path=str(prepared.path)).metrics
    assert second["step"] == 30 and second["resumes"] == 1 and second["first_resume_step"] == 20
    client = tracking.client(uri)
    runs = client.search_runs([client.get_experiment_by_name("eimf-ml-100k").experiment_id])
    assert len(runs) == 1  # one MLflow run, continued
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "valid/recall_at_50")]
    assert sorted(steps) == [10, 20, 30]


@pytest.mark.parametrize("strategy", [["train.deepspeed.zero_stage=2"], ["train.strategy=torch"]],
                         ids=["zero2", "torch"])
def test_eimf_on_two_workers_trains_and_exports_the_head(strategy, prepared, tmp_path, ray_session, monkeypatch):
    """EIMF on 2 Ray Train workers, under DeepSpeed ZeRO-2 and under plain data parallelism: each worker samples
    typical users of its own shard, the head trains (auxiliary losses logged), evaluation's verdict reaches both
    workers, the export holds the backbone and g beside it."""
    import numpy as np

    from eimf import tracking
    from eimf.semantic.annotate import annotate_users
    from eimf.semantic.annotators.metadata import MetadataAnnotator
    from eimf.semantic.encoder import SemanticEncoder
    from eimf.steps.train import train

    monkeypatch.setenv("EIMF_HOME", str(tmp_path / "home"))
    users = np.asarray(prepared.train["user"])[::8]  # ~95 users spread over both workers' shards
    encoder = SemanticEncoder()
    annotate_users(prepared, users, MetadataAnnotator(embed=encoder), None, encoder, K=4, token_budget=512,
                   out_dir=str(tmp_path / "ann"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(prepared, tmp_path, "train.scaling.num_workers=2", *strategy, "train.max_steps=100",
               "train.eval_every=50", "eimf.enabled=true", f"eimf.annotations={tmp_path / 'ann'}",
               f"tracking.tracking_uri={uri}", "train.log_every=20")
    result = train(cfg, data_path=str(prepared.path))
    assert result.metrics["world_size"] == 2 and result.metrics["step"] == 100
    assert np.isfinite(result.metrics["test/recall@50"])
    assert {"model.pt", "eimf_head.pt"} <= set(os.listdir(result.export_dir))
    client = tracking.client(uri)
    sp = [m.value for m in client.get_metric_history(result.mlflow_run_id, "train/loss/semantic_prediction")]
    assert len(sp) >= 4 and all(np.isfinite(sp)) and np.mean(sp[-2:]) < np.mean(sp[:2])


def test_killed_worker_is_replaced_and_training_continues_from_checkpoint(prepared, tmp_path, ray_session,
                                                                          monkeypatch):
    """SIGKILL one of two DeepSpeed ZeRO-3 workers after the first checkpoint; Ray Train replaces the worker
    group, every rank reloads its parameter shard, and the step counter continues from the checkpoint."""
    from eimf.steps.train import train

    monkeypatch.setenv("EIMF_HOME", str(tmp_path / "home"))
    cfg = _cfg(prepared, tmp_path, "train.run_name=killed", "train.max_steps=400", "train.scaling.num_workers=2",
               "train.deepspeed.zero_stage=3", "train.failure.max_failures=2", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db")
    thread, killed = kill_a_worker_after_first_checkpoint(tmp_path / "runs" / "killed")
    m = train(cfg, data_path=str(prepared.path)).metrics
    thread.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert m["step"] == 400
    assert m["resumes"] == 1 and m["first_resume_step"] >= 100  # resumed, and not from step 0
    assert m["best_valid/recall@50"] > 0.10
