"""The row-sharded item table (train.strategy=sharded): equal lookups and gradients to the dense path from the
same weights, the merged per-shard search equal to an exact search, a 2-worker Ray Train run on a synthetic
catalogue whose export (the table in row blocks) loads and serves and whose checkpoint resumes at 2, 1 and 2 workers
again, a SIGKILLed worker resumed from its checkpoint, and a 2-worker run on a 1M-item catalogue. No licensed data."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import sharded_worker  # noqa: E402



def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backbone", ["comirec_sa", "comirec_dr", "remi"])
def test_sharded_step_equals_dense_step(tmp_path, backbone):
    mp.spawn(sharded_worker.parity, args=(2, _port(), backbone, 23, str(tmp_path)), nprocs=2)
    offsets = []
    for rank in range(2):
        r = torch.load(tmp_path / f"parity.{rank}.pt")
        assert r["lookup_ok"], "the sharded lookup differs from the dense table"
        assert r["table_change"] > 1e-3  # the step did move rows
        assert r["table_err"] < 1e-6 and r["dense_err"] < 1e-6
        offsets.append((r["offset"], r["rows"]))
    assert offsets == [(0, 12), (12, 12)]  # 24 rows (ids 0..23) split by rows


def test_merged_shard_search_equals_exact_search(tmp_path):
    from eimf.evaluation.retrieval import brute_force_topn

    mp.spawn(sharded_worker.merged_search, args=(2, _port(), 23, str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"search.{r}.pt", weights_only=False) for r in range(2))
    ids, scores = brute_force_topn(a["table"], a["interests"], 10, exclude=a["exclude"])
    np.testing.assert_array_equal(a["ids"], ids)
    np.testing.assert_array_equal(b["ids"], ids)
    np.testing.assert_allclose(a["scores"], scores, rtol=1e-5, atol=1e-5)


@pytest.mark.e2e
def test_two_sharded_workers_train_resume_export_and_serve(tmp_path, ray_session, monkeypatch):
    from eimf.config import load_config
    from eimf.data.preprocess import prepare
    from eimf.data.synthetic import custom_overrides, synthesize
    from eimf.evaluation import most_popular
    from eimf.serving.folder import ModelFolder
    from eimf.serving.recommender import Recommender
    from eimf.steps.train import train

    monkeypatch.setenv("EIMF_HOME", str(tmp_path / "home"))
    synthesize(str(tmp_path / "synth"), users=1500, items=2000, interactions=45000, seed=3, clusters=50)
    cfg = load_config(None, custom_overrides(str(tmp_path / "synth")) + [
        f"data.output_dir={tmp_path / 'prepared'}", "model.dim=32", "train.max_steps=300", "train.eval_every=100",
        "train.log_every=100", "train.scaling.num_workers=2", "train.strategy=sharded", "train.run_name=sharded",
        f"train.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"])
    data = prepare(cfg.data, engine="local")
    result = train(cfg, data_path=str(data.path))
    m = result.metrics
    assert m["world_size"] == 2 and m["step"] == 300
    popular = most_popular(data.train, data.test)
    assert m["test/recall@50"] > popular["recall@50"] + 0.05, (m["test/recall@50"], popular["recall@50"])

    folder = ModelFolder.load(result.export_dir)
    manifest = ModelFolder.read_manifest(result.export_dir)
    assert len(manifest["item_table"]["parts"]) == 2 and sum(manifest["item_table"]["rows"]) == data.n_items + 1
    assert folder.model.item_embeddings().shape == (data.n_items + 1, 32)
    raw = folder.items["raw_id"].tolist()
    answer = Recommender(folder).recommend([{"history": raw[:5], "k": 10}])[0]
    assert len(answer["items"]) == 10

    # the same run name again, with more steps: every worker reloads its rows and their optimizer state
    cfg.train.max_steps = 400
    again = train(cfg, data_path=str(data.path)).metrics
    assert again["resumes"] == 1 and again["first_resume_step"] == 300 and again["step"] == 400
    assert again["best_valid/recall@50"] >= m["best_valid/recall@50"] - 0.02

    # and at another number of workers, 2 -> 1 -> 2: each worker reads its row range out of the saved row blocks
    for resumes, (workers, steps) in enumerate(((1, 450), (2, 500)), start=2):
        cfg.train.scaling.num_workers, cfg.train.max_steps = workers, steps
        moved = train(cfg, data_path=str(data.path)).metrics
        assert moved["world_size"] == workers and moved["step"] == steps and moved["resumes"] == resumes
        assert moved["best_valid/recall@50"] >= m["best_valid/recall@50"] - 0.02


@pytest.mark.e2e
@pytest.mark.parametrize("sampling", ["oversample", "extra"])
def test_eimf_head_trains_beside_two_sharded_workers_and_resumes(sampling, tmp_path, ray_session, monkeypatch):
    """EIMF on the sharded path: the replicated head (P, g, h) trains beside the row-sharded table with evidence
    matching (cited items looked up across workers) and window-aligned cuts, the auxiliary losses fall, the
    checkpoint carries the head and a resume reloads it, and the export holds g. Both typical samplings: under
    ``extra`` every rank runs a second, collective forward for the typical rows; under ``oversample`` none does."""
    import os

    from eimf import tracking
    from eimf.config import load_config
    from eimf.data.preprocess import prepare
    from eimf.data.synthetic import custom_overrides, synthesize
    from eimf.semantic.annotate import annotate_users
    from eimf.semantic.annotators.metadata import MetadataAnnotator
    from eimf.semantic.encoder import SemanticEncoder
    from eimf.steps.train import train

    monkeypatch.setenv("EIMF_HOME", str(tmp_path / "home"))
    synthesize(str(tmp_path / "synth"), users=800, items=1000, interactions=24000, seed=5, clusters=20)
    uri = f"sqlite:///{tmp_path}/m.db"
    overrides = custom_overrides(str(tmp_path / "synth")) + [
        f"data.output_dir={tmp_path / 'prepared'}", "model.dim=32", "train.max_steps=120", "train.eval_every=60",
        "train.log_every=20", "train.scaling.num_workers=2", "train.strategy=sharded", "train.run_name=eimf-sharded",
        f"train.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}",
        "eimf.enabled=true", f"eimf.annotations={tmp_path / 'ann'}",
        # the round-2 options too: the cited items' rows come from their owners (a collective lookup each step)
        "eimf.experimental.matching_space=evidence", "eimf.experimental.ma_projection=mlp",
        "eimf.experimental.mask_own_interests=true", "eimf.experimental.window_overlap=0.5",
        "eimf.experimental.lambda_item=0.1", f"eimf.typical_sampling={sampling}"]
    cfg = load_config(None, overrides)
    data = prepare(cfg.data, engine="local")
    encoder = SemanticEncoder()
    annotate_users(data, np.asarray(data.train["user"])[::6], MetadataAnnotator(embed=encoder), None, encoder,
                   K=4, token_budget=512, out_dir=str(tmp_path / "ann"))
    result = train(cfg, data_path=str(data.path))
    m = result.metrics
    assert m["world_size"] == 2 and m["step"] == 120 and np.isfinite(m["test/recall@50"])
    assert "eimf_head.pt" in os.listdir(result.export_dir)
    client = tracking.client(uri)
    sp = [x.value for x in client.get_metric_history(result.mlflow_run_id, "train/loss/semantic_prediction")]
    assert len(sp) >= 5 and all(np.isfinite(sp)) and np.mean(sp[-2:]) < np.mean(sp[:2])
    item = [x.value for x in client.get_metric_history(result.mlflow_run_id, "train/loss/item_alignment")]
    assert len(item) == len(sp) and np.mean(item[-2:]) < np.mean(item[:2])  # the target rows gathered per step
    if sampling == "extra":
        return  # the resume below is the same for both

    # resume under the same name: the head and its optimizer come back from the checkpoint (every rank)
    cfg.train.max_steps = 160
    again = train(cfg, data_path=str(data.path)).metrics
    assert again["resumes"] == 1 and again["first_resume_step"] == 120 and again["step"] == 160
    sp2 = [x.value for x in client.get_metric_history(result.mlflow_run_id, "train/loss/semantic_prediction")]
    # 20 steps after the resume the loss is still at the trained head's level: a new head would start over
    assert len(sp2) > len(sp) and sp2[len(sp)] < np.mean(sp[:2])


@pytest.mark.e2e
def test_killed_sharded_worker_is_replaced_and_resumes_its_rows(tmp_path, ray_session, monkeypatch):
    """SIGKILL one of the two sharded workers after the first checkpoint: Ray Train restarts the group, each
    worker reloads its own rows and fused optimizer state, and the run finishes from the checkpoint's step."""
    from worker_kill import kill_a_worker_after_first_checkpoint

    from eimf.config import load_config
    from eimf.data.preprocess import prepare
    from eimf.data.synthetic import custom_overrides, synthesize
    from eimf.evaluation import most_popular
    from eimf.steps.train import train

    monkeypatch.setenv("EIMF_HOME", str(tmp_path / "home"))
    synthesize(str(tmp_path / "synth"), users=1500, items=2000, interactions=45000, seed=4, clusters=50)
    cfg = load_config(None, custom_overrides(str(tmp_path / "synth")) + [
        f"data.output_dir={tmp_path / 'prepared'}", "model.dim=32", "train.max_steps=300", "train.eval_every=100",
        "train.log_every=100", "train.scaling.num_workers=2", "train.strategy=sharded", "train.run_name=killed",
        "train.failure.max_failures=2", f"train.storage_path={tmp_path / 'runs'}", "tracking.enabled=false"])
    data = prepare(cfg.data, engine="local")
    thread, killed = kill_a_worker_after_first_checkpoint(tmp_path / "runs" / "killed")
    m = train(cfg, data_path=str(data.path)).metrics
    thread.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert m["step"] == 300 and m["resumes"] == 1 and m["first_resume_step"] >= 100
    assert m["test/recall@50"] > most_popular(data.train, data.test)["recall@50"] + 0.05


