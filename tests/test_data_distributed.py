"""The bucketed preparation over Ray tasks (eimf.data.distributed) writes what the in-process path writes, byte
for byte, and says the same things about bad input."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eimf.config import DataConfig
from eimf.data.distributed import bucket_of, merge_sorted
from eimf.data.formats import DataError
from eimf.data.preprocess import SPLITS, prepare

DATA = Path(os.environ.get("EIMF_DATA_DIR", "/nonexistent"))
TABLES = (*SPLITS, "items", "users")
#: what both engines must agree on in the manifest (timings, paths and the engine itself differ)
MANIFEST_KEYS = ("n_items", "n_users", "counts", "drops", "drop_examples", "catalogue_drops",
                 "catalogue_drop_examples", "empty_files", "kcore", "split", "has_time", "files")


def _both(cfg: DataConfig, tmp_path: Path, buckets: int = 3):
    """Prepare ``cfg`` with each engine into its own folder -> (local, ray) prepared datasets."""
    out = {}
    for engine in ("local", "ray"):
        c = DataConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / engine), "engine": engine,
                          "buckets": buckets})
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


@pytest.mark.parametrize("numeric,with_time,dedupe,split,min_count", [
    (True, True, "none", "user", 3),
    (False, True, "consecutive", "user", 2),
    (True, False, "first", "loo", 3),
    (False, False, "none", "user", 1),
])
def test_messy_input_gives_the_same_bytes_and_manifest(tmp_path, ray_session, numeric, with_time, dedupe, split,
                                                       min_count):
    cfg = DataConfig(dataset="custom", dedupe=dedupe, split=split, min_count=min_count,
                     **_messy(tmp_path / "raw", numeric, with_time))
    local, ray_ = _both(cfg, tmp_path)
    _assert_same(local, ray_)
    c = ray_.manifest["counts"]
    assert c["empty_files"] == 1 and c["rows_dropped"] >= 2 and ray_.manifest["drops"].get("missing_item")
    assert ray_.manifest["catalogue_drops"] == {"duplicate_item": 5}
    assert c["items_not_in_catalogue_in"] > 0 and c["items_missing_text"] > 0
    if min_count > 1:
        assert c["kcore_rounds"] >= 1
    assert ray_.manifest["engine"] == {"name": "ray", "buckets": 3, "worker_peak_rss_mb":
                                       ray_.manifest["engine"]["worker_peak_rss_mb"]}


def test_bad_input_errors_are_the_same_on_both_engines(tmp_path, ray_session):
    spec = _messy(tmp_path / "raw", True, True)
    cfg = DataConfig(dataset="custom", on_bad_rows="error", **spec)
    messages = []
    for engine in ("local", "ray"):  # the missing item of part-0.csv (line 7) is the first error
        with pytest.raises(DataError) as e:
            prepare(DataConfig(**{**cfg.__dict__, "engine": engine, "output_dir": str(tmp_path / engine)}))
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "part-0.csv" in messages[0] and "line 7" in messages[0]

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


@pytest.mark.parametrize("name", ["ml-100k", "ml-1m", "amazon-beauty"])
def test_real_datasets_give_the_same_bytes_and_manifest(tmp_path, ray_session, name):
    if not (DATA / name).is_dir():
        pytest.skip(f"no {name} under EIMF_DATA_DIR")
    local, ray_ = _both(DataConfig(dataset=name, data_dir=str(DATA)), tmp_path, buckets=4)
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
    code = f"from eimf.data.distributed import bucket_of; import numpy as np; " \
           f"print(bucket_of(np.array({ids!r}, dtype=object), 97).tolist())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert other == str(bucket_of(np.array(ids, dtype=object), 97).tolist())
