"""eimf.data.download against a local HTTP server on 127.0.0.1 (no internet needed)."""
from __future__ import annotations

import collections
import gzip
import hashlib
import importlib
import io
import logging
import os
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from eimf.data.datasets import DownloadSpec, RemoteFile

# The module itself, even if eimf/data/__init__.py re-exports a function named ``download``.
dl = importlib.import_module("eimf.data.download")

pytestmark = pytest.mark.timeout(60)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ------------------------------------------------------------------------------------------- fixtures
class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        srv = self.server
        path = self.path.split("?", 1)[0]
        srv.hits[path] += 1
        if srv.fail_first[path] > 0:
            srv.fail_first[path] -= 1
            self._send(503, b"busy")
            return
        body = srv.routes.get(path)
        if body is not None and srv.truncate_first[path] > 0:  # promise the whole body, send half, hang up
            srv.truncate_first[path] -= 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if body is None:
            self._send(404, b"not found")
            return
        self._send(200, body, srv.extra_headers.get(path, {}))

    def _send(self, code, body, headers=None):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep pytest output quiet
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.routes, srv.extra_headers = {}, {}
    srv.hits, srv.fail_first, srv.truncate_first = collections.Counter(), collections.Counter(), collections.Counter()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch):
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    monkeypatch.delenv(dl.DATA_DIR_ENV, raising=False)


def _zip(files: dict, top: str = "tiny") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{top}/", b"")
        for name, data in files.items():
            zf.writestr(f"{top}/{name}" if top else name, data)
    return buf.getvalue()


TINY_FILES = {"ratings.dat": b"1::10::5::978300760\n1::20::3::978302109\n", "movies.dat": b"10::Toy (1995)::Comedy\n"}


def _register(monkeypatch, *files: RemoteFile, required=(("ratings.dat",), ("movies.dat",))) -> DownloadSpec:
    from eimf.data.datasets import DATASETS, DatasetSpec, Source
    from eimf.data.parsers import CatalogueSpec, InteractionSpec

    spec = DownloadSpec(name="tiny", description="test", files=tuple(files), required=tuple(required))
    source = Source("ratings", "ratings.dat + movies.dat", ("ratings.dat",),
                    InteractionSpec(format="dat", header=False, names=["user_id", "item_id", "rating", "timestamp"]),
                    ("movies.dat",), CatalogueSpec(format="ml1m-movies"))
    monkeypatch.setitem(DATASETS, "tiny", DatasetSpec("tiny", "test", (source,), download=spec))
    return spec


def _fast(**kw):
    return dict(progress=False, retries=3, backoff=0.0, timeout=5.0) | kw


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------- download
def test_download_verify_extract_and_reuse(server, tmp_path, monkeypatch):
    body = _zip(TINY_FILES)
    server.routes["/tiny.zip"] = body
    _register(monkeypatch, RemoteFile("tiny.zip", "https://publisher.invalid/x", extract=True,
                                      sha256=hashlib.sha256(body).hexdigest(), md5=hashlib.md5(body).hexdigest(),
                                      size=len(body), checksum_source="test"))
    monkeypatch.setenv(dl.MIRROR_ENV, server.url)

    out = dl.download("tiny", tmp_path, **_fast())

    assert out == tmp_path / "tiny"
    assert (out / "ratings.dat").read_bytes() == TINY_FILES["ratings.dat"]  # top folder "tiny/" stripped
    assert (out / "movies.dat").read_bytes() == TINY_FILES["movies.dat"]
    assert _leftovers(out) == ["CHECKSUMS", "movies.dat", "ratings.dat", "tiny.zip"]  # no temp files
    assert dl.read_sums(out / "CHECKSUMS") == {"tiny.zip": hashlib.sha256(body).hexdigest()}
    assert server.hits["/tiny.zip"] == 1

    # Complete: a second call fetches nothing.
    dl.download("tiny", tmp_path, **_fast())
    assert server.hits["/tiny.zip"] == 1
    # Extracted file lost but the verified zip still there: re-extract without a request.
    (out / "movies.dat").unlink()
    dl.download("tiny", tmp_path, **_fast())
    assert server.hits["/tiny.zip"] == 1 and (out / "movies.dat").is_file()
    # force: fetch again.
    dl.download("tiny", tmp_path, force=True, **_fast())
    assert server.hits["/tiny.zip"] == 2
    # The folder passes verify() through its CHECKSUMS.
    assert dl.verify("tiny", tmp_path).status == "ok"


