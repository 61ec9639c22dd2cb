"""ESIM orchestration: selected users -> prompts -> cache / annotator -> semantic vectors -> Parquet.

No engine specifics here: any :class:`~eimf.semantic.annotators.base.Annotator` plugs in.

:func:`annotate_users` writes, under ``out_dir`` (local or ``s3://``):

* ``annotations.parquet``: one row per interest of an annotated user: ``user`` int64, ``interest_idx`` int64
  (0..M-1), ``name``, ``description`` strings, ``evidence`` list<int64> (prompt item numbers, 1-based),
  ``evidence_items`` list<int64> (the same as item ids), ``vector`` list<float32> (unit, encoder dim),
  ``status`` (``ok``). A user whose annotation failed keeps **one** row with ``interest_idx = -1``,
  ``status = failed``, null name/description/vector, and ``error`` / ``raw_text`` set: failures are recorded,
  never dropped. Also ``cached`` (bool), ``history_hash``, ``model``, ``prompt_version``.
  Training reads the ``status == "ok"`` rows.
* ``prompts.jsonl``: what each user's prompt was (user, history_hash, prompt_version, item_ids, messages),
  one JSON object per line, whether it was sent or answered from the cache.
* ``stats.json``: users, prompts sent, cache hits, failures, attempts, tokens in/out, wall time,
  tokens/s, prompts/s, share of valid answers, and what produced them (model, prompt version, encoder, K).

Batches of ``chunk_size`` prompts go to the annotator; each finished batch is written to the cache as its
own part file before the next starts, so a killed run keeps what finished and a restart sends only the rest.
Users whose listed items are identical share one prompt.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from eimf import fs as efs
from eimf.config import eimf_home
from eimf.formats.annotations import (
    ANNOTATIONS_FILE,
    PROMPTS_FILE,
    SELECTION_FILE,
    STATS_FILE,
    STATUS_FAILED,
    STATUS_OK,
    annotations_table,
    write_parquet,
)
from eimf.progress import progress
from eimf.semantic.annotators import build_annotator
from eimf.semantic.annotators.base import AnnotationRequest, AnnotationResult, Annotator
from eimf.semantic.cache import AnnotationCache, with_user
from eimf.semantic.encoder import SemanticEncoder, interest_text
from eimf.semantic.prompts import PROMPT_VERSION, Prompt, build_prompt
from eimf.semantic.typical import select_random_users, select_users, user_representations

log = logging.getLogger(__name__)

def item_text_table(items: pd.DataFrame) -> np.ndarray:
    """``items`` (``item`` 1..N, ``text``) -> object array indexed by item id (row 0 = padding, empty)."""
    ids = np.asarray(items["item"], dtype=np.int64)
    table = np.full(int(ids.max(initial=0)) + 1, "", dtype=object)
    table[ids] = np.asarray(items["text"].fillna("").astype(str), dtype=object)
    return table


def _user_ids(selected: Union[pd.DataFrame, Sequence[int]]) -> List[int]:
    if isinstance(selected, pd.DataFrame):
        selected = selected["user"]
    return [int(u) for u in selected]


def build_requests(prepared, users: Sequence[int], max_interests: int, token_budget: int,
                   tokenizer_or_counter=None, max_item_chars: int = 160,
                   cut: Optional[Callable[[Sequence[int]], int]] = None) -> Tuple[List[AnnotationRequest], List[Prompt]]:
    """Prompts for ``users`` from the **training** sequences of ``prepared.train`` only.

    ``cut(seq) -> int`` chooses how much of a training sequence the prompt may see (default: all of it; the
    training sequence holds no valid/test target under either split).
    """
    train = prepared.train
    seqs = dict(zip(np.asarray(train["user"], dtype=np.int64).tolist(), train["items"]))
    texts = item_text_table(prepared.items)
    requests, prompts = [], []
    for u in users:
        if u not in seqs:
            raise KeyError(f"user {u} is not a training user")
        seq = np.asarray(seqs[u], dtype=np.int64)
        c = len(seq) if cut is None else int(cut(seq))
        p = build_prompt(seq, c, texts, max_interests, token_budget, tokenizer_or_counter, max_item_chars)
        prompts.append(p)
        requests.append(AnnotationRequest(user=int(u), messages=p.messages, history_hash=p.history_hash,
                                          n_items=p.n_items, max_interests=p.max_interests,
                                          item_texts=p.item_texts, item_ids=p.item_ids,
                                          window_start=c - p.n_items, window_end=c))
    return requests, prompts


def _encode(encoder: Any, texts: List[str]) -> np.ndarray:
    fn = getattr(encoder, "encode", None) or encoder
    v = np.asarray(fn(texts), dtype=np.float32)
    if v.ndim != 2 or len(v) != len(texts):
        raise ValueError(f"encoder returned shape {v.shape} for {len(texts)} texts")
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def annotations_frame(requests: Sequence[AnnotationRequest], results: Sequence[AnnotationResult],
                      encoder: Any) -> pd.DataFrame:
    """Rows per interest (see module doc); vectors from ``encoder`` (``.encode(texts)`` or a callable)."""
    rows, texts = [], []
    for req, res in zip(requests, results):
        common = dict(user=int(req.user), cached=bool(res.cached), history_hash=req.history_hash,
                      model=res.model, prompt_version=res.prompt_version, window_start=req.window_start,
                      window_end=req.window_end)
        if res.ok and res.interests:
            for k, it in enumerate(res.interests):
                ids = req.item_ids or []
                ev = [int(n) for n in it["evidence"]]
                rows.append(dict(common, interest_idx=k, name=it["name"], description=it["description"],
                                 evidence=ev, evidence_items=[int(ids[n - 1]) for n in ev if 0 < n <= len(ids)],
                                 status=STATUS_OK, error=None, raw_text=None))
                texts.append(interest_text(it["name"], it["description"]))
        else:
            rows.append(dict(common, interest_idx=-1, name=None, description=None, evidence=[], evidence_items=[],
                             status=STATUS_FAILED, error=res.error or "no interests", raw_text=res.raw_text))
    vecs = _encode(encoder, texts) if texts else np.zeros((0, 0), dtype=np.float32)
    it = iter(vecs)
    for r in rows:
        r["vector"] = next(it) if r["status"] == STATUS_OK else None
    cols = ["user", "interest_idx", "name", "description", "evidence", "evidence_items", "vector", "status",
            "error", "raw_text", "cached", "history_hash", "model", "prompt_version", "window_start", "window_end"]
    return pd.DataFrame(rows, columns=cols)


def annotate_users(prepared, selected_users: Union[pd.DataFrame, Sequence[int]], annotator: Annotator,
                   cache: Optional[AnnotationCache], encoder: Any, K: int, token_budget: int, *,
                   out_dir: Optional[str] = None, chunk_size: int = 64, retry_failed: bool = False,
                   tokenizer_or_counter=None, max_item_chars: int = 160,
                   cut: Optional[Callable[[Sequence[int]], int]] = None,
                   on_chunk: Optional[Callable[[int, int], None]] = None,
                   extra_stats: Optional[dict] = None) -> Tuple[pd.DataFrame, dict]:
    """Annotate ``selected_users`` (ids or the selection DataFrame) -> ``(annotations, stats)``; see module doc.

    ``cache`` may be None (nothing is reused or stored). ``on_chunk(done, total)`` is called after each batch.
    ``extra_stats`` join the stats before ``stats.json`` is written (once, last: its presence marks a whole set).
    """
    t_start = time.perf_counter()
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    model_id = annotator.model_id
    if cache is not None and cache.model != model_id:
        raise ValueError(f"cache is for model {cache.model!r}, annotator is {model_id!r}")
    users = _user_ids(selected_users)
    if len(set(users)) != len(users):
        raise ValueError("selected users contain duplicates")
    requests, prompts = build_requests(prepared, users, K, token_budget, tokenizer_or_counter, max_item_chars, cut)
    t_prompts = time.perf_counter() - t_start

    results: Dict[int, AnnotationResult] = {}
    if cache is not None:
        hits, misses = cache.split_cached(requests, retry_failed=retry_failed)
        for r in hits:
            results[r.user] = r
    else:
        hits, misses = [], list(requests)
    # one prompt per distinct listed history
    key_of = (cache.key if cache is not None else (lambda r: r.history_hash))
    unique: Dict[str, AnnotationRequest] = {}
    followers: Dict[str, List[AnnotationRequest]] = {}
    for req in misses:
        k = key_of(req)
        if k in unique:
            followers.setdefault(k, []).append(req)
        else:
            unique[k] = req
    to_send = list(unique.values())

    t0 = time.perf_counter()
    new_results: List[AnnotationResult] = []

    # One stream over every prompt the cache lacks (one engine start for vLLM); each batch of ``chunk_size``
    # answers is stored as it arrives, so a kill loses at most the answers not yet flushed.
    bar = progress(len(to_send), "annotate", "prompt", enabled=bool(to_send))
    try:
        for out in annotator.annotate_stream(to_send, chunk_size):
            if cache is not None:
                cache.put(out)
            new_results.extend(out)
            bar.update(len(out))
            if on_chunk is not None:
                on_chunk(len(new_results), len(to_send))
    finally:
        bar.close()
    annotate_s = time.perf_counter() - t0
    by_user = {r.user: r for r in new_results}
    if len(by_user) != len(to_send) or any(int(req.user) not in by_user for req in to_send):
        raise RuntimeError(f"annotator returned {len(new_results)} results for {len(to_send)} requests")
    for req in to_send:
        res = by_user[int(req.user)]
        results[req.user] = res
        for f in followers.get(key_of(req), []):
            results[f.user] = with_user(res, f.user)

    ordered = [results[r.user] for r in requests]
    t1 = time.perf_counter()
    df = annotations_frame(requests, ordered, encoder)
    encode_s = time.perf_counter() - t1

    tokens_in = sum(r.tokens_in for r in new_results)
    tokens_out = sum(r.tokens_out for r in new_results)
    failures = sum(not r.ok for r in ordered)
    n_valid_new = sum(r.ok for r in new_results)
    wall = time.perf_counter() - t_start
    stats = {
        "users": len(requests),
        "prompts": len(to_send),
        "cache_hits": len(hits),
        "shared_prompts": sum(len(v) for v in followers.values()),
        "failures": failures,
        "failures_new": len(new_results) - n_valid_new,
        "valid_share": (len(requests) - failures) / len(requests) if requests else None,
        "attempts": sum(r.attempts for r in new_results),
        "interests": int((df["status"] == STATUS_OK).sum()),
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "prompt_tokens_est_mean": float(np.mean([p.tokens for p in prompts])) if prompts else None,
        "items_per_prompt_mean": float(np.mean([p.n_items for p in prompts])) if prompts else None,
        "items_dropped_by_budget": int(sum(p.dropped for p in prompts)),
        "wall_s": wall,
        "prompt_build_s": t_prompts,
        "annotate_s": annotate_s,
        "encode_s": encode_s,
        "tokens_per_s": tokens_out / annotate_s if annotate_s > 0 and tokens_out else 0.0,
        "total_tokens_per_s": (tokens_in + tokens_out) / annotate_s if annotate_s > 0 and tokens_out else 0.0,
        "prompts_per_s": len(to_send) / annotate_s if annotate_s > 0 and to_send else 0.0,
        "annotator": annotator.kind,
        "model": model_id,
        "prompt_version": PROMPT_VERSION,
        "encoder": getattr(encoder, "name", type(encoder).__name__),
        "max_interests": int(K),
        "token_budget": int(token_budget),
        **({"engine_hosts": annotator.engine_hosts} if getattr(annotator, "engine_hosts", None) else {}),
        **(extra_stats or {}),
    }
    log.info("annotated %d users: %d prompts sent, %d cache hits, %d failed, %.1f tokens/s", stats["users"],
             stats["prompts"], stats["cache_hits"], failures, stats["tokens_per_s"])
    if out_dir is not None:
        efs.makedirs(out_dir)
        write_parquet(annotations_table(df), efs.join(out_dir, ANNOTATIONS_FILE))
        efs.write_text(efs.join(out_dir, PROMPTS_FILE), "".join(
            json.dumps({"user": int(r.user), "history_hash": r.history_hash, "prompt_version": r.prompt_version,
                        "item_ids": [int(i) for i in (r.item_ids or [])], "messages": r.messages},
                       ensure_ascii=False) + "\n" for r in requests))
        efs.write_json(efs.join(out_dir, STATS_FILE), stats)
    return df, stats


def annotate_from_config(cfg, prepared, model, out_dir: str, annotator: Optional[Annotator] = None,
                         encoder: Any = None, cache: Optional[AnnotationCache] = None) -> Tuple[pd.DataFrame, dict]:
    """Selection + annotation from a :class:`eimf.config.Config` and a warm-up model.

    Writes ``selection.parquet`` (user, cluster, distance, history_len, rank_in_cluster) beside the
    annotations. ``annotator``/``encoder``/``cache`` default to the ones ``cfg.semantic`` names.
    ``model=None`` (no warm-up model): the budget is drawn at random (``semantic.selection=random``), logged.
    """
    sem = cfg.semantic
    k = sem.max_interests or cfg.model.num_interests
    if model is None:
        users = np.asarray(prepared.train["user"], dtype=np.int64)
        lens = np.asarray([len(s) for s in prepared.train["items"]], dtype=np.int64)
        selection = select_random_users(users, lens, sem.budget, sem.seed, sem.min_history_len)
        log.warning("no warm-up model: %d of %d training users drawn at random (semantic.selection=random); "
                    "give an exported model (--model-dir) for typical-user selection", len(selection), len(users))
        sem = dataclasses.replace(sem, selection="random")
    else:
        users, reprs, lens = user_representations(model, prepared.train, cfg.model.maxlen)
        selection = select_users(sem, reprs, users, lens)
    efs.makedirs(out_dir)
    write_parquet(selection, efs.join(out_dir, SELECTION_FILE))
    encoder = encoder or SemanticEncoder(sem.encoder, batch_size=sem.encoder_batch_size)
    own = annotator is None
    annotator = annotator or build_annotator(sem)
    cache = cache or AnnotationCache(sem.cache_dir or efs.join(eimf_home(), "annotation_cache"), annotator.model_id)
    try:
        df, stats = annotate_users(prepared, selection, annotator, cache, encoder, k, sem.token_budget,
                                   out_dir=out_dir, chunk_size=sem.chunk_size, retry_failed=sem.retry_failed,
                                   max_item_chars=sem.max_item_chars,
                                   extra_stats={"selection": sem.selection, "selected": int(len(selection))})
    finally:
        if own:
            annotator.close()
    return df, stats
