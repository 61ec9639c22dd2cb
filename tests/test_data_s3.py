"""s3:// round trip against moto's S3 server on 127.0.0.1: raw files on S3 -> Ray Data -> Parquet on S3."""
from __future__ import annotations

import numpy as np
import pytest

from eimf import fs
from eimf.config import DataConfig

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def s3_env(moto_s3):
    """The session's moto server (tests/conftest.py) with this module's bucket."""
    if not moto_s3.exists("eimf-data"):
        moto_s3.mkdir("eimf-data")
    return moto_s3


def _raw(n_users=30, n_items=9):
    rng = np.random.default_rng(1)
    lines = ["user_id,item_id,timestamp"]
    for u in range(1, n_users + 1):
        for t in range(int(rng.integers(5, 10))):
            lines.append(f"{u},{int(rng.integers(1, n_items + 1))},{int(rng.integers(0, 1000))}")
    lines.append("7,,3")  # one bad row
    cat = ["item_id,title"] + [f"{i},Item {i}" for i in range(1, n_items + 1)]
    return ("\n".join(lines) + "\n").encode(), ("\n".join(cat) + "\n").encode()


def test_fs_helpers_on_s3(s3_env):
    fs.write_bytes("s3://eimf-data/h/a/x.csv", b"1")
    fs.write_bytes("s3://eimf-data/h/a/y.csv", b"22")
    fs.write_bytes("s3://eimf-data/h/a/_SUCCESS", b"")
    assert fs.expand("s3://eimf-data/h/a") == ["s3://eimf-data/h/a/x.csv", "s3://eimf-data/h/a/y.csv"]
    assert fs.expand("s3://eimf-data/h/*/y.csv") == ["s3://eimf-data/h/a/y.csv"]
    assert fs.file_info("s3://eimf-data/h/a/y.csv")["size"] == 2
    assert fs.exists("s3://eimf-data/h/a/x.csv") and not fs.exists("s3://eimf-data/h/nope")
    fs.write_json("s3://eimf-data/h/m.json", {"a": 1})
    assert fs.read_json("s3://eimf-data/h/m.json") == {"a": 1}


def test_prepare_s3_round_trip_matches_local(s3_env, ray_session, tmp_path):
    from eimf.data import load_prepared, prepare

    log, cat = _raw()
    fs.write_bytes("s3://eimf-data/raw/log/part-0.csv", log)
    fs.write_bytes("s3://eimf-data/raw/items.csv", cat)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "part-0.csv").write_bytes(log)
    (tmp_path / "raw" / "items.csv").write_bytes(cat)

    cfg = DataConfig(dataset="custom", interactions="s3://eimf-data/raw/log/", items="s3://eimf-data/raw/items.csv",
                     output_dir="s3://eimf-data/prepared", min_count=2)
    p = prepare(cfg, engine="ray")  # Ray tasks read S3, stage their buckets there, write Parquet + manifest
    assert p.path.startswith("s3://eimf-data/prepared/custom/")
    assert fs.exists(p.path + "/manifest.json") and fs.exists(p.path + "/train.parquet")
    assert p.manifest["drops"] == {"missing_item": 1}
    assert p.manifest["inputs"][0]["etag"]

    again = load_prepared(p.path)
    local = prepare(DataConfig(dataset="custom", interactions=str(tmp_path / "raw" / "part-0.csv"),
                               items=str(tmp_path / "raw" / "items.csv"), output_dir=str(tmp_path / "out"),
                               min_count=2), engine="local")
    assert again.n_items == local.n_items
    for name in ("train", "valid", "test", "items", "users"):  # the same bytes from both engines
        assert fs.read_bytes(f"{p.path}/{name}.parquet") == fs.read_bytes(f"{local.path}/{name}.parquet")
    assert not fs.exists(p.path + "/_stage")  # the buckets are cleaned up
    for split in ("train", "valid", "test", "items"):
        a, b = getattr(again, split), getattr(local, split)
        assert a.shape == b.shape
        for col in a.columns:
            assert [np.asarray(x).tolist() for x in a[col]] == [np.asarray(x).tolist() for x in b[col]]
    assert prepare(cfg).path == p.path  # cache hit on S3
