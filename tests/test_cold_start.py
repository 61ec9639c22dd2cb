"""The cold-start protocol (eimf.experiments.cold_start): the warm dataset, the cold items, the views."""
import glob

import numpy as np
import pandas as pd
import pytest
import torch

from eimf.config import load_config
from eimf.data.preprocess import prepare
from eimf.experiments import cold_start as cs
from eimf.formats.prepared import read_manifest, read_split


@pytest.fixture(scope="module")
def full(tiny_dataset, tmp_path_factory):
    cfg = load_config(overrides=[*tiny_dataset, f"data.output_dir={tmp_path_factory.mktemp('prepared')}"])
    return cfg, str(prepare(cfg.data).path)


def _flat(df, cols):
    return np.concatenate([np.asarray(x, dtype=np.int64) for c in cols for x in df[c]])


def test_cold_items_by_time_are_those_first_seen_after_the_cutoff(full, tiny_dataset):
    cfg, path = full
    cold, rule = cs.cold_by_time(cfg.data, path, 0.3)
    raw = pd.concat(pd.read_parquet(p) for p in glob.glob(tiny_dataset[1].split("=", 1)[1] + "/*.parquet"))
    cutoff = np.quantile(raw["timestamp"], 0.7)
    late = raw.groupby("item_id")["timestamp"].min()
    late = set(late.index[late > cutoff].astype(str))
    items = read_split(path, "items")
    assert set(items.set_index("item").loc[cold, "raw_id"].astype(str)) == late & set(items["raw_id"].astype(str))
    assert rule["rule"] == "time" and rule["cutoff"] == pytest.approx(cutoff)
    with pytest.raises(ValueError, match="log_share"):
        cs.cold_by_time(cfg.data, path, 1.0)


def test_the_warm_dataset_holds_no_cold_item_and_every_warm_interaction(full, tmp_path):
    _, path = full
    n = int(read_manifest(path)["n_items"])
    cold = np.arange(n - 40, n + 1)  # the 41 rarest items
    warm = cs.derive_warm(path, cold, str(tmp_path / "warm"))
    w = int(read_manifest(warm.path)["n_items"])
    assert w == n - len(cold) and read_manifest(warm.path)["cold_start"]["cold_items"] == len(cold)
    assert read_manifest(warm.path)["fingerprint"] != read_manifest(path)["fingerprint"]
    is_cold = np.isin(np.arange(n + 1), cold)
    for split, cols in (("train", ("items",)), ("valid", ("history", "truth")), ("test", ("history", "truth"))):
        before, after = _flat(read_split(path, split), cols), _flat(read_split(warm.path, split), cols)
        assert after.min() >= 1 and after.max() <= w
        # every warm interaction is kept, but those of users that are dropped for having too little left
        assert len(after) <= int((~is_cold[before]).sum()) and len(after) >= 0.9 * (~is_cold[before]).sum()
    items_full, items_warm = read_split(path, "items"), read_split(warm.path, "items")
    warm_ids = np.flatnonzero(warm.warm_id)
    assert (items_warm.set_index("item").loc[warm.warm_id[warm_ids], "raw_id"].to_numpy()
            == items_full.set_index("item").loc[warm_ids, "raw_id"].to_numpy()).all()
    assert (np.diff(items_warm["count"].to_numpy()) <= 0).all()  # frequency order, as preparation writes it
    again = cs.derive_warm(path, cold, str(tmp_path / "warm"))  # the same folder is reused
    assert (again.warm_id == warm.warm_id).all()


def test_test_users_lose_the_cold_items_from_their_histories_only(full):
    _, path = full
    n = int(read_manifest(path)["n_items"])
    cold = np.arange(1, 11)  # the most popular: many histories hold them
    frame = cs.test_frame(path, cold)
    assert not any(np.isin(h, cold).any() for h in frame["history"])
    test = read_split(path, "test").set_index("user")
    for user, truth in zip(frame["user"], frame["truth"]):
        assert list(truth) == list(test.loc[user, "truth"])
    assert n > 0


