"""Warm start (pipeline.from_model, eimf.training.warm_start): the extractor copied, item rows carried by raw id
across two preparations that number the items differently, new items' rows from the source's text map, the rest the
usual init; on the whole table and on the row-sharded one (two gloo workers, each filling its own rows), and through
Ray Train with the counts in MLflow. Synthetic data only."""
from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import warm_start_worker  # noqa: E402

from eimf.config import ConfigError, load_config  # noqa: E402
from eimf.data.synthetic import custom_overrides, synthesize  # noqa: E402

#: items new in the second log: ten with a title, two that the catalogue lacks (no text)
NEW_WITH_TEXT, NEW_WITHOUT_TEXT = 10, 2


def _logs(root: Path):
    """``(old, new)`` folders of a synthetic log: the new one is the old one plus 12 items, each seen by 8 users."""
    old, new = root / "old", root / "new"
    synthesize(str(old), users=300, items=200, interactions=6000, seed=7, clusters=8)
    shutil.copytree(old, new)
    ids = np.arange(1000, 1000 + NEW_WITH_TEXT + NEW_WITHOUT_TEXT)
    users = np.arange(8 * len(ids)) % 300
    pd.DataFrame({"user_id": users, "item_id": np.repeat(ids, 8),
                  "timestamp": 1_700_000_000 + np.arange(len(users))}).to_parquet(
        new / "interactions" / "part-new.parquet", index=False)
    items = pd.read_parquet(new / "items.parquet")
    titles = [f"vintage jazz records #{i}" for i in ids[:NEW_WITH_TEXT]]
    pd.concat([items, pd.DataFrame({"item_id": ids[:NEW_WITH_TEXT], "title": titles})]).to_parquet(
        new / "items.parquet", index=False)
    return old, new


