"""Annotation cache: a rerun, or a run resumed after a kill, never sends the same prompt twice.

Key: ``sha256(history_hash, prompt_version, model)`` where ``history_hash`` is what the prompt shows
(:func:`eimf.semantic.prompts.history_hash`) and ``model`` the annotator's :attr:`model_id`. Two users with
the same listed items share one entry.

Store: a folder (local or ``s3://``) of Parquet part files ``part-<ns>-<rand>.parquet``, one per finished
batch (:meth:`AnnotationCache.put`). A part file is complete or absent: locally it is written under a
``_tmp-`` name and renamed; on S3 a PUT is atomic. Readers ignore names that start with ``_`` or ``.``, so a
run killed mid-write leaves nothing half-read, and everything finished before the kill is kept.

Failed results are cached too (status ``failed``, with the raw text): by default a failure is final and is
not sent again; ``retry_failed=True`` treats it as a miss. When a key has several records, an ``ok`` one
wins over a ``failed`` one, then the newest.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from eimf import fs as efs
from eimf.formats.annotations import STATUS_OK
from eimf.semantic.annotators.base import AnnotationRequest, AnnotationResult

log = logging.getLogger(__name__)

PART_PREFIX = "part-"

SCHEMA = pa.schema([
    ("key", pa.string()), ("user", pa.int64()), ("history_hash", pa.string()), ("prompt_version", pa.string()),
    ("model", pa.string()), ("status", pa.string()), ("interests", pa.string()), ("raw_text", pa.string()),
    ("attempts", pa.int64()), ("tokens_in", pa.int64()), ("tokens_out", pa.int64()), ("error", pa.string()),
    ("latency_s", pa.float64()), ("created_at", pa.float64()),
])


def cache_key(history_hash: str, prompt_version: str, model: str) -> str:
    return hashlib.sha256("\x1f".join([history_hash, prompt_version, model]).encode("utf-8")).hexdigest()


class AnnotationCache:
    """Cached :class:`AnnotationResult` s of one annotator model under ``root`` (see module doc)."""

    def __init__(self, root: str, model: str):
        self.root = str(root)
        self.model = model
        self._fs, self._inner = efs.resolve(self.root)
        self._local = isinstance(self._fs, pafs.LocalFileSystem)
        self._index: Optional[Dict[str, dict]] = None
        self.parts_written = 0

    # ------------------------------------------------------------------------------------------ keys
    def key(self, req: AnnotationRequest) -> str:
        return cache_key(req.history_hash, req.prompt_version, self.model)

    def key_of_result(self, res: AnnotationResult) -> str:
        return cache_key(res.history_hash, res.prompt_version, self.model)

    # ---------------------------------------------------------------------------------------- reading
    def _part_files(self) -> List[str]:
        try:
            infos = self._fs.get_file_info(pafs.FileSelector(self._inner, allow_not_found=True, recursive=False))
        except FileNotFoundError:
            return []
        return sorted(i.path for i in infos if i.type == pafs.FileType.File
                      and os.path.basename(i.path).startswith(PART_PREFIX) and i.path.endswith(".parquet"))

    @staticmethod
    def _better(new: dict, old: Optional[dict]) -> bool:
        if old is None:
            return True
        new_ok, old_ok = new["status"] == STATUS_OK, old["status"] == STATUS_OK
        if new_ok != old_ok:
            return new_ok
        return (new["created_at"] or 0) >= (old["created_at"] or 0)

    def load(self) -> Dict[str, dict]:
        """Read every part file (once; later ``put`` s update the in-memory index)."""
        if self._index is None:
            index: Dict[str, dict] = {}
            for path in self._part_files():
                try:
                    with self._fs.open_input_file(path) as f:
                        table = pq.read_table(f)
                except Exception as e:  # a foreign or damaged file must not stop a run
                    log.warning("annotation cache: skipping unreadable part %s (%s)", path, e)
                    continue
                for rec in table.to_pylist():
                    if rec.get("model") != self.model:
                        continue
                    if self._better(rec, index.get(rec["key"])):
                        index[rec["key"]] = rec
            self._index = index
        return self._index

    def __len__(self) -> int:
        return len(self.load())

    def get(self, req: AnnotationRequest) -> Optional[AnnotationResult]:
        rec = self.load().get(self.key(req))
        if rec is None:
            return None
        return AnnotationResult(
            user=int(req.user), interests=json.loads(rec["interests"]) if rec["interests"] else None,
            raw_text=rec["raw_text"], status=rec["status"], attempts=int(rec["attempts"] or 0),
            tokens_in=int(rec["tokens_in"] or 0), tokens_out=int(rec["tokens_out"] or 0), error=rec["error"],
            history_hash=rec["history_hash"], model=rec["model"], prompt_version=rec["prompt_version"],
            latency_s=float(rec["latency_s"] or 0.0), cached=True)

    def split_cached(self, requests: Sequence[AnnotationRequest], retry_failed: bool = False
                     ) -> Tuple[List[AnnotationResult], List[AnnotationRequest]]:
        """-> (cached results for the hits, requests to send). Failed entries are hits unless ``retry_failed``."""
        hits, misses = [], []
        for req in requests:
            res = self.get(req)
            if res is not None and (res.ok or not retry_failed):
                hits.append(res)
            else:
                misses.append(req)
        return hits, misses

    # ---------------------------------------------------------------------------------------- writing
    def put(self, results: Sequence[AnnotationResult]) -> Optional[str]:
        """Append one batch as its own part file (atomic); returns its path (None for an empty batch)."""
        results = list(results)
        if not results:
            return None
        now = time.time()
        rows = []
        for r in results:
            if r.model and r.model != self.model:
                raise ValueError(f"result of model {r.model!r} put into the cache of {self.model!r}")
            rows.append({
                "key": self.key_of_result(r), "user": int(r.user), "history_hash": r.history_hash,
                "prompt_version": r.prompt_version, "model": self.model, "status": r.status,
                "interests": json.dumps(r.interests, ensure_ascii=False) if r.interests is not None else None,
                "raw_text": r.raw_text, "attempts": int(r.attempts), "tokens_in": int(r.tokens_in),
                "tokens_out": int(r.tokens_out), "error": r.error, "latency_s": float(r.latency_s),
                "created_at": now})
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        name = f"{PART_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        final = f"{self._inner}/{name}"
        if self._local:
            self._fs.create_dir(self._inner, recursive=True)
            tmp = f"{self._inner}/_tmp-{name}"
            with open(tmp, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        else:
            with self._fs.open_output_stream(final) as f:
                f.write(buf.getvalue())
        self.parts_written += 1
        index = self.load()
        for rec in rows:
            if self._better(rec, index.get(rec["key"])):
                index[rec["key"]] = rec
        return efs.display(self._fs, final)

    def results_for(self, requests: Sequence[AnnotationRequest]) -> List[Optional[AnnotationResult]]:
        return [self.get(r) for r in requests]


def with_user(res: AnnotationResult, user: int) -> AnnotationResult:
    """The same result attributed to another user with the same listed items."""
    return replace(res, user=int(user))