def test_years_in_titles_pick_the_new_releases(tmp_path):
    items = pd.DataFrame({"item": [1, 2, 3, 4], "raw_id": ["a", "b", "c", "d"], "count": [4, 3, 2, 1],
                          "text": ["Toy Story (1995) | Animation", "Gladiator (2000) | Action, Drama",
                                   "Untitled", "Cube (1997) (2001) | Sci-Fi"]})
    items.to_parquet(tmp_path / "items.parquet")
    cold, rule = cs.cold_by_year(str(tmp_path), 2000)
    assert list(cold) == [2, 4] and rule["items_without_year"] == 1
    assert cs.categories_from_text(items)["b"] == ["Action", "Drama"]


def test_views_rank_cold_items_by_their_rows_and_count_what_they_cost():
    # 6 items, 2 interests per user; items 5 and 6 are cold; the user's interest points at item 5
    table = np.zeros((7, 2), dtype=np.float32)
    table[1:5] = [[1, 0], [0.9, 0], [0.8, 0], [0.7, 0]]
    table[5], table[6] = [0, 1], [0, -1]
    frame = pd.DataFrame({"user": [1, 2], "history": [np.array([1]), np.array([2])],
                          "truth": [np.array([5, 1]), np.array([2])]})

    def interests(hist, mask):
        return torch.tensor([[[0.0, 1.0], [1.0, 0.0]]] * len(hist))

    views = cs.score_views(interests, table, frame, np.array([5, 6]), maxlen=5, topk=(1, 2))
    assert list(views["cold"]["user"]) == [1] and views["cold"]["recall@1"].iloc[0] == 1.0
    assert list(views["whole_cold"]["user"]) == [1] and views["whole_cold"]["recall@1"].iloc[0] == 1.0
    # the cold item 5 outscores item 1 for user 1: its warm target drops from rank 1 to rank 2
    assert views["warm_only"].set_index("user").loc[1, "recall@1"] == 1.0
    assert views["whole_warm"].set_index("user").loc[1, "recall@1"] == 0.0
    assert len(views["whole"]) == 2



def test_reserved_slots_show_cold_items_that_their_scores_keep_out():
    # item 5 (cold) scores 0.5 for every user, below the four warm items: no top-2 holds it unless a place is kept
    table = np.zeros((7, 2), dtype=np.float32)
    table[1:5] = [[1, 0], [0.9, 0], [0.8, 0], [0.7, 0]]
    table[5], table[6] = [0.5, 0], [-1, 0]
    frame = pd.DataFrame({"user": [1, 2], "history": [np.array([1]), np.array([2])],
                          "truth": [np.array([5, 2]), np.array([2])]})

    def interests(hist, mask):
        return torch.tensor([[[1.0, 0.0]]] * len(hist))

    none = cs.score_views(interests, table, frame, np.array([5, 6]), maxlen=5, topk=(2,))
    assert none["whole_cold"]["recall@2"].tolist() == [0.0]
    kept = cs.slot_views(interests, table, frame, np.array([5, 6]), maxlen=5, slots=1, topk=(2,))
    assert kept["whole_s1_cold"].set_index("user")["recall@2"].to_dict() == {1: 1.0}  # item 5 replaces item 2
    assert kept["whole_s1_warm"].set_index("user")["recall@2"].to_dict() == {1: 0.0, 2: 0.0}
    assert kept["whole_s1"].set_index("user")["recall@2"].to_dict() == {1: 0.5, 2: 0.0}
    same = cs.slot_views(interests, table, frame, np.array([5, 6]), maxlen=5, slots=0, topk=(2,))
    pd.testing.assert_frame_equal(same["whole_s0"], none["whole"])

def test_category_popularity_orders_the_cold_items_by_their_categories_training_counts():
    items = pd.DataFrame({"item": [1, 2, 3, 4], "raw_id": ["a", "b", "c", "d"]})
    cats = {"a": ["x"], "b": ["y"], "c": ["y"], "d": ["x", "y"]}
    order, fit = cs.category_popularity(cats, items, {1: 10, 2: 1}, np.array([3, 4]))
    assert list(order) == [4, 3] and fit["cold_items_with_category"] == 2  # d: mean(10, 1) > c: 1
    views = cs.fixed_ranking_views(order, pd.DataFrame({"user": [7], "history": [np.array([1])],
                                                        "truth": [np.array([3])]}), np.array([3, 4]), topk=(1, 2))
    assert views["cold"]["recall@1"].iloc[0] == 0.0 and views["cold"]["recall@2"].iloc[0] == 1.0
