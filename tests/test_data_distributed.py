"""The bucketed preparation over Ray tasks (eimf.data.distributed) writes what the in-process path writes, byte
for byte, and says the same things about bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eimf.config import DataConfig
from eimf.data.buckets import bucket_of, plan_pieces
from eimf.data.distributed import merge_sorted
from eimf.data.inputs import resolve_inputs
from eimf.data.parsers import DataError
from eimf.data.preprocess import prepare
from eimf.formats.prepared import SPLITS

DATA = Path(os.environ.get("EIMF_DATA_DIR", "/nonexistent"))
TABLES = (*SPLITS, "items", "users")
#: what both engines must agree on in the manifest (timings, paths and the engine itself differ)
MANIFEST_KEYS = ("n_items", "n_users", "counts", "drops", "drop_examples", "catalogue_drops",
                 "catalogue_drop_examples", "empty_files", "kcore", "split", "has_time", "files")


def _both(cfg: DataConfig, tmp_path: Path, buckets: int = 3, block_mb: float = 64.0):
    """Prepare ``cfg`` with each engine into its own folder -> (local, ray) prepared datasets; ``block_mb``: the
    ray engine's read blocks (small ones cut the test files into many)."""
    out = {}
    for engine in ("local", "ray"):
        c = DataConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / engine), "engine": engine,
                          "buckets": buckets, "read_block_mb": block_mb})
        out[engine] = prepare(c, force=True)
    return out["local"], out["ray"]


def _assert_same(a, b) -> None:
    for name in TABLES:
        assert Path(a.path, f"{name}.parquet").read_bytes() == Path(b.path, f"{name}.parquet").read_bytes(), name
    for key in MANIFEST_KEYS:
        assert a.manifest[key] == b.manifest[key], key
    assert not Path(b.path, "_stage").exists()


def _messy(root: Path, numeric: bool, with_time: bool) -> dict:
    """Two log files and an empty one, a catalogue in two files with a repeated item, items missing from the
    catalogue, bad rows, equal timestamps (order falls back to file and row), repeats of (user, item)."""
    rng = np.random.default_rng(7)
    log = root / "log"
    log.mkdir(parents=True)
    uid = (lambda u: str(u)) if numeric else (lambda u: f"U{u:03d}")
    iid = (lambda i: str(i)) if numeric else (lambda i: f"B{i:04d}x")
    for part in range(2):
        rows = []
        for _ in range(900):
            u, i = int(rng.zipf(1.6) % 60), int(rng.zipf(1.3) % 150)
            rows.append(f"{uid(u)},{iid(i)},{int(rng.integers(0, 40))}" if with_time else f"{uid(u)},{iid(i)}")
        rows[5] = f"{uid(1)},,3" if with_time else f"{uid(1)},"  # no item: dropped, or the first error (line 7)
        head = "user_id,item_id,timestamp" if with_time else "user_id,item_id"
        (log / f"part-{part}.csv").write_text(head + "\n" + "\n".join(rows) + "\n")
    (log / "part-2.csv").write_text("")
    cat = root / "items"
    cat.mkdir()
    (cat / "a.csv").write_text("item_id,title\n" + "".join(f"{iid(i)},Title {i}\n" for i in range(0, 100)))
    (cat / "b.csv").write_text("item_id,title\n" + "".join(f"{iid(i)},Other {i}\n" for i in range(95, 120)))
    return {"interactions": str(log), "items": str(cat), "numeric_ids": numeric,
            "time_col": "timestamp" if with_time else None}


@pytest.mark.parametrize("numeric,with_time,dedupe,split,min_count,block_mb", [
    (True, True, "none", "user", 3, 64.0),
    (False, True, "consecutive", "user", 2, 0.002),  # ~2 KB blocks: each log file in several tasks
    (True, False, "first", "loo", 3, 0.003),
    (False, False, "none", "user", 1, 64.0),
])
def test_messy_input_gives_the_same_bytes_and_manifest(tmp_path, ray_session, numeric, with_time, dedupe, split,
                                                       min_count, block_mb):
    cfg = DataConfig(dataset="custom", dedupe=dedupe, split=split, min_count=min_count,
                     **_messy(tmp_path / "raw", numeric, with_time))
    local, ray_ = _both(cfg, tmp_path, block_mb=block_mb)
    _assert_same(local, ray_)
    c = ray_.manifest["counts"]
    assert c["empty_files"] == 1 and c["rows_dropped"] >= 2 and ray_.manifest["drops"].get("missing_item")
    assert ray_.manifest["catalogue_drops"] == {"duplicate_item": 5}
    assert c["items_not_in_catalogue_in"] > 0 and c["items_missing_text"] > 0
    if min_count > 1:
        assert c["kcore_rounds"] >= 1
    engine = ray_.manifest["engine"]
    assert engine["name"] == "ray" and engine["buckets"] == 3 and engine["worker_peak_rss_mb"] > 0
    assert (engine["read_blocks"] > 3) if block_mb < 1 else (engine["read_blocks"] == 3), engine  # 3 files


