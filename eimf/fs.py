"""Local paths and ``s3://`` URIs behind one small API.

:func:`resolve` turns a path into ``(pyarrow.fs.FileSystem, path inside that file system)``: a
``LocalFileSystem`` for local paths, and for ``s3://bucket/key`` an s3fs file system wrapped as
``pyarrow.fs.PyFileSystem(FSSpecHandler(...))`` so that pyarrow, pandas and Ray Data all accept it.

S3 settings come from the usual environment: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (an
S3-compatible endpoint such as MinIO or moto), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``; without keys, botocore's default chain (profiles, instance roles) applies. Keys and
endpoint are given to s3fs explicitly so that the file system object still works after it is pickled into
a Ray worker whose environment lacks them.

Helpers take and return *user-facing* paths (absolute local paths or ``s3://bucket/key``). Run outputs
(exports, checkpoints) move between a local folder and ``s3://`` with :func:`upload_dir`,
:func:`download_dir` and :func:`local_dir`; :func:`ray_storage` gives Ray Train's ``RunConfig`` its
``storage_path`` and, when an S3 endpoint is set, the matching ``storage_filesystem``.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, List, Optional, Tuple
from urllib.parse import urlparse

import pyarrow.fs as pafs
import s3fs
from pyarrow.fs import FSSpecHandler, PyFileSystem

S3_PREFIX = "s3://"
_GLOB_CHARS = set("*?[")


def is_s3(path: str) -> bool:
    return str(path).startswith(S3_PREFIX)


def s3_options() -> dict:
    """Keyword arguments for ``s3fs.S3FileSystem`` from the environment."""
    opts: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        opts["key"], opts["secret"] = key, secret
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["token"] = os.environ["AWS_SESSION_TOKEN"]
    return opts


#: The environment variables :func:`s3_options` reads.
S3_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN")


def s3_env() -> dict:
    """This process's S3 settings, to hand to Ray tasks whose environment may lack them."""
    return {k: os.environ[k] for k in S3_ENV_VARS if k in os.environ}


_S3_CACHE: dict = {}


def s3fs_filesystem():
    """An s3fs file system configured from the environment (one per distinct setting; no listing cache)."""
    opts = s3_options()
    key = tuple(sorted(opts.items())) + (os.getpid(),)
    if key not in _S3_CACHE:
        _S3_CACHE[key] = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **opts)
    return _S3_CACHE[key]