def _cfg(folder: Path, tmp_path: Path, *more):
    return load_config(None, custom_overrides(str(folder)) + [
        f"data.output_dir={tmp_path / 'prepared'}", "model.dim=16", "model.num_interests=2", "model.maxlen=20",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}", *more])


def _source_folder(cfg, data, out: Path, seed: int = 0) -> Path:
    """A model folder of a (randomly initialised) backbone on ``data`` with a text map fitted on its rows."""
    from eimf.models import build_model
    from eimf.models.text_init import item_text_embeddings
    from eimf.models.text_map import fit_text_map, table_blocks
    from eimf.serving.folder import ModelFolder, build_index

    torch.manual_seed(seed)
    model = build_model(cfg.model, data.n_items).eval()
    items = data.items.sort_values("item").reset_index(drop=True)
    items["raw_id"], items["text"] = items["raw_id"].astype(str), items["text"].fillna("").astype(str)
    table = model.item_embeddings().detach().numpy()
    text = np.load(item_text_embeddings(str(data.path), cfg.semantic.encoder))
    counts = np.concatenate([[0], items["count"].to_numpy()])
    tmap = fit_text_map(table_blocks(text, lambda ids: table[ids], counts), cfg.semantic.encoder)
    ModelFolder(model=model, cfg=cfg, items=items, index=build_index(model, cfg), text_map=tmap,
                data_path=str(data.path)).write(str(out))
    return out


@pytest.fixture(scope="module")
def two_logs(tmp_path_factory):
    """Prepared old and new data, and a model folder on the old one: ``(tmp, old cfg, old data, new cfg, new data,
    folder)``."""
    import os

    from eimf.data.preprocess import prepare

    tmp = tmp_path_factory.mktemp("warm")
    os.environ.setdefault("EIMF_HOME", str(tmp / "home"))
    old, new = _logs(tmp / "raw")
    cfg_old, cfg_new = _cfg(old, tmp), _cfg(new, tmp)
    d_old, d_new = prepare(cfg_old.data, engine="local"), prepare(cfg_new.data, engine="local")
    return tmp, cfg_old, d_old, cfg_new, d_new, _source_folder(cfg_old, d_old, tmp / "source")


def _by_raw(data) -> pd.Series:
    items = data.items
    return pd.Series(items["item"].to_numpy(), index=items["raw_id"].astype(str).to_numpy())


# --------------------------------------------------------------------------------------------- pieces, fast
def test_items_match_by_raw_id_and_rows_fill_from_blocks_and_the_map():
    from eimf.training.warm_start import WarmStart, fill_rows, match_items

    old_of_new = match_items(np.array(["b", "z", "a", "c"]), np.array(["a", "b", "c"]))
    assert old_of_new.tolist() == [0, 2, 0, 1, 3]  # new 1 = b (old 2), new 2 = z (none), new 3 = a, new 4 = c
    old = np.arange(4 * 2, dtype=np.float32).reshape(4, 2)  # old rows 0..3
    plan = WarmStart("s", "s", {}, old_of_new, [(0, 2, old[:2]), (2, 4, old[2:])], np.array([2]),
                     np.array([[9, 9]], np.float32))
    rows = torch.full((5, 2), -1.0)
    assert fill_rows(rows, 0, plan) == 4
    np.testing.assert_array_equal(rows.numpy(), [[-1, -1], old[2], [9, 9], old[1], old[3]])
    part = torch.full((2, 2), -1.0)  # a worker's range: ids 3..4
    assert fill_rows(part, 3, plan) == 2
    np.testing.assert_array_equal(part.numpy(), [old[1], old[3]])


def test_model_sources_are_checked_when_the_config_loads(tmp_path):
    for bad, msg in (("models:/eimf-x/Production", "stages and other forms are not read"),
                     ("runs:/abc/recommender", "not a model folder"), ("' '", "empty value")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [f"pipeline.from_model={bad}"])
    cfg = load_config(None, ["pipeline.from_model=models:/eimf-ml-1m@champion"])
    assert cfg.pipeline.from_model == "models:/eimf-ml-1m@champion"
    assert load_config(None, [f"pipeline.from_model={tmp_path}"]).pipeline.from_model == str(tmp_path)


# --------------------------------------------------------------------------------------------- the whole table
@pytest.mark.e2e
def test_warm_start_carries_rows_by_raw_id_and_maps_new_items_on_the_whole_table(two_logs):
    from eimf.models.text_map import TextMap
    from eimf.semantic.encoder import SemanticEncoder
    from eimf.serving.folder import ModelFolder
    from eimf.training.components import build_components
    from eimf.training.warm_start import apply_warm_start, plan_warm_start

    tmp, _, d_old, cfg, d_new, folder = two_logs
    source = ModelFolder.load(str(folder))
    old_table = source.model.item_embeddings().detach().numpy()
    old_ids, new_ids = _by_raw(d_old), _by_raw(d_new)
    common = old_ids.index.intersection(new_ids.index)
    assert len(common) == d_old.n_items and d_new.n_items == d_old.n_items + NEW_WITH_TEXT + NEW_WITHOUT_TEXT
    # the two preparations number the shared items differently: a copy by id would be wrong
    assert (old_ids[common].to_numpy() != new_ids[common].to_numpy()).any()

    plan = plan_warm_start(str(folder), cfg, str(d_new.path), str(folder))
    assert plan.counts == {"items": d_new.n_items, "rows_matched": d_old.n_items, "rows_text_map": NEW_WITH_TEXT,
                           "rows_random": NEW_WITHOUT_TEXT, "source_items": d_old.n_items, "source_items_gone": 0,
                           "new_items_with_text": NEW_WITH_TEXT}
    torch.manual_seed(123)
    model = build_components(cfg, d_new.n_items)[0]
    fresh = model.item_emb.weight.detach().clone()
    assert apply_warm_start(model, plan) == d_old.n_items + NEW_WITH_TEXT
    rows = model.item_emb.weight.detach().numpy()
    # matched items: the source's row of the same raw id
    np.testing.assert_array_equal(rows[new_ids[common].to_numpy()], old_table[old_ids[common].to_numpy()])
    # new items with text: the source's text map applied to their text; without text: the init as it was
    items = d_new.items.set_index("raw_id")
    mapped = [str(i) for i in range(1000, 1000 + NEW_WITH_TEXT)]
    tmap = TextMap.from_arrays(source.text_map.to_arrays())
    want = tmap.apply(SemanticEncoder(tmap.encoder).encode(list(items.loc[mapped, "text"])))
    np.testing.assert_allclose(rows[new_ids[mapped].to_numpy()], want, rtol=1e-5, atol=1e-6)
    unmapped = np.array(new_ids[[str(i) for i in range(1000 + NEW_WITH_TEXT, 1000 + NEW_WITH_TEXT + NEW_WITHOUT_TEXT)]])
    np.testing.assert_array_equal(rows[unmapped], fresh.numpy()[unmapped])
    assert not rows[0].any()
    # the extractor: every weight but the table is the source's
    src = {k: v for k, v in source.model.state_dict().items() if k != "item_emb.weight"}
    for k, v in model.state_dict().items():
        if k != "item_emb.weight":
            assert torch.equal(v, src[k]), k



def test_a_warm_start_that_loses_the_sources_items_says_so(two_logs, monkeypatch, caplog):
    import logging

    from eimf.training import warm_start
    from eimf.training.warm_start import plan_warm_start

    tmp, cfg_old, d_old, cfg, d_new, _ = two_logs
    bigger = _source_folder(cfg, d_new, tmp / "bigger")  # a source that knows items the old data lacks
    gone = d_new.n_items - d_old.n_items
    with caplog.at_level(logging.WARNING, logger="eimf.training.warm_start"):
        plan = plan_warm_start(str(bigger), cfg_old, str(d_old.path), str(bigger))
    assert plan.counts["source_items_gone"] == gone
    loud = gone > warm_start.GONE_WARNING_SHARE * d_new.n_items
    assert any("data.replay" in r.message for r in caplog.records) == loud
    monkeypatch.setattr(warm_start, "GONE_WARNING_SHARE", gone / d_new.n_items / 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eimf.training.warm_start"):
        plan_warm_start(str(bigger), cfg_old, str(d_old.path), str(bigger))
    assert any(f"{gone} of the source's {d_new.n_items} items are not in this data" in r.message
               for r in caplog.records)

@pytest.mark.e2e
def test_a_source_of_another_shape_or_a_missing_one_is_refused(two_logs, tmp_path):
    from eimf.steps.registry import resolve_source
    from eimf.training.warm_start import plan_warm_start

    _, _, _, cfg, d_new, folder = two_logs
    other = load_config(None, [*custom_overrides("x"), "model.dim=32", "model.num_interests=2", "model.maxlen=20"])
    with pytest.raises(ConfigError, match=r"pipeline.from_model=.*model.dim 16 there, 32 here"):
        plan_warm_start(str(folder), other, str(d_new.path), str(folder))
    with pytest.raises(ConfigError, match="not a model folder"):
        resolve_source(str(tmp_path / "nothing"), f"sqlite:///{tmp_path / 'r.db'}")
    with pytest.raises(ConfigError, match="has no alias 'champion'"):
        resolve_source("models:/eimf-none@champion", f"sqlite:///{tmp_path / 'r.db'}")
    # a folder's pin changes when the folder is written again
    first = resolve_source(str(folder), "unused")
    assert first["uri"] == str(folder) and resolve_source(str(folder), "unused") == first


# --------------------------------------------------------------------------------------------- the sharded table
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_warm_start_fills_each_workers_own_rows_of_the_sharded_table(two_logs, tmp_path):
    """Two gloo workers, the table grown by 12 rows and split by rows: each fills its own range from the plan (old
    blocks of 64 rows here, so a worker fetches only the blocks that hold its sources), and the two ranges together
    are the whole table's warm start."""
    import eimf.training.warm_start as ws
    from eimf.training.warm_start import expected_rows, plan_warm_start

    _, _, d_old, cfg, d_new, folder = two_logs
    old_block = ws.ROW_BLOCK
    ws.ROW_BLOCK = 64
    try:
        plan = plan_warm_start(str(folder), cfg, str(d_new.path), str(folder))
    finally:
        ws.ROW_BLOCK = old_block
    assert len(plan.old_blocks) == -(-(d_old.n_items + 1) // 64)
    torch.save({"plan": plan, "cfg": cfg.model, "n_items": d_new.n_items}, tmp_path / "plan.pt")
    mp.spawn(warm_start_worker.fill_sharded, args=(2, _port(), str(tmp_path)), nprocs=2)
    parts = sorted((torch.load(tmp_path / f"rows.{r}.pt", weights_only=False) for r in range(2)),
                   key=lambda p: p["offset"])
    assert [p["offset"] for p in parts] == [0, parts[0]["rows"].shape[0]] and parts[0]["offset"] == 0
    table = np.concatenate([p["rows"] for p in parts])
    assert table.shape == (d_new.n_items + 1, 16)
    ids, rows = expected_rows(plan)
    np.testing.assert_array_equal(table[ids], rows)
    assert sum(p["written"] for p in parts) == len(ids) and all(0 < p["written"] < len(ids) for p in parts)
    assert all(p["blocks_fetched"] < len(plan.old_blocks) for p in parts) or len(plan.old_blocks) == 1
    assert all(p["dense_ok"] for p in parts)
    others = np.setdiff1d(np.arange(1, d_new.n_items + 1), ids)  # the usual init, untouched
    np.testing.assert_array_equal(table[others], np.concatenate([p["init"] for p in parts])[others])


# --------------------------------------------------------------------------------------------- through Ray Train
@pytest.mark.e2e
@pytest.mark.parametrize("strategy,workers", [("torch", 1), ("sharded", 2)])
def test_warm_started_training_starts_where_the_source_left_off(two_logs, ray_session, monkeypatch, strategy,
                                                                 workers):
    """Train on the old log, then 1 step on the new one from it and from scratch: the warm start keeps most of the
    source's quality (a scratch model after one step is near random), and its MLflow run says what it carried."""
    from eimf import tracking
    from eimf.evaluation import most_popular
    from eimf.steps.train import train

    tmp, cfg_old, d_old, cfg_new, d_new, _ = two_logs
    monkeypatch.setenv("EIMF_HOME", str(tmp / "home"))
    common = ["train.eval_every=100", "train.log_every=50", f"train.storage_path={tmp / 'runs'}",
              "tracking.log_model=false"]
    if not (tmp / "runs" / "src" / "export").exists():
        src_cfg = _cfg(tmp / "raw" / "old", tmp, *common, "train.max_steps=300", "train.run_name=src")
        train(src_cfg, data_path=str(d_old.path))
    source = tmp / "runs" / "src" / "export"
    # a small step: row-wise Adagrad's first step is ~lr per coordinate whatever the gradient, which at its default
    # (0.2) moves a fresh or a carried row alike; here the rows are to be seen as they start
    one = [*common, "train.max_steps=1", "train.eval_every=1", f"train.scaling.num_workers={workers}",
           f"train.strategy={strategy}", "train.batch_size=128", "train.sharded.lr=0.001", "train.lr=0.0001"]
    warm = train(_cfg(tmp / "raw" / "new", tmp, *one, f"train.run_name=warm-{strategy}",
                      f"pipeline.from_model={source}"), data_path=str(d_new.path))
    cold = train(_cfg(tmp / "raw" / "new", tmp, *one, f"train.run_name=cold-{strategy}"), data_path=str(d_new.path))
    popular = most_popular(d_new.train, d_new.test)["recall@50"]
    w, c = warm.metrics["test/recall@50"], cold.metrics["test/recall@50"]
    assert w > popular and w > c + 0.05, (w, c, popular)
    run = tracking.client(f"sqlite:///{tmp / 'm.db'}").get_run(warm.mlflow_run_id)
    assert run.data.tags["warm_start.source"] == str(source)
    assert run.data.tags["warm_start.eimf_head"].startswith("not carried")
    assert run.data.metrics["warm_start/rows_matched"] == d_old.n_items
    # new items: from the text map where the export fitted one (and the item has text), else the usual init
    mapped, rand = run.data.metrics["warm_start/rows_text_map"], run.data.metrics["warm_start/rows_random"]
    assert mapped in (0, NEW_WITH_TEXT) and mapped + rand == NEW_WITH_TEXT + NEW_WITHOUT_TEXT
    assert warm.metrics["warm_start/rows_matched"] == d_old.n_items
