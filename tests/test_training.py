"""Training: the single-process loop, and the Ray Train runner end to end on real MovieLens-100K."""
import os
from pathlib import Path

import pytest
import torch

from eimf.config import load_config

DATA_DIR = os.environ.get("EIMF_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_ml100k = pytest.mark.skipif(not Path(DATA_DIR, "ml-100k").exists(), reason="ml-100k not in EIMF_DATA_DIR")


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    from eimf.data.preprocess import prepare

    out = tmp_path_factory.mktemp("prepared")
    cfg = load_config(None, ["data.dataset=ml-100k", f"data.data_dir={DATA_DIR}", f"data.output_dir={out}"])
    return cfg, prepare(cfg.data, engine="local")


def _trainer(cfg, data, steps):
    from eimf.data.sampling import TrainSampler
    from eimf.training.loop import Trainer, seed_everything
    from eimf.training.components import build_components

    cfg.train.max_steps, cfg.train.eval_every, cfg.train.log_every = steps, steps // 2, steps // 2
    seed_everything(cfg.train.seed)
    model, loss_fn, runner, _ = build_components(cfg, data.n_items)
    sampler = TrainSampler(list(data.train["items"]), maxlen=cfg.model.maxlen,
                           batch_size=cfg.train.batch_size, seed=0)
    return Trainer(cfg, model, loss_fn, runner, iter(sampler), data.valid, data.test)


@needs_ml100k
def test_loop_learns_and_restores_best(ml100k):
    cfg, data = ml100k
    trainer = _trainer(cfg, data, steps=300)
    before = trainer.evaluate(data.valid)["recall@50"]
    reports = []
    state = trainer.fit(report=lambda m, s, is_eval: reports.append((dict(m), is_eval)))
    assert state.step == 300 and len(state.history) == 2
    assert any(is_eval for _, is_eval in reports) and any(not e for _, e in reports)
    final = trainer.final_metrics()
    # The restored weights are the best evaluation's: its valid score is reproduced exactly.
    assert final["best_valid/recall@50"] == pytest.approx(state.best_metric)
    assert final["best_valid/recall@50"] > before + 0.03  # learned something real in 300 steps
    for split in ("best_valid", "test"):
        for k in (20, 50):
            for m in ("recall", "ndcg", "hitrate"):
                assert 0.0 <= final[f"{split}/{m}@{k}"] <= 1.0


@needs_ml100k
def test_final_metrics_leave_test_unread_while_settings_are_chosen(ml100k):
    """eval.score_test=false: the best weights are scored on valid only, and the test split is never evaluated."""
    import copy

    cfg, data = ml100k
    cfg = copy.deepcopy(cfg)
    cfg.eval.score_test = False
    trainer = _trainer(cfg, data, steps=20)
    trainer.fit()
    scored = []
    evaluate = trainer.evaluate
    trainer.evaluate = lambda split_df, **kw: scored.append(split_df) or evaluate(split_df, **kw)
    final = trainer.final_metrics()
    assert "best_valid/recall@50" in final and not any(k.startswith("test/") for k in final)
    assert all(df is data.valid for df in scored) and scored


@needs_ml100k
def test_checkpoint_round_trip(ml100k, tmp_path):
    from eimf.training.loop import load_training_state, save_training_state

    cfg, data = ml100k
    trainer = _trainer(cfg, data, steps=20)
    state = trainer.fit()
    save_training_state(tmp_path, trainer.runner, state, trainer.best_state)
    other = _trainer(cfg, data, steps=20)
    restored, best = load_training_state(tmp_path, other.runner)
    assert restored.step == state.step and restored.history == state.history
    for (k, a), b in zip(trainer.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.e2e
@needs_ml100k
def test_ray_train_end_to_end_export_and_mlflow(ml100k, tmp_path, ray_session, monkeypatch):
    """Ray Train worker -> checkpoints -> exported model that evaluates identically without Ray."""
    from eimf import tracking
    from eimf.steps.evaluate import evaluate_exported
    from eimf.serving.folder import ModelFolder
    from eimf.steps.train import train

    monkeypatch.setenv("EIMF_HOME", str(tmp_path / "home"))
    cfg, data = ml100k
    cfg = load_config(None, [
        "data.dataset=ml-100k", f"data.data_dir={DATA_DIR}", f"data.output_dir={Path(data.path).parent.parent}",
        "train.max_steps=200", "train.eval_every=100", "train.log_every=100",
        f"train.storage_path={tmp_path / 'runs'}", "train.run_name=e2e",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ])
    result = train(cfg, data_path=str(data.path))
    m = result.metrics
    assert m["step"] == 200 and m["best_step"] in (100, 200)
    assert m["examples_per_s"] > 0 and 0 <= m["input_share"] < 1 and m["peak_rss_mb"] > 0
    # train.precision=auto as the worker resolved it: bf16 where this CPU has it natively
    from eimf.training.hardware import native_bf16

    assert m["bf16"] == float(native_bf16(torch.device("cpu")))

    export = Path(result.export_dir)
    assert {"model.pt", "config.yaml", "metrics.json", "folder.json", "items.parquet", "index.faiss"} <= {
        p.name for p in export.iterdir()}
    again = evaluate_exported(export, split="test")
    assert again["test/recall@50"] == pytest.approx(m["test/recall@50"], abs=1e-6)
    # The trained model beats MostPopular on ML-100K even after 200 steps? Not required; both are reported.
    assert "test/mostpop/recall@50" in again
    model = ModelFolder.load(str(export)).model
    assert model.item_embeddings().shape[0] == data.n_items + 1

    client = tracking.client(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name("eimf-ml-100k")
    run = client.search_runs([exp.experiment_id])[0]
    assert run.data.params["model.backbone"] == "comirec_sa"
    assert run.data.tags["backbone"] == "comirec_sa"
    assert run.info.status == "FINISHED"
    hist = client.get_metric_history(run.info.run_id, "valid/recall_at_50")
    assert [h.step for h in hist] == [100, 200]
    assert run.data.metrics["test/recall_at_50"] == pytest.approx(m["test/recall@50"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"learning_curve.png", "dataset_manifest.json"} <= arts
    assert "item_embeddings.npy" not in arts  # the item table is stored once, in the model
    # the model folder is stored once: inside the pyfunc model, logged and registered as eimf-<dataset>
    assert "model" not in arts
    assert result.model_uri == "models:/eimf-ml-100k/1" and run.data.tags["model_uri"] == result.model_uri
    assert client.get_model_version("eimf-ml-100k", "1").run_id == run.info.run_id
