"""eimf.data.preprocess / transforms / inputs / ingest: k-core, re-index, splits, manifest, cache, bad inputs."""
from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eimf.config import DataConfig
from eimf.data.datasets import DatasetNotFoundError
from eimf.data.inputs import resolve_inputs
from eimf.data.parsers import DataError, EmptyFileError
from eimf.data.preprocess import prepare
from eimf.data.transforms import kcore, reindex_by_frequency, split_codes, split_users
from eimf.formats.prepared import load_prepared

pytestmark = pytest.mark.timeout(120)

DATA = Path(os.environ.get("EIMF_DATA_DIR", "/work/shared/data"))


# ------------------------------------------------------------------------------------------ pure steps
def test_kcore_hand_case_cascades():
    # min_count 2: item 2 has 1 interaction -> removed; then user 2 has 1 -> removed; then item 0 has 2: stays
    users = np.array([0, 0, 1, 1, 2, 2])
    items = np.array([0, 1, 0, 1, 0, 2])
    keep, removed = kcore(users, items, 2)
    assert keep.tolist() == [True, True, True, True, False, False]
    assert removed == [1, 1]  # two passes removed something
    # the result is a 2-core and nothing more than necessary was removed
    keep3, removed3 = kcore(users, items, 3)
    assert not keep3.any() and len(removed3) >= 1
    assert kcore(users, items, 1)[0].all()


def test_kcore_counts_repeats():
    users = np.array([0, 0, 0, 1, 1, 1])
    items = np.array([0, 0, 0, 0, 0, 0])  # user 0 saw item 0 three times
    keep, removed = kcore(users, items, 3)
    assert keep.all() and removed == []


def test_reindex_by_frequency_ties_by_raw_id():
    raw = ["10", "9", "9", "10", "3", "7", "7", "7"]
    new, table = reindex_by_frequency(raw, numeric=True)
    # 7 x3 -> 1; 9 and 10 x2 -> numeric tie order 9 then 10; 3 x1 -> 4
    assert table[["item", "raw_id", "count"]].values.tolist() == [[1, "7", 3], [2, "9", 2], [3, "10", 2], [4, "3", 1]]
    assert new.tolist() == [3, 2, 2, 3, 4, 1, 1, 1]
    _, table_s = reindex_by_frequency(raw, numeric=False)
    assert table_s["raw_id"].tolist() == ["7", "10", "9", "3"]  # string order for free ids


def test_split_codes_are_split_users_in_an_array():
    """The array shuffle (both engines) makes the same swaps as ComiRec's shuffle of a list."""
    for n, seed in ((1, 1230), (10, 1230), (997, 7), (20_000, 1230)):
        tr, va, te = split_users(range(1, n + 1), seed, [0.8, 0.1, 0.1])
        codes = split_codes(n, seed, [0.8, 0.1, 0.1])
        assert codes[0] == 0 and len(codes) == n + 1
        for code, part in ((0, tr), (1, va), (2, te)):
            assert sorted(np.flatnonzero(codes[1:] == code) + 1) == sorted(part)


def test_split_users_is_comirec_and_deterministic():
    users = list(range(1, 101))
    tr, va, te = split_users(users, 1230, [0.8, 0.1, 0.1])
    assert (len(tr), len(va), len(te)) == (80, 10, 10)
    assert not (set(tr) & set(va) or set(tr) & set(te) or set(va) & set(te))
    assert sorted(tr + va + te) == users
    expected = list(users)
    random.seed(1230)  # ComiRec: random.seed(1230); random.shuffle(user_ids)
    random.shuffle(expected)
    assert tr + va + te == expected
    assert split_users(users, 1230, [0.8, 0.1, 0.1]) == (tr, va, te)
    assert split_users(users, 1231, [0.8, 0.1, 0.1])[0] != tr