def resolve(path: str | os.PathLike) -> Tuple[pafs.FileSystem, str]:
    """``path`` -> (pyarrow file system, path inside it)."""
    path = str(path)
    if is_s3(path):
        return PyFileSystem(FSSpecHandler(s3fs_filesystem())), path[len(S3_PREFIX):].rstrip("/")
    if "://" in path and not path.startswith("file://"):
        raise ValueError(f"unsupported path scheme: {path!r} (local paths and s3:// are supported)")
    if path.startswith("file://"):
        path = path[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def display(fs: pafs.FileSystem, inner: str) -> str:
    """Inverse of :func:`resolve`: the user-facing form of ``inner``."""
    return inner if isinstance(fs, pafs.LocalFileSystem) else S3_PREFIX + inner.lstrip("/")


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def _hidden(inner: str, root: str) -> bool:
    rel = inner[len(root):].lstrip("/") if inner.startswith(root) else os.path.basename(inner)
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def expand(path: str | os.PathLike) -> List[str]:
    """A file, a folder (all files below it, recursively) or a glob -> sorted list of files.

    Inside folders, names starting with ``.`` or ``_`` (``_SUCCESS``, ``.crc``) are skipped.
    Raises ``FileNotFoundError`` naming ``path`` when nothing matches.
    """
    path = str(path)
    fs, inner = resolve(path)
    if any(c in _GLOB_CHARS for c in inner):
        parts = inner.split("/")
        i = next(i for i, p in enumerate(parts) if any(c in _GLOB_CHARS for c in p))
        root = "/".join(parts[:i]) or "/"
        try:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        except FileNotFoundError:
            infos = []
        out = [f.path for f in infos if f.type == pafs.FileType.File and fnmatch.fnmatchcase(f.path, inner)]
    else:
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.File:
            out = [inner]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
            out = [f.path for f in infos if f.type == pafs.FileType.File and not _hidden(f.path, inner)]
        else:
            out = []
    if not out:
        raise FileNotFoundError(f"no files at {path}")
    return sorted(display(fs, p) for p in out)


def exists(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def file_info(path: str) -> dict:
    """``{"size": bytes, "mtime": seconds or None}`` of one file (plus ``etag`` on S3)."""
    if is_s3(path):
        s3 = s3fs_filesystem()
        try:
            info = s3.info(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no file at {path}") from None
        if info.get("type") != "file":
            raise FileNotFoundError(f"no file at {path}")
        mtime = info.get("LastModified")
        return {"size": int(info["size"]), "mtime": mtime.timestamp() if hasattr(mtime, "timestamp") else mtime,
                "etag": str(info.get("ETag", "")).strip('"') or None}
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no file at {path}")
    mtime = info.mtime.timestamp() if info.mtime is not None else None
    return {"size": int(info.size), "mtime": mtime}


def makedirs(path: str) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    fs, inner = resolve(path)
    parent = inner.rsplit("/", 1)[0]
    if parent and isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(data)


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path).decode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"))


def read_text(path: str, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


def write_text(path: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


# --- folders: run outputs (exports, checkpoints) between a local disk and s3:// ---------------------------


def _local_files(local_dir: str) -> List[str]:
    """Every file below ``local_dir`` (recursive, hidden files included), as paths relative to it."""
    out = []
    for root, _, files in os.walk(local_dir):
        for name in files:
            out.append(os.path.relpath(os.path.join(root, name), local_dir))
    return sorted(out)


def list_files(path: str) -> List[str]:
    """Every file below the folder ``path`` (recursive, hidden files included), relative to it, sorted.

    Unlike :func:`expand` nothing is skipped: a run folder's ``.is_checkpoint`` marker is data. Raises
    ``FileNotFoundError`` naming ``path`` when there is no folder there.
    """
    path = str(path)
    if not is_s3(path):
        local = resolve(path)[1]
        if not os.path.isdir(local):
            raise FileNotFoundError(f"no folder at {path}")
        return _local_files(local)
    s3 = s3fs_filesystem()
    prefix = path[len(S3_PREFIX):].rstrip("/")
    try:
        found = s3.find(prefix)
    except FileNotFoundError:
        found = []
    rel = sorted(f[len(prefix) + 1:] for f in found if f.startswith(prefix + "/"))
    if not rel:
        raise FileNotFoundError(f"no folder (or an empty one) at {path}")
    return rel


def upload_dir(local_dir: str | os.PathLike, url: str) -> str:
    """Copy every file below the local folder ``local_dir`` to ``url`` (a local path or ``s3://``), keeping
    the relative layout; existing files of the same name are overwritten, others are left alone.
    Returns ``url``."""
    local_dir, url = os.fspath(local_dir), str(url)
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"upload_dir: no local folder at {local_dir}")
    files = _local_files(local_dir)
    if not is_s3(url):
        dest = resolve(url)[1]
        if os.path.abspath(local_dir) != dest:
            shutil.copytree(local_dir, dest, dirs_exist_ok=True)
        return url
    s3 = s3fs_filesystem()
    prefix = url[len(S3_PREFIX):].rstrip("/")
    for rel in files:
        s3.put_file(os.path.join(local_dir, rel), f"{prefix}/{rel.replace(os.sep, '/')}")
    return url


def download_dir(url: str, local_dir: str | os.PathLike) -> str:
    """Copy every file below ``url`` (a local path or ``s3://``) into the local folder ``local_dir``
    (created if needed). Returns ``local_dir``. ``FileNotFoundError`` names ``url`` when nothing is there."""
    url, local_dir = str(url), os.fspath(local_dir)
    files = list_files(url)
    os.makedirs(local_dir, exist_ok=True)
    if not is_s3(url):
        shutil.copytree(resolve(url)[1], local_dir, dirs_exist_ok=True)
        return local_dir
    s3 = s3fs_filesystem()
    prefix = url[len(S3_PREFIX):].rstrip("/")
    for rel in files:
        target = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        s3.get_file(f"{prefix}/{rel}", target)
    return local_dir


@contextlib.contextmanager
def local_dir(path: str) -> Iterator[str]:
    """A local folder with the content of ``path``: the folder itself when it is local, else a temporary
    download of the ``s3://`` folder, removed on exit (for readers that need a local ``Path``)."""
    path = str(path)
    if not is_s3(path):
        local = resolve(path)[1]
        if not os.path.isdir(local):
            raise FileNotFoundError(f"no folder at {path}")
        yield local
        return

    with tempfile.TemporaryDirectory(prefix="eimf-s3-") as tmp:
        yield download_dir(path, tmp)


# --- Ray Train storage --------------------------------------------------------------------------------------


def pyarrow_s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's native S3 file system set from the same environment as :func:`s3_options`: endpoint
    (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, its scheme decides http/https), keys when set, and
    region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``. It pickles with these settings, so Ray workers use
    the driver's endpoint and keys."""

    opts = s3_options()
    kwargs: dict = {}
    if opts.get("endpoint_url"):
        u = urlparse(opts["endpoint_url"])
        if not u.netloc:
            raise ValueError(f"AWS_ENDPOINT_URL(_S3) must look like http://host:port, got {opts['endpoint_url']!r}")
        kwargs["endpoint_override"] = u.netloc + u.path.rstrip("/")
        kwargs["scheme"] = u.scheme or "https"
    if "key" in opts:
        kwargs.update(access_key=opts["key"], secret_key=opts["secret"])
        if opts.get("token"):
            kwargs["session_token"] = opts["token"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def ray_storage(path: str) -> Tuple[str, Optional[pafs.FileSystem]]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``.

    A local path -> (absolute path, None). ``s3://bucket/prefix`` with an S3 endpoint set in the environment
    (MinIO, moto) -> ("bucket/prefix", :func:`pyarrow_s3_filesystem`), since Ray would otherwise resolve the
    URI against AWS itself; without an endpoint -> (the URI, None): Ray's pyarrow resolution finds the
    bucket's region and uses the default credential chain (instance roles included).
    """
    path = str(path)
    if not is_s3(path):
        return resolve(path)[1], None
    if not s3_options().get("endpoint_url"):
        return path.rstrip("/"), None
    inner = path[len(S3_PREFIX):].strip("/")
    if not inner:
        raise ValueError(f"storage path {path!r} names no bucket")
    return inner, pyarrow_s3_filesystem()
