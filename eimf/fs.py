"""Local paths and ``s3://`` URIs behind one small API.

:func:`resolve` turns a path into ``(pyarrow.fs.FileSystem, path inside that file system)``: a
``LocalFileSystem`` for local paths, and for ``s3://bucket/key`` an s3fs file system wrapped as
``pyarrow.fs.PyFileSystem(FSSpecHandler(...))`` so that pyarrow, pandas and Ray Data all accept it.

S3 settings come from the usual environment: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (an
S3-compatible endpoint such as MinIO or moto), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``; without keys, botocore's default chain (profiles, instance roles) applies. Keys and
endpoint are given to s3fs explicitly so that the file system object still works after it is pickled into
a Ray worker whose environment lacks them.

Helpers take and return *user-facing* paths (absolute local paths or ``s3://bucket/key``).
"""
from __future__ import annotations

import fnmatch
import json
import os
from typing import Any, List, Tuple

import pyarrow.fs as pafs

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


_S3_CACHE: dict = {}


def s3fs_filesystem():
    """An s3fs file system configured from the environment (one per distinct setting; no listing cache)."""
    import s3fs

    opts = s3_options()
    key = tuple(sorted(opts.items())) + (os.getpid(),)
    if key not in _S3_CACHE:
        _S3_CACHE[key] = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **opts)
    return _S3_CACHE[key]


def resolve(path: str | os.PathLike) -> Tuple[pafs.FileSystem, str]:
    """``path`` -> (pyarrow file system, path inside it)."""
    path = str(path)
    if is_s3(path):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

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