def test_data_dir_from_env_and_mirror_argument(server, tmp_path, monkeypatch):
    body = _zip(TINY_FILES)
    server.routes["/mirror/tiny.zip"] = body
    _register(monkeypatch, RemoteFile("tiny.zip", "https://publisher.invalid/", extract=True,
                                      sha256=hashlib.sha256(body).hexdigest()))
    monkeypatch.setenv(dl.DATA_DIR_ENV, str(tmp_path / "env-dir"))
    monkeypatch.setenv(dl.MIRROR_ENV, "http://127.0.0.1:9/unused")  # the argument wins over the env var
    out = dl.download("tiny", mirror=server.url + "/mirror/", **_fast())
    assert out == tmp_path / "env-dir" / "tiny" and (out / "ratings.dat").is_file()


def test_checksum_mismatch_raises_and_leaves_no_file(server, tmp_path, monkeypatch):
    server.routes["/tiny.zip"] = _zip(TINY_FILES)
    expected = hashlib.sha256(b"what the publisher published").hexdigest()
    _register(monkeypatch, RemoteFile("tiny.zip", server.url, extract=True, sha256=expected,
                                      checksum_source="publisher .sha256"))
    with pytest.raises(dl.ChecksumError) as err:
        dl.download("tiny", tmp_path, **_fast())
    msg = str(err.value)
    actual = hashlib.sha256(server.routes["/tiny.zip"]).hexdigest()
    assert f"{server.url}/tiny.zip" in msg and expected in msg and actual in msg
    assert (err.value.expected, err.value.actual) == (expected, actual)
    assert _leftovers(tmp_path / "tiny") == []  # no zip, no .part, nothing extracted, no CHECKSUMS


def test_size_and_md5_are_checked_too(server, tmp_path, monkeypatch):
    body = _zip(TINY_FILES)
    server.routes["/tiny.zip"] = body
    _register(monkeypatch, RemoteFile("tiny.zip", server.url, extract=True, md5="0" * 32))
    with pytest.raises(dl.ChecksumError, match="md5"):
        dl.download("tiny", tmp_path, **_fast())
    _register(monkeypatch, RemoteFile("tiny.zip", server.url, extract=True, size=len(body) + 1,
                                      md5=hashlib.md5(body).hexdigest()))
    with pytest.raises(dl.ChecksumError, match="size"):
        dl.download("tiny", tmp_path, **_fast())
    assert _leftovers(tmp_path / "tiny") == []


