"""The synthetic catalogue: deterministic by seed, topics named in the titles, read by the normal ingestion, and
learnable (a short training beats MostPopular on it)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from eimf.config import load_config
from eimf.data.synthetic import custom_overrides, synthesize


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.parquet")):
        h.update(pd.read_parquet(p).to_csv(index=False).encode())
    return h.hexdigest()


def test_deterministic_by_seed_and_sized_as_asked(tmp_path):
    a = synthesize(str(tmp_path / "a"), users=300, items=1000, interactions=6000, seed=7, block_users=128)
    for name, seed in (("b", 7), ("c", 8)):
        synthesize(str(tmp_path / name), users=300, items=1000, interactions=6000, seed=seed, block_users=128)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    log = pd.read_parquet(tmp_path / "a" / "interactions")
    assert len(log) == a.interactions == 6000 and log["user_id"].nunique() == 300 and len(a.files) == 3
    assert log.groupby("user_id").size().min() >= 5
    assert (log.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
    with pytest.raises(ValueError, match="interactions >= users"):
        synthesize(str(tmp_path / "d"), users=10, items=100, interactions=20)


def test_each_user_stays_within_a_few_named_topics(tmp_path):
    synthesize(str(tmp_path), users=200, items=2000, interactions=8000, seed=1, interests=3, clusters=40)
    items = pd.read_parquet(tmp_path / "items.parquet")
    items["topic"] = items["title"].str.replace(r" #\d+$", "", regex=True)
    assert items["topic"].nunique() == 40
    log = pd.read_parquet(tmp_path / "interactions").merge(items, on="item_id")
    assert log.groupby("user_id")["topic"].nunique().max() <= 3
    # popularity is skewed: the top 1 % of items take far more than 1 % of the interactions
    counts = log["item_id"].value_counts()
    assert counts.iloc[: len(items) // 100].sum() > 0.05 * len(log)


def test_read_by_the_normal_ingestion_and_learnable(tmp_path):
    from eimf.data.preprocess import prepare
    from eimf.data.sampling import TrainSampler
    from eimf.evaluation import most_popular
    from eimf.training.loop import Trainer, seed_everything
    from eimf.training.components import build_components

    synthesize(str(tmp_path / "synth"), users=1500, items=2000, interactions=45000, seed=3, clusters=50)
    cfg = load_config(None, custom_overrides(str(tmp_path / "synth")) + [
        f"data.output_dir={tmp_path / 'prepared'}", "model.dim=32", "train.max_steps=400",
        "train.eval_every=200", "train.log_every=200"])
    data = prepare(cfg.data, engine="local")
    assert data.n_items > 500 and len(data.train) > 1000  # the 5-core drops the Zipf tail
    assert data.items["text"].str.contains(" #").all()  # titles came through the catalogue join
    seed_everything(0)
    model, loss_fn, runner, _ = build_components(cfg, data.n_items)
    sampler = TrainSampler(list(data.train["items"]), maxlen=cfg.model.maxlen, batch_size=128, seed=0)
    trainer = Trainer(cfg, model, loss_fn, runner, iter(sampler), data.valid, data.test)
    trainer.fit()
    trained = trainer.final_metrics()["test/recall@50"]
    popular = most_popular(data.train, data.test)["recall@50"]
    print(f"synthetic test Recall@50: trained {trained:.4f}, MostPopular {popular:.4f}")
    assert trained > popular + 0.05, (trained, popular)