def test_blocks_of_every_cuttable_format_give_the_same_bytes(tmp_path, ray_session):
    """JSON lines, sequence files, TSV and a Parquet log of many row groups, each cut into blocks (header-less
    delimited files: ML-100K and ML-1M below)."""
    rng = np.random.default_rng(11)
    users, items = rng.integers(0, 40, 3000), (rng.zipf(1.4, 3000) % 90)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "log.jsonl").write_text("".join(json.dumps({"u": int(u), "i": int(i), "t": k}) + ("\n\n" if k % 97 else "\n")
                                           for k, (u, i) in enumerate(zip(users, items))))
    (raw / "log.txt").write_text("".join(f"{u} " + " ".join(map(str, rng.integers(0, 90, 8))) + "\n" for u in range(300)))
    (raw / "log.tsv").write_text("u\ti\tt\n" + "".join(f"{u}\t{i}\t{k % 50}\n" for k, (u, i) in enumerate(zip(users, items))))
    pq.write_table(pa.table({"u": users.astype(str), "i": items.astype(str), "t": np.arange(3000)}), raw / "log.parquet",
                   row_group_size=200)
    cases = {"jsonl": dict(interactions=str(raw / "log.jsonl"), user_col="u", item_col="i", time_col="t"),
             "sequences": dict(interactions=str(raw / "log.txt"), format="sequences", time_col=None),
             "tsv": dict(interactions=str(raw / "log.tsv"), user_col="u", item_col="i", time_col="t"),
             "parquet": dict(interactions=str(raw / "log.parquet"), user_col="u", item_col="i", time_col="t")}
    for name, kwargs in cases.items():
        cfg = DataConfig(dataset="custom", min_count=2, **kwargs)
        local, ray_ = _both(cfg, tmp_path / name, block_mb=0.004)
        _assert_same(local, ray_)
        assert ray_.manifest["counts"]["interactions_out"] > 1000, name
        assert ray_.manifest["engine"]["read_blocks"] >= 2, name
    spec = resolve_inputs(DataConfig(dataset="custom", **cases["parquet"])).interaction_spec
    pieces = plan_pieces(str(raw / "log.parquet"), spec, 4000)
    assert len(pieces) > 2 and all(p[0] == "parquet" for p in pieces)


def test_text_blocks_end_at_line_ends_and_carry_the_header(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{u % 7},{u}\n" for u in range(2000)))
    spec = resolve_inputs(DataConfig(dataset="custom", interactions=str(path))).interaction_spec
    pieces = plan_pieces(str(path), spec, 3000)
    data = path.read_bytes()
    assert len(pieces) > 3 and pieces[0][1] == 0 and pieces[-1][2] == len(data)
    for (_, a, b, header), nxt in zip(pieces, pieces[1:] + [None]):
        assert data[b - 1:b] == b"\n" and (nxt is None or nxt[1] == b)
        assert header == (b"" if a == 0 else b"user_id,item_id,timestamp\n")
    gz = tmp_path / "log.csv.gz"
    gz.write_bytes(__import__("gzip").compress(data))
    assert plan_pieces(str(gz), spec, 100) == [None]  # a compressed file is read whole


def test_more_buckets_than_users_or_items(tmp_path, ray_session):
    """Empty buckets (3 users and 4 items over 8 buckets) are no special case."""
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{u * 10 + i}\n" for u in range(3) for i in range(4)))
    local, ray_ = _both(DataConfig(dataset="custom", interactions=str(log), min_count=1), tmp_path, buckets=8)
    _assert_same(local, ray_)
    assert ray_.manifest["counts"]["interactions_out"] == 12


def test_bad_input_errors_are_the_same_on_both_engines(tmp_path, ray_session):
    spec = _messy(tmp_path / "raw", True, True)
    cfg = DataConfig(dataset="custom", on_bad_rows="error", **spec)
    messages = []
    for engine in ("local", "ray"):  # the missing item of part-0.csv (line 7) is the first error
        with pytest.raises(DataError) as e:
            prepare(DataConfig(**{**cfg.__dict__, "engine": engine, "output_dir": str(tmp_path / engine)}))
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "part-0.csv" in messages[0] and "line 7" in messages[0]

    # the first bad row deep inside the file: the block that holds it names the same line
    deep = tmp_path / "deep.csv"
    deep.write_text("user_id,item_id,timestamp\n" + "".join(
        f"{u % 30},{u % 11},{'x' if u == 1500 else u}\n" for u in range(3000)))
    got = []
    for engine in ("local", "ray"):
        with pytest.raises(DataError) as e:
            prepare(DataConfig(dataset="custom", interactions=str(deep), on_bad_rows="error", engine=engine,
                               read_block_mb=0.002, output_dir=str(tmp_path / engine)))
        got.append(str(e.value))
    assert got[0] == got[1] and "deep.csv, line 1502" in got[0], got

    # a clean log: the catalogue's repeated item, then an item the catalogue lacks
    log = tmp_path / "clean.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{u + i}\n" for u in range(8) for i in range(6)))
    for second, expect in (("item_id,title\n7,x\n3,y\n", "b.csv, line 3: field 'item_id' repeats item '3'"),
                           ("item_id,title\n4,y\n", "clean.csv, line 7: item '5' is not in the item catalogue")):
        cat = tmp_path / f"cat{len(second)}"
        cat.mkdir()
        (cat / "a.csv").write_text("item_id,title\n0,a\n1,b\n2,c\n3,d\n")
        (cat / "b.csv").write_text(second)
        got = []
        for engine in ("local", "ray"):
            with pytest.raises(DataError) as e:
                prepare(DataConfig(dataset="custom", interactions=str(log), items=str(cat), on_bad_rows="error",
                                   engine=engine, output_dir=str(tmp_path / engine)))
            got.append(str(e.value))
        assert got[0] == got[1] and expect in got[0], got


