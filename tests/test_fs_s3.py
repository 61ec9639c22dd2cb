"""eimf.fs helpers for run outputs on s3://, against moto's S3 server on 127.0.0.1 (fixtures in conftest.py)."""
from __future__ import annotations

import os
import pickle

import pyarrow.fs as pafs
import pytest

from eimf import fs

pytestmark = pytest.mark.timeout(180)


def _tree(root):
    """{relative path: bytes} of every file below root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.fixture
def run_folder(tmp_path):
    root = tmp_path / "export"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "model.pt").write_bytes(os.urandom(3000))
    (root / "metrics.json").write_text('{"recall@50": 0.25}\n')
    (root / ".is_checkpoint").write_text("")  # hidden files are data here
    (root / "sub" / "deeper" / "shard_1.pt").write_bytes(b"\x00\x01\x02")
    return root


def test_text_round_trip_s3_and_local(moto_s3, tmp_path):
    fs.write_text("s3://eimf-test/t/a.yaml", "k: é\n")
    assert fs.read_text("s3://eimf-test/t/a.yaml") == "k: é\n"
    assert moto_s3.cat_file("eimf-test/t/a.yaml") == "k: é\n".encode()
    local = str(tmp_path / "x" / "b.txt")
    fs.write_text(local, "hello")
    assert fs.read_text(local) == "hello"
    with pytest.raises(FileNotFoundError):
        fs.read_text("s3://eimf-test/t/missing.yaml")


def test_upload_download_round_trip(moto_s3, run_folder, tmp_path):
    url = "s3://eimf-test/runs/r1/export"
    assert fs.upload_dir(run_folder, url) == url
    assert sorted(moto_s3.find("eimf-test/runs/r1/export")) == [
        "eimf-test/runs/r1/export/.is_checkpoint", "eimf-test/runs/r1/export/metrics.json",
        "eimf-test/runs/r1/export/model.pt", "eimf-test/runs/r1/export/sub/deeper/shard_1.pt"]
    assert fs.list_files(url + "/") == [".is_checkpoint", "metrics.json", "model.pt", "sub/deeper/shard_1.pt"]
    back = tmp_path / "back"
    assert fs.download_dir(url, back) == str(back)
    assert _tree(back) == _tree(run_folder)

    # A second upload overwrites files of the same name and keeps the others.
    (run_folder / "metrics.json").write_text('{"recall@50": 0.5}\n')
    fs.upload_dir(run_folder, url)
    assert fs.read_json(url + "/metrics.json") == {"recall@50": 0.5}
    # A sibling whose name starts with the same prefix is not part of the folder.
    fs.write_text("s3://eimf-test/runs/r1/export-old/x.txt", "x")
    assert "x.txt" not in fs.list_files(url) and len(fs.list_files(url)) == 4


def test_local_destinations(run_folder, tmp_path):
    dest = tmp_path / "copy" / "export"
    fs.upload_dir(run_folder, str(dest))
    assert _tree(dest) == _tree(run_folder)
    again = tmp_path / "again"
    fs.download_dir(str(dest), again)
    assert _tree(again) == _tree(run_folder)
    with fs.local_dir(str(dest)) as folder:
        assert folder == str(dest)


def test_missing_folders_name_the_path(moto_s3, tmp_path):
    with pytest.raises(FileNotFoundError, match="s3://eimf-test/nothing/here"):
        fs.download_dir("s3://eimf-test/nothing/here", tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="no local folder at .*nope"):
        fs.upload_dir(tmp_path / "nope", "s3://eimf-test/x")
    fs.write_text("s3://eimf-test/afile", "1")
    with pytest.raises(FileNotFoundError, match="s3://eimf-test/afile"):
        fs.list_files("s3://eimf-test/afile")  # a file is not a folder
    with pytest.raises(FileNotFoundError, match="nope"):
        fs.list_files(str(tmp_path / "nope"))


def test_local_dir_downloads_s3_and_cleans_up(moto_s3, run_folder):
    fs.upload_dir(run_folder, "s3://eimf-test/runs/r2/export")
    with fs.local_dir("s3://eimf-test/runs/r2/export") as folder:
        assert os.path.isdir(folder)
        assert _tree(folder) == _tree(run_folder)
    assert not os.path.exists(folder)


def test_ray_storage(moto_s3, moto_s3_endpoint, monkeypatch, tmp_path):
    assert fs.ray_storage(str(tmp_path / "runs")) == (str(tmp_path / "runs"), None)

    path, filesystem = fs.ray_storage("s3://eimf-test/runs/")
    assert path == "eimf-test/runs"
    assert isinstance(filesystem, pafs.S3FileSystem)
    # The file system reaches moto (not AWS) and keeps doing so after a pickle round trip (Ray workers).
    for f in (filesystem, pickle.loads(pickle.dumps(filesystem))):
        with f.open_output_stream("eimf-test/runs/probe.txt") as out:
            out.write(b"ok")
        assert moto_s3.cat_file("eimf-test/runs/probe.txt") == b"ok"
    assert filesystem.get_file_info("eimf-test/runs/probe.txt").size == 2

    # AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL, as for s3fs.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3_endpoint)
    f = fs.ray_storage("s3://eimf-test/runs")[1]
    assert f.get_file_info("eimf-test/runs/probe.txt").size == 2

    with pytest.raises(ValueError, match="names no bucket"):
        fs.ray_storage("s3://")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "127.0.0.1:9")
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL"):
        fs.pyarrow_s3_filesystem()

    # Plain AWS (no endpoint): Ray resolves the URI itself.
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert fs.ray_storage("s3://bucket/runs/") == ("s3://bucket/runs", None)


@pytest.mark.e2e
def test_ray_train_checkpoints_into_s3(moto_s3, ray_session, tmp_path):
    """Ray Train with RunConfig(storage_path, storage_filesystem) from fs.ray_storage writes its checkpoints
    to the moto bucket, and the result's checkpoint reads back from there."""
    import tempfile

    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def train_func():
        import ray.train

        for step in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                with open(os.path.join(tmp, "state.txt"), "w") as f:
                    f.write(f"step {step}")
                ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(tmp))

    storage_path, storage_fs = fs.ray_storage("s3://eimf-test/ray-runs")
    trainer = TorchTrainer(
        train_func,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="s3-run", storage_path=storage_path, storage_filesystem=storage_fs),
    )
    result = trainer.fit()
    assert result.checkpoint.path.startswith("eimf-test/ray-runs/s3-run/")
    stored = [p for p in moto_s3.find("eimf-test/ray-runs/s3-run") if p.endswith("state.txt")]
    assert stored, "no checkpoint in the bucket"
    with result.checkpoint.as_directory() as folder:
        assert open(os.path.join(folder, "state.txt")).read() == "step 2"
    # The same folder through eimf.fs, as the runner's export step would read it.
    url = "s3://" + result.checkpoint.path
    with fs.local_dir(url) as folder:
        assert open(os.path.join(folder, "state.txt")).read() == "step 2"
