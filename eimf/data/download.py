"""``eimf data download NAME``: fetch public datasets from their publishers, verify, extract.

Files land in ``<data_dir>/<name>/`` in the layout the readers expect (the catalogue, :mod:`eimf.data.datasets`,
says what to fetch for each dataset):

* ``ml-100k``  GroupLens ``ml-100k.zip`` extracted (``u.data``, ``u.item``, ``u.genre``, ...); the zip is kept.
* ``ml-1m``    GroupLens ``ml-1m.zip`` extracted (``ratings.dat``, ``movies.dat``, ``users.dat``); the zip is kept.
* ``amazon-beauty`` / ``amazon-sports`` / ``amazon-toys``: the McAuley lab's 2014 5-core review file and the
  category's metadata file, kept gzipped exactly as downloaded.

Checksums: the publishers' own, where they publish any, are data in ``eimf/data/datasets/checksums.json`` (with where
each value comes from): MD5 from GroupLens' sidecar ``ml-*.zip.md5`` files, SHA256 and size from
tensorflow/datasets' ``url_checksums/movielens.txt``. The McAuley lab publishes none for ``reviews_*_5.json.gz`` and
``meta_*.json.gz``: **trust on first use**.

Trust on first use: the SHA256 of the first download is written to ``<data_dir>/<name>/CHECKSUMS``
(``sha256sum`` format, so ``cd <data_dir>/<name> && sha256sum -c CHECKSUMS`` works) and every later
download or re-use of that file is checked against it. Files with published checksums are recorded there
too. To accept a file that really changed upstream, delete its line from ``CHECKSUMS``.

Base URLs can be replaced by a mirror, ``mirror=`` or ``$EIMF_DOWNLOAD_MIRROR``: every file is then fetched
as ``<mirror>/<file name>`` and still checked against the publisher's checksum.

:func:`verify` checks a dataset folder against the ``SHA256SUMS`` / ``CHECKSUMS`` files that exist (the
shared data folder has a ``SHA256SUMS`` at its root with entries like ``./ml-1m/movies.dat``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Tuple

import requests
import urllib3
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential
from tqdm.auto import tqdm

from eimf.data.datasets import DATASETS, TOFU, DownloadSpec, RemoteFile

log = logging.getLogger(__name__)

#: Replaces every publisher base URL: files are fetched as ``<mirror>/<file name>``.
MIRROR_ENV = "EIMF_DOWNLOAD_MIRROR"
#: Where the readers look for raw datasets (same variable as ``data.data_dir``'s fallback).
DATA_DIR_ENV = "EIMF_DATA_DIR"
#: Per-dataset record of the SHA256 of every downloaded file (``sha256sum`` format).
CHECKSUMS_FILE = "CHECKSUMS"
#: Checksum lists :func:`verify` reads (``sha256sum`` format).
SUMS_FILES = ("SHA256SUMS", CHECKSUMS_FILE)

_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------- registry
def get_spec(name: str) -> DownloadSpec:
    """What to fetch for ``name``, from the dataset catalogue (:data:`eimf.data.datasets.DATASETS`)."""
    spec = DATASETS.get(name)
    if spec is None or spec.download is None:
        known = ", ".join(sorted(n for n, s in DATASETS.items() if s.download is not None))
        raise ValueError(f"unknown dataset {name!r}; downloadable: {known}")
    return spec.download


# --------------------------------------------------------------------------------------------- errors
class DownloadError(RuntimeError):
    """A file could not be fetched (no network, HTTP error, unwritable folder)."""


class ChecksumError(DownloadError):
    """A file's size or hash differs from the published (or first-recorded) one."""

    def __init__(self, url: str, algorithm: str, expected: str, actual: str, source: str, path: Path):
        self.url, self.algorithm, self.expected, self.actual, self.source = url, algorithm, expected, actual, source
        super().__init__(
            f"checksum mismatch for {url}: expected {algorithm} {expected} ({source}), got {actual}. "
            f"The file was deleted ({path}). Retry later, or check the mirror/proxy in between."
        )