@pytest.mark.e2e
def test_two_sharded_workers_on_a_million_item_catalogue(tmp_path, ray_session, monkeypatch):
    """Few steps on a 1M-item synthetic catalogue (about 0.7M occur in its 2M interactions): trains, evaluates
    with per-shard IVF search, exports the table in row blocks."""
    from eimf.config import load_config
    from eimf.data.preprocess import prepare
    from eimf.data.synthetic import custom_overrides, synthesize
    from eimf.serving.folder import ModelFolder
    from eimf.steps.train import train

    monkeypatch.setenv("EIMF_HOME", str(tmp_path / "home"))
    synthesize(str(tmp_path / "synth"), users=50_000, items=1_000_000, interactions=2_000_000, seed=0, zipf=0.6)
    cfg = load_config(None, custom_overrides(str(tmp_path / "synth")) + [
        f"data.output_dir={tmp_path / 'prepared'}", "data.min_count=1", "model.dim=16", "train.max_steps=60",
        "train.eval_every=60", "eval.max_valid_users=500", "train.log_every=30", "train.scaling.num_workers=2",
        "train.strategy=sharded", "train.run_name=million", f"train.storage_path={tmp_path / 'runs'}",
        "tracking.enabled=false", "train.text_map=never"])  # the map's sharded fit is tests/test_items_add.py's
    data = prepare(cfg.data, engine="local")
    assert data.n_items > 600_000
    result = train(cfg, data_path=str(data.path))
    m = result.metrics
    assert m["step"] == 60 and m["world_size"] == 2 and 0.0 <= m["test/recall@50"] <= 1.0
    assert m["gathered_rows_per_step"] <= 128 / 2 * 50 + 64 + 1280 + 1  # bounded by the batch, not by N
    manifest = ModelFolder.read_manifest(result.export_dir)
    assert len(manifest["item_table"]["parts"]) == 2 and sum(manifest["item_table"]["rows"]) == data.n_items + 1