# ------------------------------------------------------------------------------------------ end to end
def _write_log(folder: Path, n_users=40, n_items=12, seed=0, bad=True):
    """A CSV log with timestamps out of file order, plus a few bad rows, and a catalogue."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        for _ in range(rng.integers(6, 15)):
            rows.append((u, int(rng.integers(1, n_items + 1)), int(rng.integers(0, 10_000))))
    rng.shuffle(rows)
    lines = ["user_id,item_id,timestamp"] + [f"{u},{i},{t}" for u, i, t in rows]
    n_bad = 0
    if bad:
        lines += ["1,,5", "x,3,5", "2,3,notatime", "3,4"]
        n_bad = 4
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.csv").write_text("\n".join(lines) + "\n")
    cat = ["item_id,title,genre"] + [f"{i},Item {i},G{i % 3}" for i in range(1, n_items)]  # item n_items missing
    cat += [f"{n_items + 5},Never seen,G0"]
    (folder / "items.csv").write_text("\n".join(cat) + "\n")
    return pd.DataFrame(rows, columns=["user", "item", "ts"]), n_bad


def _cfg(tmp_path, folder, **kw):
    base = dict(dataset="custom", interactions=str(folder / "log.csv"), items=str(folder / "items.csv"),
                text_cols=["title", "genre"], output_dir=str(tmp_path / "out"), min_count=3)
    base.update(kw)
    return DataConfig(**base)


def test_prepare_end_to_end_invariants(tmp_path):
    raw, n_bad = _write_log(tmp_path / "raw")
    cfg = _cfg(tmp_path, tmp_path / "raw")
    p = prepare(cfg, engine="local")
    m, c = p.manifest, p.manifest["counts"]

    # accounting: nothing lost silently
    assert c["rows_in"] == len(raw) + n_bad == c["rows_valid"] + sum(m["drops"].values())
    assert m["drops"] == {"missing_item": 1, "non_numeric_user": 1, "non_numeric_time": 1, "missing_time": 1}
    assert c["interactions_in"] - c["duplicates_removed"] - c["kcore_removed_interactions"] == c["interactions_out"]
    assert c["items_not_in_catalogue_in"] == 1 and c["items_missing_text"] == 1
    assert c["catalogue_items_never_interacted"] == 1
    assert m["fingerprint"] and Path(p.path).name == m["fingerprint"][:16]

    # items: 1..N by descending count, text from the catalogue
    items = p.items
    assert items["item"].tolist() == list(range(1, p.n_items + 1)) and p.n_items == c["items_out"]
    assert (np.diff(items["count"].to_numpy()) <= 0).all()
    assert items.set_index("raw_id").loc["1", "text"] == "Item 1 | G1"
    assert items.set_index("raw_id").loc["12", "text"] == ""  # not in the catalogue: kept, empty text

    # splits: disjoint users, ComiRec sizes, exact 80/20 cut, chronological
    tr, va, te = set(p.train["user"]), set(p.valid["user"]), set(p.test["user"])
    assert not (tr & va or tr & te or va & te) and len(tr | va | te) == c["users_out"]
    assert len(tr) == int(c["users_out"] * 0.8)
    raw_id = dict(zip(items["item"], items["raw_id"].astype(int)))
    user_raw = dict(zip(p.users["user"], p.users["raw_id"].astype(int)))
    kept_items = set(items["raw_id"].astype(int))
    expected = {}
    for u, g in raw.sort_values("ts", kind="stable").groupby("user"):
        expected[u] = [i for i in g["item"] if i in kept_items]
    for df in (p.valid, p.test):
        for u, h, t in df[["user", "history", "truth"]].itertuples(index=False):
            full = expected[user_raw[u]]
            assert len(h) == int(len(full) * 0.8) and len(h) + len(t) == len(full)
            assert [raw_id[x] for x in list(h) + list(t)] == full
    for u, seq in p.train[["user", "items"]].itertuples(index=False):
        assert [raw_id[x] for x in seq] == expected[user_raw[u]]
        assert seq.dtype == np.int64 and seq.min() >= 1


def test_prepare_is_cached_and_fingerprint_tracks_inputs_and_config(tmp_path, monkeypatch):
    _write_log(tmp_path / "raw")
    cfg = _cfg(tmp_path, tmp_path / "raw")
    p1 = prepare(cfg, engine="local")

    import eimf.data.ingest as ingest_mod

    def boom(*a, **k):
        raise AssertionError("should be a cache hit")

    monkeypatch.setattr(ingest_mod, "ingest", boom)
    p2 = prepare(cfg, engine="local")
    assert p2.path == p1.path and p2.manifest == p1.manifest
    monkeypatch.undo()

    p3 = prepare(_cfg(tmp_path, tmp_path / "raw", min_count=2), engine="local")
    assert p3.path != p1.path
    p4 = prepare(_cfg(tmp_path, tmp_path / "raw", split_seed=1), engine="local")
    assert p4.path != p1.path
    # the input changes -> a new folder
    with open(tmp_path / "raw" / "log.csv", "a") as f:
        f.write("1,1,99999\n")
    p5 = prepare(cfg, engine="local")
    assert p5.path != p1.path and p5.manifest["counts"]["rows_in"] == p1.manifest["counts"]["rows_in"] + 1
    assert load_prepared(p1.path).manifest["fingerprint"] == p1.manifest["fingerprint"]


def test_unknown_catalogue_item_in_error_mode(tmp_path):
    folder = tmp_path / "raw"
    _write_log(folder, bad=False)
    with pytest.raises(DataError, match=r"log.csv, line \d+: item '12' is not in the item catalogue"):
        prepare(_cfg(tmp_path, folder, on_bad_rows="error"), engine="local")


def test_bad_row_in_error_mode_names_file_line_field(tmp_path):
    folder = tmp_path / "raw"
    _write_log(folder)
    with pytest.raises(DataError, match=r"log.csv, line \d+: field 'item_id' is missing"):
        prepare(_cfg(tmp_path, folder, on_bad_rows="error"), engine="local")


def test_loo_split(tmp_path):
    _write_log(tmp_path / "raw")
    p = prepare(_cfg(tmp_path, tmp_path / "raw", split="loo"), engine="local")
    assert set(p.train["user"]) == set(p.valid["user"]) == set(p.test["user"])
    tr = dict(zip(p.train["user"], p.train["items"]))
    for (u, vh, vt), (u2, th, tt) in zip(p.valid[["user", "history", "truth"]].itertuples(index=False),
                                         p.test[["user", "history", "truth"]].itertuples(index=False)):
        assert u == u2 and list(vh) == list(tr[u]) and len(vt) == 1 and len(tt) == 1
        assert list(th) == list(vh) + list(vt)


def test_dedupe_policies(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    # user 1: a a b a (times 1..4); user 2: b b
    (folder / "log.csv").write_text("user_id,item_id,timestamp\n1,5,1\n1,5,2\n1,6,3\n1,5,4\n2,6,1\n2,6,2\n")
    base = dict(dataset="custom", interactions=str(folder / "log.csv"), output_dir=str(tmp_path / "o"),
                min_count=1, split="loo")
    got = {}
    for policy in ("none", "consecutive", "first"):
        p = prepare(DataConfig(**base, dedupe=policy), engine="local")
        got[policy] = p.manifest["counts"]["duplicates_removed"]
    assert got == {"none": 0, "consecutive": 2, "first": 3}


def test_multiple_files_without_time_keep_file_order_through_ray(tmp_path, ray_session):
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "part-0.tsv").write_text("u\ti\n1\t1\n1\t2\n2\t1\n")
    (folder / "part-1.tsv").write_text("u\ti\n1\t3\n2\t2\n2\t3\n")
    (folder / "_SUCCESS").write_text("")
    (folder / "part-2.tsv").write_text("")  # empty part: counted, skipped in drop mode
    cfg = DataConfig(dataset="custom", interactions=str(folder), user_col="u", item_col="i", time_col=None,
                     output_dir=str(tmp_path / "o"), min_count=1, split="loo", engine="ray")
    p = prepare(cfg)
    assert p.manifest["engine"]["name"] == "ray" and p.manifest["engine"]["buckets"] == 2
    assert p.manifest["empty_files"] == [str(folder / "part-2.tsv")]
    assert p.manifest["counts"]["rows_in"] == 6 and p.manifest["has_time"] is False
    raw = dict(zip(p.items["item"], p.items["raw_id"]))
    seqs = {p.users["raw_id"].iat[u - 1]: [raw[x] for x in list(h) + list(t)]
            for u, h, t in p.test[["user", "history", "truth"]].itertuples(index=False)}
    assert seqs == {"1": ["1", "2", "3"], "2": ["1", "2", "3"]}
    with pytest.raises(EmptyFileError, match="part-2.tsv"):
        prepare(DataConfig(**{**cfg.__dict__, "on_bad_rows": "error"}))


def test_missing_dataset_folder_says_what_to_do(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        resolve_inputs(DataConfig(dataset="ml-1m", data_dir=str(tmp_path)))
    msg = str(e.value)
    assert "data.data_dir=" in msg and "EIMF_DATA_DIR" in msg and "eimf data download ml-1m" in msg
    (tmp_path / "ml-1m").mkdir()
    with pytest.raises(DatasetNotFoundError, match="ratings.dat"):
        resolve_inputs(DataConfig(dataset="ml-1m", data_dir=str(tmp_path)))


def test_publisher_layouts_are_recognised(tmp_path):
    """Downloaded raw files (GroupLens zip contents, McAuley reviews + meta) resolve to sources."""
    ml = tmp_path / "ml-1m"
    ml.mkdir()
    (ml / "ratings.dat").write_text("1::10::5::978300760\n")
    (ml / "movies.dat").write_text("10::GoldenEye (1995)::Action|Adventure|Thriller\n")
    inp = resolve_inputs(DataConfig(dataset="ml-1m", data_dir=str(tmp_path)))
    assert inp.source == "ratings" and inp.interaction_files[0].endswith("ratings.dat")
    am = tmp_path / "amazon-beauty"
    am.mkdir()
    rev = [{"reviewerID": f"A{u}", "asin": f"B{i:03d}", "overall": 5.0, "unixReviewTime": 1000 * u + i}
           for u in range(6) for i in range(5)]
    with gzip.open(am / "reviews_Beauty_5.json.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rev) + "\n")
    with gzip.open(am / "meta_Beauty.json.gz", "wt") as f:  # the 2014 meta files are Python literals
        f.write("\n".join(repr({"asin": f"B{i:03d}", "title": f"Product {i}", "categories": [["Beauty", "Nails"]]})
                          for i in range(5)) + "\n")
    cfg = DataConfig(dataset="amazon-beauty", data_dir=str(tmp_path), output_dir=str(tmp_path / "o"))
    assert resolve_inputs(cfg).source == "reviews"
    p = prepare(cfg, engine="local")
    assert p.manifest["counts"]["interactions_out"] == 30
    assert p.items["text"].iat[0] == "Product 0 | Beauty, Nails" and p.users["raw_id"].iat[0] == "A0"


@pytest.mark.skipif(not (DATA / "ml-100k").is_dir(), reason="no shared ml-100k")
def test_prepare_real_ml100k(tmp_path, ray_session):
    cfg = DataConfig(dataset="ml-100k", data_dir=str(DATA), output_dir=str(tmp_path), engine="ray")
    p = prepare(cfg)
    c = p.manifest["counts"]
    assert c["rows_in"] == 100_000 and c["rows_dropped"] == 0
    assert (c["users_out"], c["items_out"], c["interactions_out"]) == (943, 1349, 99287)
    assert c["kcore_rounds"] == 1 and c["kcore_removed_items"] == 333
    assert c["items_missing_text"] == 0 and p.manifest["has_time"]
    assert (c["train_users"], c["valid_users"], c["test_users"]) == (754, 94, 95)
    assert p.items["text"].str.contains(r" \| ").mean() > 0.99
    assert sum(len(s) for s in p.train["items"]) == c["train_interactions"]


# ------------------------------------------------------------------------------------------ training window
def test_window_keeps_in_window_rows_and_replays_a_seeded_share():
    from eimf.data.ingest import Window, replay_draw

    n = 20_000
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"user": rng.integers(0, 500, n).astype(str), "item": rng.integers(0, 900, n).astype(str),
                          "ts": rng.integers(0, 100, n), "row": np.arange(n), "line": np.arange(2, n + 2)})
    kept, drops = Window(since=50, until=90, replay=0.25, seed=1).apply("log.csv", table)
    ts = table["ts"].to_numpy()
    old = ts < 50
    assert drops["after_window"] == int((ts >= 90).sum()) and drops.examples["after_window"][0].startswith("log.csv:")
    replayed = int(old.sum()) - drops["before_window"]
    assert abs(replayed / old.sum() - 0.25) < 0.02
    assert len(kept) == int(((ts >= 50) & (ts < 90)).sum()) + replayed and kept["ts"].max() < 90
    # the draw depends on the row and the seed only: as float or int times, in any order, in any process
    d = replay_draw(table["user"], table["item"], ts, 1)
    np.testing.assert_array_equal(d[::-1], replay_draw(table["user"][::-1], table["item"][::-1],
                                                       ts[::-1].astype(float), 1))
    assert not np.array_equal(d, replay_draw(table["user"], table["item"], ts, 2))
    assert Window.of(DataConfig()) is None


def test_window_needs_a_time_column_and_sane_bounds(tmp_path):
    from eimf.config import ConfigError

    with pytest.raises(ConfigError, match="data.since/data.until need a time column"):
        DataConfig(dataset="custom", time_col=None, since=5)
    with pytest.raises(ConfigError, match="data.until must be after data.since"):
        DataConfig(since=5, until=5)
    with pytest.raises(ConfigError, match="data.replay=0.5 replays interactions before data.since"):
        DataConfig(until=5, replay=0.5)
    with pytest.raises(ConfigError, match="data.replay must be in"):
        DataConfig(since=5, replay=1.5)
    # a sequence file has a time column name by default, but no clock: refused when the inputs resolve
    log = tmp_path / "seq.txt"
    log.write_text("1 5 6 7\n2 5 6\n")
    cfg = DataConfig(dataset="custom", interactions=str(log), format="sequences", since=3)
    with pytest.raises(ConfigError, match="has no time column to cut a window on"):
        resolve_inputs(cfg)
    # and a window that leaves nothing is said as such
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp\n1,1,1\n1,2,2\n")
    with pytest.raises(DataError, match="no valid interactions.*before_window"):
        prepare(DataConfig(dataset="custom", interactions=str(csv), min_count=1, since=10,
                           output_dir=str(tmp_path / "out")), engine="local")