class VerifyError(RuntimeError):
    """:func:`verify` found files that are missing or differ from their listed SHA256."""


class _Transient(Exception):
    """Retryable: 5xx/429 or a truncated body."""


# --------------------------------------------------------------------------------------------- hashing
def _file_hashes(path: Path) -> Dict[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            sha.update(chunk)
            md5.update(chunk)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def sha256_file(path: str | Path) -> str:
    return _file_hashes(Path(path))["sha256"]


_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def read_sums(path: str | Path) -> Dict[str, str]:
    """Parse a ``sha256sum`` file: ``{relative posix path (no leading ./): sha256}``; other lines ignored."""
    out: Dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = _SUM_LINE.match(line.strip("\r"))
        if m:
            out[_norm(m.group(2))] = m.group(1).lower()
    return out


def _norm(p: str) -> str:
    parts = [x for x in PurePosixPath(p.replace("\\", "/")).parts if x not in (".", "")]
    return "/".join(parts)


def _write_sums(path: Path, sums: Dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{h}  {name}\n" for name, h in sorted(sums.items())), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- download
def _resolve_data_dir(data_dir: Optional[str | Path]) -> Path:
    d = data_dir if data_dir else os.environ.get(DATA_DIR_ENV)
    if not d:
        raise DownloadError(
            f"no data folder: pass one (data.data_dir=/path/to/datasets, or --data-dir) or set {DATA_DIR_ENV}."
        )
    return Path(d).expanduser()


def _manual_help(spec: DownloadSpec, target: Path, root: Path, mirror: Optional[str]) -> str:
    urls = "\n".join(f"    {f.url()}" for f in spec.files)  # the publishers' URLs, not the mirror's
    what = []
    for f in spec.files:
        what.append(
            f"the contents of {f.filename} (unzipped, without its top folder)" if f.extract
            else f"{f.filename} (as downloaded, still gzipped)"
        )
    return (
        f"No network, or the publisher is unreachable? Fetch these on a machine with internet:\n{urls}\n"
        f"  then copy {' and '.join(what)} into {target}/\n"
        f"  (needed there: {', '.join(' or '.join(a) for a in spec.required)}),\n"
        f"  and run with data.data_dir={root} or export {DATA_DIR_ENV}={root}.\n"
        f"  A reachable mirror also works: {MIRROR_ENV}=https://host/path (files fetched as <mirror>/<file name>)."
    )


def _expected(f: RemoteFile, recorded: Optional[str]) -> List[Tuple[str, str, str]]:
    """(algorithm, expected hex, source) to check, strongest first."""
    checks = []
    if f.sha256:
        checks.append(("sha256", f.sha256.lower(), f.checksum_source))
    if f.md5:
        checks.append(("md5", f.md5.lower(), f.checksum_source))
    if recorded and not f.sha256:
        checks.append(("sha256", recorded, f"recorded on first download in {CHECKSUMS_FILE}; delete that line "
                                           f"to accept a changed upstream file"))
    return checks


def _check(f: RemoteFile, path: Path, url: str, hashes: Dict[str, str], recorded: Optional[str]) -> None:
    """Raise ChecksumError (after deleting ``path``) if any known checksum differs."""
    if f.size is not None:
        actual_size = path.stat().st_size
        if actual_size != f.size:
            path.unlink(missing_ok=True)
            raise ChecksumError(url, "size", f"{f.size} bytes", f"{actual_size} bytes", f.checksum_source, path)
    for algo, expected, source in _expected(f, recorded):
        if hashes[algo] != expected:
            path.unlink(missing_ok=True)
            raise ChecksumError(url, algo, expected, hashes[algo], source, path)


def _fetch(session: requests.Session, url: str, dest_dir: Path, filename: str, timeout: float,
           progress: bool) -> Tuple[Path, Dict[str, str]]:
    """Stream ``url`` to a temp file in ``dest_dir``; return (temp path, hashes). Raises on any failure."""
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        sha, md5, n = hashlib.sha256(), hashlib.md5(), 0
        with os.fdopen(fd, "wb") as out, session.get(
            url, stream=True, timeout=(min(timeout, 15.0), timeout), headers={"Accept-Encoding": "identity"}
        ) as r:
            if r.status_code >= 500 or r.status_code == 429:
                raise _Transient(f"HTTP {r.status_code} from {url}")
            r.raise_for_status()
            total = int(r.headers["Content-Length"]) if r.headers.get("Content-Length", "").isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=filename,
                      disable=not progress, leave=False) as bar:
                # raw.stream(decode_content=False): keep the bytes exactly as served, even when a server
                # labels a .gz file with Content-Encoding: gzip (requests would otherwise un-gzip it).
                try:
                    for chunk in r.raw.stream(_CHUNK, decode_content=False):
                        out.write(chunk)
                        sha.update(chunk)
                        md5.update(chunk)
                        n += len(chunk)
                        bar.update(len(chunk))
                except urllib3.exceptions.HTTPError as e:  # raw stream: not wrapped by requests
                    raise _Transient(f"connection broken while reading {url}: {e}") from e
            if total is not None and n != total:
                raise _Transient(f"truncated download from {url}: {n} of {total} bytes")
        return tmp, {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _reason(exc: BaseException) -> str:
    """The useful part of a requests error (the urllib3 cause, not the whole retry chain)."""
    inner = exc.args[0] if isinstance(exc, requests.ConnectionError) and exc.args else None
    if isinstance(inner, urllib3.exceptions.MaxRetryError) and inner.reason is not None:
        return f"{type(inner.reason).__name__}: {inner.reason}"
    return str(exc)


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (_Transient, requests.ConnectionError, requests.Timeout,
                            requests.exceptions.ChunkedEncodingError))


def _fetch_with_retries(session, url, dest_dir, filename, timeout, progress, retries, backoff):
    def _log_retry(state) -> None:
        log.warning("download of %s failed (%s); retry %d/%d in %.1fs", url, state.outcome.exception(),
                    state.attempt_number, max(retries, 1) - 1, state.next_action.sleep if state.next_action else 0)

    for attempt in Retrying(stop=stop_after_attempt(max(retries, 1)),
                            wait=wait_exponential(multiplier=backoff, max=60),
                            retry=retry_if_exception(_is_transient), reraise=True, before_sleep=_log_retry):
        with attempt:
            return _fetch(session, url, dest_dir, filename, timeout, progress)
    raise AssertionError("unreachable")  # pragma: no cover


def _safe_members(zf: zipfile.ZipFile) -> List[Tuple[zipfile.ZipInfo, str]]:
    """Members to extract with their path inside the dataset folder (single top folder stripped)."""
    infos = [i for i in zf.infolist() if not i.is_dir()
             and not _norm(i.filename).startswith("__MACOSX/")]
    names = [_norm(i.filename) for i in infos]
    for raw, n in zip(infos, names):
        if raw.filename.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw.filename) or ".." in n.split("/"):
            raise DownloadError(f"refusing to extract {raw.filename!r}: path leaves the dataset folder")
    tops = {n.split("/", 1)[0] for n in names}
    strip = len(tops) == 1 and all("/" in n for n in names)
    return [(i, n.split("/", 1)[1] if strip else n) for i, n in zip(infos, names)]