def test_server_down_gives_clear_error(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _register(monkeypatch, RemoteFile("tiny.zip", f"http://127.0.0.1:{port}", extract=True,
                                      sha256="0" * 64))
    with pytest.raises(dl.DownloadError) as err:
        dl.download("tiny", tmp_path, **_fast(retries=2))
    msg = str(err.value)
    assert not isinstance(err.value, dl.ChecksumError)
    assert "EIMF_DATA_DIR" in msg and f"data.data_dir={tmp_path}" in msg
    assert str(tmp_path / "tiny") in msg and f"http://127.0.0.1:{port}/tiny.zip" in msg
    assert "after 2 attempts" in msg and "NewConnectionError" in msg and dl.MIRROR_ENV in msg
    assert not (tmp_path / "tiny").exists()  # no empty folder left behind


def test_retry_after_transient_503(server, tmp_path, monkeypatch, caplog):
    body = _zip(TINY_FILES)
    server.routes["/tiny.zip"] = body
    server.fail_first["/tiny.zip"] = 1
    _register(monkeypatch, RemoteFile("tiny.zip", server.url, extract=True,
                                      sha256=hashlib.sha256(body).hexdigest()))
    with caplog.at_level(logging.WARNING, logger=dl.__name__):
        out = dl.download("tiny", tmp_path, **_fast())
    assert server.hits["/tiny.zip"] == 2 and (out / "ratings.dat").is_file()
    assert "503" in caplog.text and "retry 1/2" in caplog.text


def test_retry_after_truncated_body(server, tmp_path, monkeypatch):
    body = _zip({"ratings.dat": os.urandom(200_000), "movies.dat": b"m"})
    server.routes["/tiny.zip"] = body
    server.truncate_first["/tiny.zip"] = 1
    _register(monkeypatch, RemoteFile("tiny.zip", server.url, extract=True,
                                      sha256=hashlib.sha256(body).hexdigest()))
    out = dl.download("tiny", tmp_path, **_fast())
    assert server.hits["/tiny.zip"] == 2 and (out / "tiny.zip").read_bytes() == body
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_persistent_503_and_404_fail(server, tmp_path, monkeypatch):
    server.routes["/tiny.zip"] = b"x"
    server.fail_first["/tiny.zip"] = 99
    _register(monkeypatch, RemoteFile("tiny.zip", server.url, extract=True, sha256="0" * 64))
    with pytest.raises(dl.DownloadError, match="after 3 attempts: HTTP 503"):
        dl.download("tiny", tmp_path, **_fast())
    assert server.hits["/tiny.zip"] == 3
    _register(monkeypatch, RemoteFile("gone.zip", server.url, extract=True, sha256="0" * 64))
    with pytest.raises(dl.DownloadError, match="404") as err:
        dl.download("tiny", tmp_path, **_fast())
    assert server.hits["/gone.zip"] == 1  # a 404 is not retried
    assert "EIMF_DATA_DIR" in str(err.value)


def test_trust_on_first_use_for_gz_kept_as_downloaded(server, tmp_path, monkeypatch, caplog):
    reviews = gzip.compress(b'{"reviewerID": "A1", "asin": "B1", "unixReviewTime": 1}\n', mtime=0)
    meta = gzip.compress(b"{'asin': 'B1', 'title': 'Lipstick'}\n", mtime=0)
    server.routes.update({"/reviews_Tiny_5.json.gz": reviews, "/meta_Tiny.json.gz": meta})
    # Some servers label .gz files Content-Encoding: gzip; the bytes must still be kept as served.
    server.extra_headers["/reviews_Tiny_5.json.gz"] = {"Content-Encoding": "gzip"}
    _register(monkeypatch, RemoteFile("reviews_Tiny_5.json.gz", server.url),
              RemoteFile("meta_Tiny.json.gz", server.url),
              required=(("reviews_Tiny_5.json.gz",), ("meta_Tiny.json.gz",)))

    with caplog.at_level(logging.WARNING, logger=dl.__name__):
        out = dl.download("tiny", tmp_path, **_fast())
    assert (out / "reviews_Tiny_5.json.gz").read_bytes() == reviews
    assert (out / "meta_Tiny.json.gz").read_bytes() == meta
    assert "trust on first use" in caplog.text and hashlib.sha256(reviews).hexdigest() in caplog.text
    assert dl.read_sums(out / "CHECKSUMS") == {"reviews_Tiny_5.json.gz": hashlib.sha256(reviews).hexdigest(),
                                               "meta_Tiny.json.gz": hashlib.sha256(meta).hexdigest()}

    # Same bytes again: accepted. Changed upstream bytes: rejected against the recorded hash, file deleted.
    dl.download("tiny", tmp_path, force=True, **_fast())
    server.routes["/meta_Tiny.json.gz"] = gzip.compress(b"{'asin': 'B1', 'title': 'EVIL'}\n", mtime=0)
    with pytest.raises(dl.ChecksumError, match="CHECKSUMS") as err:
        dl.download("tiny", tmp_path, force=True, **_fast())
    assert err.value.expected == hashlib.sha256(meta).hexdigest()
    # The rejected download is deleted; the earlier verified copy stays.
    assert (out / "meta_Tiny.json.gz").read_bytes() == meta
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_corrupt_local_file_is_downloaded_again(server, tmp_path, monkeypatch):
    body = _zip(TINY_FILES)
    server.routes["/tiny.zip"] = body
    _register(monkeypatch, RemoteFile("tiny.zip", server.url, extract=True,
                                      sha256=hashlib.sha256(body).hexdigest()))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "tiny.zip").write_bytes(b"half a zip")
    out = dl.download("tiny", tmp_path, **_fast())
    assert (out / "tiny.zip").read_bytes() == body and server.hits["/tiny.zip"] == 1


def test_zip_slip_is_refused(server, tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("tiny/ratings.dat", b"x")
        zf.writestr("../evil.txt", b"owned")
    body = buf.getvalue()
    server.routes["/tiny.zip"] = body
    _register(monkeypatch, RemoteFile("tiny.zip", server.url, extract=True,
                                      sha256=hashlib.sha256(body).hexdigest()))
    with pytest.raises(dl.DownloadError, match="refusing"):
        dl.download("tiny", tmp_path / "d", **_fast())
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "d" / "evil.txt").exists()


def test_unknown_name_and_missing_data_dir():
    with pytest.raises(ValueError, match="ml-1m"):
        dl.download("ml-2m", "/tmp/never")
    with pytest.raises(dl.DownloadError, match="EIMF_DATA_DIR"):
        dl.download("ml-1m", None)


def test_registry():
    from eimf.data.datasets import DATASETS

    assert sorted(n for n, s in DATASETS.items() if s.download) == ["amazon-beauty", "amazon-sports", "amazon-toys",
                                                                      "ml-100k", "ml-1m"]
    assert all(s.download is None or s.download.name == n for n, s in DATASETS.items())  # one registry, one name
    for name in ("ml-100k", "ml-1m"):
        (f,) = dl.get_spec(name).files
        assert f.url() == f"https://files.grouplens.org/datasets/movielens/{name}.zip"
        assert len(f.sha256) == 64 and len(f.md5) == 32 and f.size and f.extract and f.published
    beauty = [f.url() for f in dl.get_spec("amazon-beauty").files]
    assert beauty == ["https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Beauty_5.json.gz",
                      "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_Beauty.json.gz"]
    for name in ("amazon-beauty", "amazon-sports", "amazon-toys"):
        assert all(not f.published and "trust on first use" in f.checksum_source for f in dl.get_spec(name).files)
    assert dl.get_spec("amazon-toys").files[0].filename == "reviews_Toys_and_Games_5.json.gz"
    assert dl.get_spec("amazon-sports").files[1].filename == "meta_Sports_and_Outdoors.json.gz"