@pytest.mark.parametrize("name,block_mb", [("ml-100k", 0.5), ("ml-1m", 4.0), ("amazon-beauty", 64.0)])
def test_real_datasets_give_the_same_bytes_and_manifest(tmp_path, ray_session, name, block_mb):
    """ML-100K (tab, no header) and ML-1M (``::``) are read in blocks; Beauty's gzipped JSON whole."""
    if not (DATA / name).is_dir():
        pytest.skip(f"no {name} under EIMF_DATA_DIR")
    local, ray_ = _both(DataConfig(dataset=name, data_dir=str(DATA)), tmp_path, buckets=4, block_mb=block_mb)
    _assert_same(local, ray_)
    assert local.manifest["fingerprint"] == ray_.manifest["fingerprint"]  # the engine is not part of the output


def test_merge_of_sorted_files_equals_one_sort(tmp_path):
    rng = np.random.default_rng(3)
    keys = rng.permutation(5000)
    counts = rng.integers(1, 20, 5000)
    paths = []
    for b in range(4):  # buckets of very different sizes, one empty
        sel = bucket_of(keys.astype(str), 3) == b if b < 3 else np.zeros(5000, dtype=bool)
        df = pd.DataFrame({"neg_count": -counts[sel], "key": pd.array(keys[sel].astype(str), dtype="str")})
        df = df.sort_values(["neg_count", "key"]).reset_index(drop=True)
        paths.append(str(tmp_path / f"b{b}.parquet"))
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), paths[-1])
    got, sources = [], []
    for chunk, src in merge_sorted(paths, ["neg_count", "key"], batch_rows=37):
        got.append(chunk.to_pandas())
        sources.append(src)
    merged = pd.concat(got, ignore_index=True)
    expect = pd.DataFrame({"neg_count": -counts, "key": keys.astype(str)}).sort_values(["neg_count", "key"])
    assert merged["key"].tolist() == expect["key"].tolist()
    assert merged["neg_count"].tolist() == expect["neg_count"].tolist()
    src = np.concatenate(sources)
    assert (bucket_of(merged["key"].to_numpy(), 3) == src).all() and not (src == 3).any()


def test_bucket_of_is_the_same_in_another_process():
    """Tasks on other nodes must bucket a raw id as this process does, whatever Python's own hash seed."""
    import subprocess
    import sys

    ids = ["1", "A0", "B0001x", "üñí", ""]
    code = f"from eimf.data.buckets import bucket_of; import numpy as np; " \
           f"print(bucket_of(np.array({ids!r}, dtype=object), 97).tolist())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert other == str(bucket_of(np.array(ids, dtype=object), 97).tolist())


def test_training_window_with_replay_gives_the_same_bytes_on_both_engines(tmp_path, ray_session):
    """data.since / data.until / data.replay cut the log as it is read, on both engines alike (the ray engine in
    ~2 KB blocks): only in-window rows plus the replayed share of the old ones reach the prepared data."""
    spec = _messy(tmp_path / "raw", False, True)  # times 0..39
    base = dict(dataset="custom", min_count=1, **spec)
    full = _both(DataConfig(**base), tmp_path / "full")[0]
    cut = DataConfig(**base, since=20, until=35, replay=0.3, replay_seed=5)
    local, ray_ = _both(cut, tmp_path / "cut", block_mb=0.002)
    _assert_same(local, ray_)
    d, n_in = ray_.manifest["drops"], full.manifest["counts"]["interactions_out"]
    assert d["before_window"] > 0 and d["after_window"] > 0
    assert ray_.manifest["counts"]["interactions_out"] == n_in - d["before_window"] - d["after_window"]
    assert ray_.manifest["config"]["since"] == 20 and ray_.manifest["fingerprint"] != full.manifest["fingerprint"]
    # another replay seed draws other old rows, the same number give or take
    other = _both(DataConfig(**{**cut.__dict__, "replay_seed": 6}), tmp_path / "seed6")[0]
    assert other.manifest["fingerprint"] != local.manifest["fingerprint"]
    assert Path(other.path, "train.parquet").read_bytes() != Path(local.path, "train.parquet").read_bytes()