def _extract(archive: Path, target: Path) -> List[str]:
    """Extract into a temp folder beside ``target``, then move each file into place (os.replace)."""
    staging = Path(tempfile.mkdtemp(dir=target, prefix=".extract-"))
    try:
        with zipfile.ZipFile(archive) as zf:
            members = _safe_members(zf)
            for info, rel in members:
                out = staging / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
        for _, rel in members:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, target / rel)
        return [rel for _, rel in members]
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive} is not a valid zip ({e})") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download(
    name: str,
    data_dir: Optional[str | Path] = None,
    force: bool = False,
    *,
    mirror: Optional[str] = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Fetch dataset ``name`` into ``<data_dir>/<name>/``, verified, and return that folder.

    ``data_dir`` defaults to ``$EIMF_DATA_DIR``. Nothing is fetched when the folder already holds the files
    the readers need, unless ``force``. A downloaded file already present is re-used if it still matches
    its checksum. ``mirror`` (default ``$EIMF_DOWNLOAD_MIRROR``) replaces the publishers' base URLs.
    ``retries`` attempts per file with exponential backoff (``backoff`` seconds x 2^n) on connection
    errors, timeouts, HTTP 5xx/429 and truncated bodies.

    Raises :class:`ChecksumError` (file deleted) on a mismatch and :class:`DownloadError` when a file
    cannot be fetched; its message says how to install the files by hand.
    """
    spec = get_spec(name)
    root = _resolve_data_dir(data_dir)
    target = root / spec.name
    mirror = mirror or os.environ.get(MIRROR_ENV) or None

    if not force and spec.is_complete(target):
        log.info("%s already in %s (use force=True / --force to download again)", name, target)
        return target
    created = not target.exists()
    try:
        return _download_into(spec, root, target, force, mirror, retries, backoff, timeout, progress)
    except BaseException:
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # leave no empty folder behind a failed first download
        raise


def _download_into(spec: DownloadSpec, root: Path, target: Path, force: bool, mirror: Optional[str],
                   retries: int, backoff: float, timeout: float, progress: bool) -> Path:
    name = spec.name
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=target, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise DownloadError(
            f"cannot write to {target} ({e}). Choose a writable folder: data.data_dir=/path "
            f"(or --data-dir / {DATA_DIR_ENV})."
        ) from e

    sums_path = target / CHECKSUMS_FILE
    recorded = read_sums(sums_path) if sums_path.is_file() else {}
    session = requests.Session()
    session.headers["User-Agent"] = "eimf-dataset-download (+https://github.com/eimf)"
    try:
        for f in spec.files:
            dest = target / f.filename
            url = f.url(mirror)
            rec = recorded.get(f.filename)
            hashes = None
            if dest.is_file() and not force:
                hashes = _file_hashes(dest)
                try:
                    _check(f, dest, url, hashes, rec)
                    log.info("re-using %s (checksum ok)", dest)
                except ChecksumError as e:
                    log.warning("existing %s does not match (%s); downloading again", dest, e.actual)
                    hashes = None
            if hashes is None:
                log.info("downloading %s -> %s", url, dest)
                try:
                    tmp, hashes = _fetch_with_retries(session, url, target, f.filename, timeout, progress,
                                                      retries, backoff)
                except (_Transient, requests.RequestException) as e:
                    tries = f" after {max(retries, 1)} attempts" if _is_transient(e) else ""
                    raise DownloadError(
                        f"could not download {url}{tries}: {_reason(e)}\n"
                        + _manual_help(spec, target, root, mirror)
                    ) from e
                _check(f, tmp, url, hashes, rec)  # deletes tmp on mismatch
                os.replace(tmp, dest)
            if f.published:
                log.info("%s: checksum verified (%s)", f.filename, f.checksum_source)
            elif rec:
                log.info("%s: matches the SHA256 recorded on first download in %s", f.filename, sums_path)
            else:
                log.warning(
                    "%s: %s from the publisher; trusting this copy (first use) and recording its SHA256 %s "
                    "in %s; later downloads are checked against it", f.filename, TOFU, hashes["sha256"],
                    sums_path,
                )
            recorded[f.filename] = hashes["sha256"]
            _write_sums(sums_path, recorded)
            if f.extract:
                files = _extract(dest, target)
                log.info("extracted %d files from %s into %s", len(files), f.filename, target)
    finally:
        session.close()

    if not spec.is_complete(target):
        raise DownloadError(
            f"{name}: downloaded, but {target} still lacks {', '.join(spec.missing(target))}; "
            f"the publisher's file layout may have changed."
        )
    log.info("%s ready in %s. %s", name, target, spec.terms)
    return target


# --------------------------------------------------------------------------------------------- verify
@dataclass
class VerifyResult:
    """Outcome of :func:`verify`. ``status``: ``ok``, ``failed`` or ``unchecked`` (no checksum list found)."""

    name: Optional[str]
    folder: Path
    sums_files: List[Path] = field(default_factory=list)
    ok_files: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, str, str]] = field(default_factory=list)  # (path, expected, actual)
    missing: List[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.mismatched or self.missing:
            return "failed"
        return "ok" if self.ok_files else "unchecked"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def summary(self) -> str:
        what = self.name or "all datasets"
        if self.status == "unchecked":
            return f"{what}: no SHA256SUMS/CHECKSUMS entries found for {self.folder}; nothing verified"
        lines = [f"{what}: {self.status}: {len(self.ok_files)} file(s) ok, {len(self.mismatched)} mismatched, "
                 f"{len(self.missing)} missing (checked against {', '.join(map(str, self.sums_files))})"]
        lines += [f"  MISMATCH {p}: expected {e}, got {a}" for p, e, a in self.mismatched]
        lines += [f"  MISSING  {p}" for p in self.missing]
        return "\n".join(lines)

    def raise_if_failed(self) -> "VerifyResult":
        if self.status == "failed":
            raise VerifyError(self.summary())
        return self


def verify(name: Optional[str], data_dir: Optional[str | Path] = None) -> VerifyResult:
    """Check ``<data_dir>/<name>/`` against every checksum list that exists.

    Read: ``<data_dir>/SHA256SUMS`` (entries under ``./<name>/``), ``<data_dir>/<name>/SHA256SUMS`` and
    ``<data_dir>/<name>/CHECKSUMS`` (relative to the dataset folder). ``name=None`` checks every entry of
    the root ``SHA256SUMS``. Entries whose file is absent count as missing; files not listed are ignored.
    """
    root = _resolve_data_dir(data_dir)
    folder = root / name if name else root
    result = VerifyResult(name=name, folder=folder)
    expected: Dict[str, str] = {}  # path relative to root -> sha256

    def _add(sums_path: Path, prefix: str, only_under: Optional[str]) -> None:
        entries = read_sums(sums_path)
        used = False
        for rel, h in entries.items():
            full = _norm(f"{prefix}/{rel}") if prefix else rel
            if only_under and not full.startswith(only_under + "/"):
                continue
            if ".." in full.split("/"):
                continue
            if full in expected and expected[full] != h:
                log.warning("%s lists %s with a different hash than another checksum list", sums_path, full)
            expected.setdefault(full, h)
            used = True
        if used:
            result.sums_files.append(sums_path)

    if (root / "SHA256SUMS").is_file():
        _add(root / "SHA256SUMS", "", name)
    if name:
        for fname in SUMS_FILES:
            if (folder / fname).is_file():
                _add(folder / fname, name, None)

    for rel, h in sorted(expected.items()):
        p = root / rel
        shown = rel[len(name) + 1:] if name and rel.startswith(name + "/") else rel
        if not p.is_file():
            result.missing.append(shown)
            continue
        actual = sha256_file(p)
        if actual == h:
            result.ok_files.append(shown)
        else:
            result.mismatched.append((shown, h, actual))
    return result


__all__ = [
    "DownloadError", "ChecksumError", "VerifyError", "VerifyResult",
    "download", "verify", "get_spec", "read_sums", "sha256_file",
    "MIRROR_ENV", "DATA_DIR_ENV", "CHECKSUMS_FILE",
]