@pytest.mark.parametrize("spec", ["Flat", "IVF16,Flat"])
def test_index_built_from_row_blocks_equals_the_whole_table_build(spec):
    """The export's block-by-block index (never the whole table in memory) answers as the whole-table build."""
    from eimf.config import RetrievalConfig
    from eimf.evaluation.retrieval import ItemIndex

    table = np.random.default_rng(5).standard_normal((2001, 16)).astype(np.float32)
    retrieval = RetrievalConfig(index=spec, nprobe=4)
    whole = ItemIndex.from_config(table, retrieval)
    blocks = ItemIndex.from_blocks(lambda: iter(np.array_split(table[1:], 3)), 2000, 16, retrieval)
    q = np.random.default_rng(6).standard_normal((20, 16)).astype(np.float32)
    np.testing.assert_array_equal(whole.search(q, 30)[0], blocks.search(q, 30)[0])
    with pytest.raises(ValueError, match="hold 1999 items"):
        ItemIndex.from_blocks(lambda: iter([table[1:2000]]), 2000, 16, RetrievalConfig(index="Flat"))


@pytest.mark.parametrize("saved_world, loaded_world", [(2, 1), (1, 2)])
def test_a_sharded_checkpoint_loads_at_another_number_of_workers(tmp_path, saved_world, loaded_world):
    """The table, its row-wise optimizer state and the best snapshot are saved as row blocks with their global
    offsets; a worker of another world size reads its own row range out of whichever blocks overlap it."""
    n_items = 23
    mp.spawn(sharded_worker.reshard_save, args=(saved_world, _port(), n_items, str(tmp_path)), nprocs=saved_world)
    mp.spawn(sharded_worker.reshard_load, args=(loaded_world, _port(), n_items, str(tmp_path)), nprocs=loaded_world)

    def whole(prefix, world):
        parts = sorted((torch.load(tmp_path / f"{prefix}.{r}.pt") for r in range(world)), key=lambda s: s["offset"])
        return (torch.cat([p["rows"] for p in parts]),
                {k: torch.cat([p["optimizer"][k] for p in parts]) for k in parts[0]["optimizer"]}, parts)

    saved_rows, saved_opt, _ = whole("saved", saved_world)
    loaded_rows, loaded_opt, parts = whole("loaded", loaded_world)
    assert saved_rows.shape == (n_items + 1, 8) and torch.equal(loaded_rows, saved_rows)
    assert saved_opt and all(torch.equal(loaded_opt[k], saved_opt[k]) for k in saved_opt)
    assert any(v.abs().sum() > 0 for v in saved_opt.values())  # the step left optimizer state to carry over
    best = torch.cat([p["best_rows"] for p in parts])
    assert torch.equal(best, saved_rows)