# ------------------------------------------------------------------------------------------- verify
def test_verify_against_root_sha256sums(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "other").mkdir()
    files = {"tiny/a.dat": b"alpha", "tiny/b.dat.gz": b"beta", "other/c.dat": b"gamma"}
    for rel, data in files.items():
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256(d).hexdigest()}  ./{rel}\n" for rel, d in files.items()))

    res = dl.verify("tiny", tmp_path)
    assert res.status == "ok" and res.ok_files == ["a.dat", "b.dat.gz"]  # only entries under ./tiny/
    assert res.sums_files == [tmp_path / "SHA256SUMS"]
    assert dl.verify(None, tmp_path).ok_files == ["other/c.dat", "tiny/a.dat", "tiny/b.dat.gz"]

    (tmp_path / "tiny" / "a.dat").write_bytes(b"tampered")
    (tmp_path / "tiny" / "b.dat.gz").unlink()
    res = dl.verify("tiny", tmp_path)
    assert res.status == "failed" and res.missing == ["b.dat.gz"]
    assert res.mismatched == [("a.dat", hashlib.sha256(b"alpha").hexdigest(), hashlib.sha256(b"tampered").hexdigest())]
    assert "MISMATCH a.dat" in res.summary()
    with pytest.raises(dl.VerifyError, match="MISSING  b.dat.gz"):
        res.raise_if_failed()

    assert dl.verify("nothing-listed", tmp_path).status == "unchecked"

    from eimf.cli import main

    assert main(["data", "verify", "other", "--data-dir", str(tmp_path)]) == 0
    assert main(["data", "verify", "tiny", "--data-dir", str(tmp_path)]) == 1  # the tampered folder fails


@pytest.mark.skipif(not (SHARED_DATA / "SHA256SUMS").is_file(), reason="shared data folder not present")
@pytest.mark.parametrize("name", ["ml-100k", "ml-1m", "amazon-beauty", "amazon-sports", "amazon-toys"])
def test_verify_shared_data_folder(name):
    res = dl.verify(name, SHARED_DATA)
    assert res.status == "ok", res.summary()
    assert len(res.ok_files) >= 4


# ----------------------------------------------------------------------------------- data.download=auto
def test_a_missing_dataset_is_downloaded_on_first_use_and_offline_the_error_stays(server, tmp_path, monkeypatch):
    from eimf.config import load_config
    from eimf.data.datasets import DatasetNotFoundError
    from eimf.data.inputs import ensure_dataset, resolve_inputs

    payload = _zip(TINY_FILES)
    server.routes["/tiny.zip"] = payload
    _register(monkeypatch, RemoteFile("tiny.zip", server.url, sha256=hashlib.sha256(payload).hexdigest(),
                                      extract=True))
    cfg = load_config(None, ["data.dataset=tiny", f"data.data_dir={tmp_path / 'data'}"]).data
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "data" / "tiny")):
        resolve_inputs(cfg)  # resolving never downloads (a --plan writes nothing)
    ensure_dataset(cfg)
    assert server.hits["/tiny.zip"] == 1 and resolve_inputs(cfg).interaction_files[0].endswith("ratings.dat")
    ensure_dataset(cfg)  # present now: nothing fetched again
    assert server.hits["/tiny.zip"] == 1
    # never: no request, resolving fails as before
    off = load_config(None, ["data.dataset=tiny", f"data.data_dir={tmp_path / 'none'}", "data.download=never"]).data
    ensure_dataset(off)
    assert server.hits["/tiny.zip"] == 1 and not (tmp_path / "none").exists()
    # no network (a closed port): the error names the folder and the reason, and leaves no folder behind
    _register(monkeypatch, RemoteFile("tiny.zip", "http://127.0.0.1:9", extract=True))
    gone = load_config(None, ["data.dataset=tiny", f"data.data_dir={tmp_path / 'offline'}"]).data
    with pytest.raises(DatasetNotFoundError, match="downloading it failed") as e:
        ensure_dataset(gone)
    assert str(tmp_path / "offline" / "tiny") in str(e.value) and not (tmp_path / "offline" / "tiny").exists()
