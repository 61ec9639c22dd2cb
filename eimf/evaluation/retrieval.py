"""Full ranking with faiss inner product, per interest, merged by score.

The item table is ``[N + 1, d]`` with row 0 the padding item. The index holds rows ``1..N`` only, so padding
can never be retrieved; faiss positions are mapped back to item ids with ``+ 1``.

A multi-interest user (``K`` interest vectors) is ranked by ``score(i) = max_k <interest_k, item_i>``: each
interest retrieves its own top-N, the ``K * N`` candidates are merged by score (descending), an item found by
several interests keeps its best score, and the first N distinct items are kept. This equals the exact top-N
of ``max_k`` scores over the whole catalogue, because an item in that top-N is necessarily in the top-N of
the interest that attains its maximum. The top-20 is therefore a prefix of the top-50 (up to exact ties).

Index choice: :class:`ItemIndex` takes a faiss ``index_factory`` string (the ``retrieval`` config section, shared
by evaluation and serving). ``Flat`` is exact brute force, what the metrics protocol asks for, and fast enough
up to a few hundred thousand items (``B * K * N_items * d`` multiply-adds per batch); ``auto`` keeps it there and
switches to an ANN index above (docs/serving.md measures recall against exact search and time per user): a fast
4-bit one where the model's own interest vectors verify it, else exact vectors in an IVF (:func:`auto_index`). An ANN
index makes metrics approximate: its string and search parameters are logged beside them, and the evaluation
reports the exact metrics beside them (eimf.evaluation.evaluate).

MIPS lift (``MIPS,<spec>``): trained item rows have very different norms (popular items score high through their
norm), and an IVF over inner product then assigns most rows to a few cells of large-norm centroids. The lift
appends ``sqrt(M^2 - |x|^2)`` to every item row (``M`` the largest row norm) and 0 to every query, so that
``|q' - x'|^2 = |q|^2 + M^2 - 2 <q, x>``: the L2-nearest lifted rows are the best inner-product rows, and an L2
index clusters them evenly. Scores are turned back into inner products (they are merged across interests and
shards, and served). ``M^2`` is not in faiss's file: :meth:`ItemIndex.load` recovers it as the distance of the
zero query (every lifted row has squared norm ``M^2``).

Threads: faiss uses OpenMP, with every core by default. :func:`set_faiss_threads` sets it from the
``threads`` argument, else ``$EIMF_FAISS_THREADS``, else leaves the process's setting alone. faiss and torch share
one OpenMP runtime here, so setting faiss's count sets torch's too: an index built inside a training worker must
not reset it to every core (after the first evaluation, each of two workers on two cores would train with two
threads, about 5x slower per step).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

import numpy as np

try:  # the faiss-cpu wheels are reported to crash on some Linux boxes when imported before torch
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - torch is a hard dependency of the package
    pass
import faiss  # noqa: E402

from eimf.evaluation.metrics import row_isin  # noqa: E402

ExcludeLike = Union[np.ndarray, Sequence[Sequence[int]], None]

log = logging.getLogger(__name__)


def set_faiss_threads(threads: Optional[int] = None) -> int:
    """Set faiss's OpenMP thread count to ``threads``, else ``$EIMF_FAISS_THREADS``; with neither, keep the
    process's current count (see module doc). Returns the count in force."""
    env = os.environ.get("EIMF_FAISS_THREADS")
    n = int(threads) if threads else (int(env) if env else None)
    if n is not None:
        faiss.omp_set_num_threads(max(1, n))
    return faiss.omp_get_max_threads()


def _as_padded(exclude: ExcludeLike, batch: int) -> Optional[np.ndarray]:
    """Exclusion lists -> ``[B, L]`` int64 right-padded with 0 (0 is never a candidate), or None."""
    if exclude is None:
        return None
    if isinstance(exclude, np.ndarray) and exclude.ndim == 2:
        out = exclude.astype(np.int64, copy=False)
    else:
        rows = [np.asarray(r, dtype=np.int64).ravel() for r in exclude]
        out = np.zeros((len(rows), max([len(r) for r in rows] + [1])), dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
    if out.shape[0] != batch:
        raise ValueError(f"exclude has {out.shape[0]} rows for {batch} users")
    return out


def merge_candidates(
    ids: np.ndarray, scores: np.ndarray, n: int, exclude: ExcludeLike = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Merge ``[B, M]`` candidates per row: drop ids ``<= 0`` and excluded ids, dedupe keeping the max score,
    order by score descending, keep the first ``n``.

    Returns ``ids [B, n]`` int64 and ``scores [B, n]`` float32; a row with fewer than ``n`` distinct valid
    candidates is right-padded with id 0 and score ``-inf``. Fully vectorised (sorts, no loop over rows).
    Equal scores keep the candidates' column order.
    """
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if ids.shape != scores.shape or ids.ndim != 2:
        raise ValueError(f"ids {ids.shape} and scores {scores.shape} must be the same [B, M] shape")
    b, m = ids.shape
    out_ids = np.zeros((b, n), dtype=np.int64)
    out_scores = np.full((b, n), -np.inf, dtype=np.float32)
    if b == 0 or m == 0 or n == 0:
        return out_ids, out_scores

    # 1. by score, descending (stable: ties keep column order)
    o1 = np.argsort(-scores, axis=1, kind="stable")
    ids_s = np.take_along_axis(ids, o1, axis=1)
    sc_s = np.take_along_axis(scores, o1, axis=1)
    # 2. within equal ids the first one (in score order) has the max score: keep only that one
    o2 = np.argsort(ids_s, axis=1, kind="stable")
    ids_2 = np.take_along_axis(ids_s, o2, axis=1)
    first = np.ones((b, m), dtype=bool)
    first[:, 1:] = ids_2[:, 1:] != ids_2[:, :-1]
    keep = np.empty_like(first)
    np.put_along_axis(keep, o2, first, axis=1)
    keep &= ids_s > 0
    keep &= ~np.isnan(sc_s)
    ex = _as_padded(exclude, b)
    if ex is not None:
        keep &= ~row_isin(ids_s, ex)
    # 3. compact the kept candidates to the left, first n of them
    rank = np.cumsum(keep, axis=1) - 1
    sel = keep & (rank < n)
    rows, cols = np.nonzero(sel)
    out_ids[rows, rank[rows, cols]] = ids_s[rows, cols]
    out_scores[rows, rank[rows, cols]] = sc_s[rows, cols]
    return out_ids, out_scores


def reserve_slots(ids: np.ndarray, scores: np.ndarray, new_ids: np.ndarray, new_scores: np.ndarray,
                  is_new: np.ndarray, slots: int) -> Tuple[np.ndarray, np.ndarray]:
    """Top lists ``[B, n]`` in which at least ``slots`` places go to new items, where there are that many.

    ``ids``/``scores``: the whole catalogue's top-``n`` (0-padded, best first); ``new_ids``/``new_scores``: the best
    new items alone (0-padded, best first, at least ``slots`` columns to fill them all); ``is_new``: ``[N + 1]``
    bool. A row that holds fewer than ``slots`` new items gives its lowest-scored other items' places to the best
    new items it lacks; the row is then ordered by score again. New items are ranked by their rows' scores like any
    other: a text-mapped row rarely scores into a whole-catalogue top list (docs/cold_start.md, "Reach"), so a
    reserved place is how a new item is shown before it is trained."""
    ids, scores = np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32)
    if slots <= 0 or ids.shape[1] == 0:
        return ids, scores
    out_ids, out_scores = ids.copy(), scores.copy()
    n = ids.shape[1]
    for r in range(len(ids)):
        row, row_s = ids[r], scores[r]
        valid = row > 0
        have = int((is_new[row] & valid).sum())
        lacking = [(int(i), float(s)) for i, s in zip(new_ids[r], new_scores[r]) if i > 0 and i not in row]
        take = lacking[:max(0, min(slots, n) - have)]
        if not take:
            continue
        keep = [(int(i), float(s)) for i, s, v in zip(row, row_s, valid) if v]
        room = n - len(keep)
        drop = len(take) - room
        if drop > 0:  # the lowest-scored items that are not new give their places (a row has enough of them:
            # it lacks at least len(take) new items of its n places)
            given = set([j for j in range(len(keep) - 1, -1, -1) if not is_new[keep[j][0]]][:drop])
            keep = [x for j, x in enumerate(keep) if j not in given]
        merged = sorted(keep + take, key=lambda x: -x[1])[:n]
        out_ids[r], out_scores[r] = 0, -np.inf
        out_ids[r, :len(merged)] = [i for i, _ in merged]
        out_scores[r, :len(merged)] = [s for _, s in merged]
    return out_ids, out_scores


def subset_topn(sub_table: np.ndarray, sub_ids: np.ndarray, interests: np.ndarray, n: int,
                exclude: ExcludeLike = None) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``n`` among a few items only (e.g. the new ones for :func:`reserve_slots`), in catalogue ids.
    ``sub_ids``: their ids, sorted; ``sub_table``: ``[len(sub_ids) + 1, d]``, their rows after a zero padding row;
    ``exclude``: catalogue ids per user (ids outside the subset are ignored). 0-padded like
    :func:`brute_force_topn`."""
    if exclude is not None:
        exclude = [np.searchsorted(sub_ids, e[np.isin(e, sub_ids)]) + 1 for e in map(np.asarray, exclude)]
    top, scores = brute_force_topn(sub_table, interests, n, exclude=exclude)
    return np.where(top > 0, sub_ids[np.maximum(top, 1) - 1], 0), scores


#: Rows added to a faiss index at a time (bounds the MIPS lift's copy).
_ADD_BLOCK = 1_000_000

#: ``retrieval.nprobe`` unset: the share of an IVF index's cells probed (docs/serving.md, "The retrieval index":
#: 1/16 kept 0.970-0.996 of the exact top-50 on trained 667K- and 7.3M-item tables).
AUTO_PROBE_SHARE = 1 / 16
#: ... and never fewer cells than this (the old fixed default).
MIN_NPROBE = 16
#: ``retrieval.refine_k`` unset: candidates per result an ``RFlat`` stage re-scores exactly (behind 4-bit codes on
#: a trained 667K-item table, 4 lost 0.013 of recall against 8; 16 gained 0.002 for up to twice the time).
DEFAULT_REFINE_K = 8

#: Catalogue size up to which ``index="auto"`` stays exact (docs/serving.md: 1.6-1.9 ms per user at 100K items).
AUTO_EXACT_MAX_ITEMS = 200_000

#: The auto guard (:func:`auto_index`): the fast candidate's share of cells probed, the measured nprobe 160 of
#: 3072 cells (about 1/19; docs/serving.md, "The retrieval index").
AUTO_FAST_PROBE_SHARE = 160 / 3072
#: ... kept only when it finds at least this share of the exact top-:data:`AUTO_CHECK_TOP_N` of the check queries
AUTO_MIN_RECALL_OF_EXACT = 0.95
AUTO_CHECK_TOP_N = 50
#: ... over at most this many check users (their interest vectors, e.g. a fixed-seed sample of the VALID split).
AUTO_CHECK_USERS = 500


def auto_index(n_items: int) -> str:
    """The faiss ``index_factory`` string ``index="auto"`` picks for a catalogue of ``n_items`` when it has no check
    queries (and its fallback when it has): exact up to :data:`AUTO_EXACT_MAX_ITEMS`, then the MIPS lift of an
    inverted file of about 4 sqrt(N) cells (a multiple of 1024) with exact vectors, searched
    (``retrieval.nprobe`` unset) in :data:`AUTO_PROBE_SHARE` of its cells.

    Chosen on trained tables (docs/serving.md, "The retrieval index": ComiRec-SA, 667K and 7.3M items). The
    inner-product IVF it replaces kept 0.63-0.65 of the exact top-50 at nprobe 16. The lifted one at 1/16 of its
    cells kept 0.970-0.996 on all three tables at 3.8-5.5x less time than exact search. Faster settings lose
    recall somewhere: 4-bit codes with exact re-scoring (``MIPS,IVF3072,PQ65x4fs,RFlat`` at nprobe 160) kept
    0.954-0.962 at 9-17x on the 667K tables but 0.30 on the 7.3M one; HNSW32 kept 0.931-0.963 at efSearch 32 and
    needs more memory and build time (not finished at 10M).

    The guard: an index built with check queries (the model's interest vectors, :class:`ItemIndex`'s
    ``check_queries``) above :data:`AUTO_EXACT_MAX_ITEMS` first builds :func:`auto_fast_index` (those 4-bit codes,
    probed in :data:`AUTO_FAST_PROBE_SHARE` of the cells, re-scoring :data:`DEFAULT_REFINE_K` candidates per
    result) and keeps it only when it finds at least :data:`AUTO_MIN_RECALL_OF_EXACT` of the exact
    top-:data:`AUTO_CHECK_TOP_N` of those queries; else this string. The decision is the index's ``auto_check``
    (recorded in the model folder's ``folder.json``). An explicit spec is never changed."""
    if n_items <= AUTO_EXACT_MAX_ITEMS:
        return "Flat"
    return f"MIPS,IVF{auto_cells(n_items)},Flat"


def auto_cells(n_items: int) -> int:
    """The IVF cell count of ``auto``: about 4 sqrt(N), a multiple of 1024, at least 1024."""
    return max(1024, int(4 * np.sqrt(n_items)) // 1024 * 1024)


def auto_fast_index(n_items: int, dim: int) -> Optional[str]:
    """The fast candidate the auto guard checks (:func:`auto_index`): ``MIPS,IVF<cells>,PQ<d+1>x4fs,RFlat``, one
    4-bit sub-quantizer per coordinate of the lifted ``d + 1``-dimensional rows (faiss's fast-scan layout), with
    exact re-scoring. None where the catalogue is exact, or faiss cannot build it for this dimension."""
    if n_items <= AUTO_EXACT_MAX_ITEMS:
        return None
    spec = f"MIPS,IVF{auto_cells(n_items)},PQ{int(dim) + 1}x4fs,RFlat"
    try:
        _factory(int(dim), spec, "auto")
    except ValueError:
        return None
    return spec


def fast_nprobe(spec: str) -> Optional[int]:
    """The auto candidate's nprobe: :data:`AUTO_FAST_PROBE_SHARE` of its cells (160 of 3072), at least
    :data:`MIN_NPROBE`."""
    cells = ivf_cells(spec)
    return None if cells is None else min(cells, max(MIN_NPROBE, round(cells * AUTO_FAST_PROBE_SHARE)))


def resolve_index(spec: str, n_items: int) -> str:
    """``auto`` -> :func:`auto_index`; the legacy names ``flat``/``ivf`` -> ``Flat``/``IVF<4 sqrt N>,Flat``."""
    if spec == "auto":
        return auto_index(n_items)
    if spec == "flat":
        return "Flat"
    if spec == "ivf":
        return f"IVF{max(1, min(n_items // 39, int(4 * np.sqrt(n_items))))},Flat"
    return spec


def ivf_cells(spec: str) -> Optional[int]:
    """The number of inverted lists of an ``IVF<n>...`` spec (any position, e.g. ``MIPS,IVF3072,Flat``), else None."""
    for part in spec.split(","):
        part = part.strip()
        if part.upper().startswith("IVF"):
            digits = part[3:len(part) - len(part[3:].lstrip("0123456789"))]
            return int(digits) if digits else None
    return None


def default_nprobe(spec: str) -> Optional[int]:
    """``retrieval.nprobe`` unset: probe :data:`AUTO_PROBE_SHARE` of the cells, at least
    :data:`MIN_NPROBE` (None for an index without cells)."""
    cells = ivf_cells(spec)
    return None if cells is None else min(cells, max(MIN_NPROBE, round(cells * AUTO_PROBE_SHARE)))


def _set_search_params(index, nprobe: Optional[int], ef_search: Optional[int], refine_k: Optional[int]) -> dict:
    """Set whichever of nprobe / efSearch / the refine factor this index has (through wrappers); return them."""
    space = faiss.ParameterSpace()
    done = {}
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search), ("k_factor_rf", refine_k)):
        if value is None:
            continue
        try:
            space.set_index_parameter(index, name, float(value))
            done[name] = value
        except RuntimeError:  # this index has no such parameter
            pass
    return done


class ItemIndex:
    """Inner-product index over item rows ``1..N`` of an ``[N + 1, d]`` table (row 0 = padding).

    ``index`` is a faiss ``index_factory`` string (``Flat``, ``HNSW32``, ``IVF4096,Flat``,
    ``IVF16384,PQ32x4fs,RFlat``, ...) built with the inner-product metric, or ``auto`` (exact for small
    catalogues, see :func:`auto_index`). Only ``Flat`` is exact: record the string and its search parameters
    beside any metric computed through another index. ``nprobe`` (IVF cells probed), ``ef_search`` (HNSW beam)
    and ``refine_k`` (candidates per result re-scored exactly by an ``RFlat`` stage) apply where the index has
    them. Training indexes (IVF, PQ) learn from at most ``train_size`` rows drawn with a fixed seed.
    """

    def __init__(
        self,
        item_embeddings: np.ndarray,
        index: str = "Flat",
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = 128,
        refine_k: Optional[int] = None,
        threads: Optional[int] = None,
        train_size: int = 500_000,
        nlist: Optional[int] = None,
        train_ids: Optional[np.ndarray] = None,
        check_queries=None,
    ):
        """``check_queries``: the model's interest vectors (``[U, K, d]`` or ``[U, d]``, e.g. of VALID users) that
        ``index="auto"`` checks its fast candidate with (:func:`auto_index`); ignored by any other spec."""
        table = np.asarray(item_embeddings)
        if hasattr(item_embeddings, "detach"):  # a torch tensor
            table = item_embeddings.detach().float().cpu().numpy()
        if table.ndim != 2 or table.shape[0] < 2:
            raise ValueError(f"item table must be [N + 1, d] with N >= 1, got {table.shape}")
        self.threads = set_faiss_threads(threads)
        items = np.ascontiguousarray(table[1:], dtype=np.float32)
        n, dim = items.shape
        if nlist is not None and index == "ivf":  # the older keyword form
            index = f"IVF{int(nlist)},Flat"

        def train_rows():
            return items[_train_sample_ids(n, train_size) if train_ids is None else np.unique(np.asarray(train_ids))]

        def blocks():  # in blocks: the MIPS copy of a 10M-row table would be 2.6 GB at once
            return (items[s:s + _ADD_BLOCK] for s in range(0, n, _ADD_BLOCK))

        self._build(index, n, dim, train_rows, blocks, lambda: _max_sq_norm(items), (nprobe, ef_search, refine_k),
                    check_queries)

    @classmethod
    def from_blocks(cls, blocks, n_items: int, dim: int, retrieval, threads: Optional[int] = None,
                    train_size: int = 500_000, check_queries=None) -> "ItemIndex":
        """The same index as :meth:`from_config`, built without the whole table in memory: ``blocks()`` yields
        the rows of ids 1..N in order as ``[n_i, d]`` arrays (called once for the lift's norm bound, once for a
        fixed-seed training sample, once to add; the auto guard reads them again for its exact check and its
        fallback). Memory: the index and one block."""
        self = cls.__new__(cls)
        self.threads = set_faiss_threads(threads)
        self._build(retrieval.index, n_items, int(dim), lambda: _sample_of_blocks(blocks, n_items, train_size),
                    blocks, lambda: _max_sq_norm_of_blocks(blocks),
                    (retrieval.nprobe, retrieval.ef_search, retrieval.refine_k), check_queries)
        return self

    @classmethod
    def from_config(cls, item_embeddings, retrieval, threads: Optional[int] = None,
                    check_queries=None) -> "ItemIndex":
        """The index a :class:`eimf.config.RetrievalConfig` describes, over ``item_embeddings``; ``check_queries``
        as in :class:`ItemIndex`."""
        return cls(item_embeddings, index=retrieval.index, nprobe=retrieval.nprobe, ef_search=retrieval.ef_search,
                   refine_k=retrieval.refine_k, threads=threads, check_queries=check_queries)

    # -- building ---------------------------------------------------------------------------------
    def _build(self, requested: str, n: int, dim: int, train_rows: Callable[[], np.ndarray],
               blocks: Callable[[], Iterable[np.ndarray]], max_sq_norm: Callable[[], float], search: tuple,
               check_queries) -> None:
        """The index of ``requested`` over the rows ``blocks()`` yields (ids 1..n); ``auto`` above the exact
        size goes through the guard (:meth:`_build_auto`). ``search``: (nprobe, ef_search, refine_k)."""
        self.spec = resolve_index(requested, n)
        #: The auto guard's decision (:func:`auto_index`), None for an explicit spec or an exact ``auto``.
        self.auto_check: Optional[dict] = None
        self.mips_m2 = max_sq_norm() if split_mips(self.spec)[0] else None
        if requested == "auto" and not self.exact:
            self._build_auto(n, dim, train_rows, blocks, search, check_queries)
            return
        self._adopt(self._fill(_factory(dim, self.spec, requested), train_rows, blocks, n), *search)

    def _fill(self, built, train_rows, blocks, n: int, centroids: Optional[np.ndarray] = None):
        """Train ``built`` (or give its inverted file the coarse ``centroids`` of an index over the same rows)
        and add every row."""
        if not built.is_trained and not (centroids is not None and _set_centroids(built, centroids)):
            built.train(self._lift(train_rows()))
        added = 0
        for block in blocks():
            built.add(self._lift(block))
            added += len(block)
        if added != n:
            raise ValueError(f"the row blocks hold {added} items, the catalogue has {n}")
        return built

    def _build_auto(self, n: int, dim: int, train_rows, blocks, search: tuple, check_queries) -> None:
        """The auto guard (:func:`auto_index`): the fast candidate, kept when its recall of the exact top-N over
        the check queries reaches :data:`AUTO_MIN_RECALL_OF_EXACT`; else the safe ``self.spec`` (IVF, Flat).
        Explicit ``retrieval.nprobe`` / ``refine_k`` apply to whichever is built (the check measures it so)."""
        fallback = self.spec
        nprobe, ef_search, refine_k = search
        candidate = auto_fast_index(n, dim)
        queries = _check_queries(check_queries, dim)
        check = {"candidate": candidate, "candidate_recall_of_exact": None,
                 "check_users": 0 if queries is None else int(queries.shape[0]),
                 "check_vectors": 0 if queries is None else int(queries.shape[0] * queries.shape[1]),
                 "top_n": AUTO_CHECK_TOP_N, "min_recall": AUTO_MIN_RECALL_OF_EXACT, "kept": False}
        centroids = None
        if candidate is None:
            reason = f"faiss builds no 4-bit fast-scan candidate for d={dim}"
        elif queries is None:
            reason = "no check queries (the model's interest vectors) at this build: not verified"
        else:
            self.spec = candidate
            self._adopt(self._fill(_factory(dim, candidate, "auto"), train_rows, blocks, n),
                        fast_nprobe(candidate) if nprobe is None else nprobe, ef_search, refine_k)
            recall = self._recall_of_exact(queries, blocks, AUTO_CHECK_TOP_N)
            check["candidate_recall_of_exact"] = recall
            if recall >= AUTO_MIN_RECALL_OF_EXACT:
                check.update(kept=True, reason=f"recall of the exact top-{AUTO_CHECK_TOP_N} {recall:.4f} >= "
                                               f"{AUTO_MIN_RECALL_OF_EXACT}")
                self.auto_check = check
                log.info("retrieval index auto: %s (%s) kept: it finds %.4f of the exact top-%d of %d check users "
                         "(>= %s)", candidate, self.params, recall, AUTO_CHECK_TOP_N, check["check_users"],
                         AUTO_MIN_RECALL_OF_EXACT)
                return
            reason = (f"recall of the exact top-{AUTO_CHECK_TOP_N} {recall:.4f} < {AUTO_MIN_RECALL_OF_EXACT}")
            centroids = _coarse_centroids(self.index)  # the same cells: the fallback skips its k-means
            self.index = None  # free the candidate before the fallback is filled
        self.spec = fallback
        self._adopt(self._fill(_factory(dim, fallback, "auto"), train_rows, blocks, n, centroids), *search)
        check["reason"] = reason
        self.auto_check = check
        log.info("retrieval index auto: %s (%s); the fast candidate %s was not kept: %s", fallback, self.params,
                 candidate, reason)

    def _recall_of_exact(self, queries: np.ndarray, blocks, n: int) -> float:
        """Mean over the check users of the share of their exact top-``n`` (per interest, merged as
        :meth:`search_multi` merges) that this index's top-``n`` holds; exact by brute force over ``blocks()``."""
        u, k, d = queries.shape
        got, _ = self.search_multi(queries, n)
        ids, scores = _exact_topn(blocks, queries.reshape(u * k, d), n)
        exact, _ = merge_candidates(ids.reshape(u, -1), scores.reshape(u, -1), n)
        hit = row_isin(got, exact) & (got > 0)
        return float(np.mean(hit.sum(1) / np.maximum(1, (exact > 0).sum(1))))

    def record(self) -> dict:
        """What a model folder records of this index (``folder.json``'s ``index``): the spec, the search parameters
        set, and the auto guard's decision (``auto_check``) where there was one."""
        out = {"spec": self.spec, **self.params}
        if getattr(self, "auto_check", None) is not None:
            out["auto_check"] = dict(self.auto_check)
        return out

    def _adopt(self, built, nprobe, ef_search, refine_k) -> None:
        self.index = built
        self.n_items = int(built.ntotal)
        self.dim = int(built.d) - (self.mips_m2 is not None)  # the MIPS index holds one extra coordinate
        nprobe = default_nprobe(self.spec) if nprobe is None else nprobe
        refine_k = DEFAULT_REFINE_K if refine_k is None else refine_k
        self.params = _set_search_params(built, nprobe, ef_search, refine_k)

    @property
    def exact(self) -> bool:
        """Whether this index returns the exact top-N (``Flat`` only; the MIPS lift of a flat index too)."""
        return split_mips(self.spec)[1] == "Flat"

    def _lift(self, rows: np.ndarray) -> np.ndarray:
        """Item rows as the index stores them: as they are, or (MIPS) with ``sqrt(M^2 - |x|^2)`` appended, so that
        the L2 distance to a query ``[q, 0]`` is ``|q|^2 + M^2 - 2 <q, x>``: the nearest rows are the best scored."""
        x = np.ascontiguousarray(rows, dtype=np.float32)
        if self.mips_m2 is None:
            return x
        extra = np.sqrt(np.maximum(self.mips_m2 - np.einsum("nd,nd->n", x, x), 0.0))
        return np.ascontiguousarray(np.hstack([x, extra[:, None].astype(np.float32)]))

    def add(self, rows: np.ndarray, blocks: Optional[Callable[[], Iterable[np.ndarray]]] = None) -> str:
        """Append ``rows`` ``[M, d]`` as items ``N + 1 .. N + M`` (new items: ``eimf items add``); returns what was
        done: ``"added"``, or ``"rebuilt"``. A trained index (IVF, PQ) files them under its cells as they are. The
        MIPS lift cannot take a row longer than its bound ``M``: every stored row's lift depends on it, so the index
        is then rebuilt, same spec and search parameters, over ``blocks()`` (the rows of ids ``1 .. N + M`` in
        order, these included; required then), with the new bound."""
        x = np.ascontiguousarray(rows, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"new item rows must be [M, {self.dim}], got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("new item rows hold NaN or infinite values")
        if len(x) == 0:
            return "added"
        if self.mips_m2 is None or _max_sq_norm(x) <= self.mips_m2:
            self.index.add(self._lift(x))
            self.n_items = int(self.index.ntotal)
            return "added"
        if blocks is None:
            raise ValueError(f"a new row of squared norm {_max_sq_norm(x):.4g} exceeds the MIPS bound "
                             f"{self.mips_m2:.4g} of index {self.spec!r}: rebuilding it needs every row (blocks)")
        n = self.n_items + len(x)
        log.info("retrieval index %s: a new row exceeds the MIPS norm bound (%.4g > %.4g): rebuilt over %d items",
                 self.spec, _max_sq_norm(x), self.mips_m2, n)
        auto_check = self.auto_check
        self._build(self.spec, n, self.dim, lambda: _sample_of_blocks(blocks, n, 500_000), blocks,
                    lambda: _max_sq_norm_of_blocks(blocks),
                    (self.params.get("nprobe"), self.params.get("efSearch"), self.params.get("k_factor_rf")), None)
        self.auto_check = auto_check  # the spec was chosen, and checked, over the catalogue before the new items
        return "rebuilt"

    def set_params(self, nprobe: Optional[int] = None, ef_search: Optional[int] = None,
                   refine_k: Optional[int] = None) -> dict:
        """Change search parameters in place (those this index has); returns all that are set."""
        self.params.update(_set_search_params(self.index, nprobe, ef_search, refine_k))
        return self.params

    def save(self, path) -> None:
        """The index as faiss's own file format (local path)."""
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path, spec: str, nprobe: Optional[int] = None, ef_search: Optional[int] = 128,
             refine_k: Optional[int] = None, threads: Optional[int] = None,
             auto_check: Optional[dict] = None) -> "ItemIndex":
        """An index written by :meth:`save`; search parameters are set again (faiss does not store them all).
        ``auto_check``: the auto guard's decision recorded beside it (:meth:`record`), kept as it is."""
        self = cls.__new__(cls)
        self.threads = set_faiss_threads(threads)
        self.spec = spec
        self.auto_check = None if auto_check is None else dict(auto_check)
        built = faiss.read_index(str(path))
        self.mips_m2 = 0.0 if split_mips(spec)[0] else None
        self._adopt(built, nprobe, ef_search, refine_k)
        if self.mips_m2 is not None:  # after _adopt: the zero query probes with the search parameters set
            self.mips_m2 = _stored_sq_norm(built)
        return self

    def search(self, queries: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``n`` items per query: ``ids [Q, n]`` (item ids 1..N; 0 where fewer were found) and scores."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {q.shape}")
        k = max(1, min(int(n), self.n_items))
        if self.mips_m2 is None:
            scores, pos = self.index.search(q, k)
        else:  # L2 over the lifted rows; back to inner products, which merge across interests and shards
            d2, pos = self.index.search(np.hstack([q, np.zeros((len(q), 1), np.float32)]), k)
            scores = 0.5 * (np.einsum("qd,qd->q", q, q)[:, None] + self.mips_m2 - d2)
        ids = np.where(pos >= 0, pos + 1, 0).astype(np.int64)
        scores = np.where(pos >= 0, scores, -np.inf).astype(np.float32)
        return ids, scores

    def search_multi(
        self, interests: np.ndarray, n: int, exclude: ExcludeLike = None
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``n`` distinct items per user from ``[B, K, d]`` interests (``[B, d]`` means K = 1).

        Each interest retrieves its own top list; the ``B x K*n`` candidates are merged by
        :func:`merge_candidates`. With ``exclude`` (``[B, L]`` 0-padded ids or ragged lists, e.g. the user's
        history) each interest retrieves ``n + L`` items so that at least ``n`` non-excluded ones remain,
        and the excluded ones are dropped before the cut.
        """
        x = interests.detach().float().cpu().numpy() if hasattr(interests, "detach") else np.asarray(interests)
        if x.ndim == 2:
            x = x[:, None, :]
        if x.ndim != 3:
            raise ValueError(f"interests must be [B, K, d] or [B, d], got {x.shape}")
        b, k, _ = x.shape
        ex = _as_padded(exclude, b)
        extra = 0 if ex is None else int(nonzero_counts(ex).max(initial=0))
        ids, scores = self.search(x.reshape(b * k, -1), n + extra)
        ids = ids.reshape(b, -1)
        scores = scores.reshape(b, -1)
        return merge_candidates(ids, scores, n, exclude=ex)


def nonzero_counts(a: np.ndarray) -> np.ndarray:
    """Non-zero entries per row (an upper bound on the distinct excluded items of a row)."""
    return (np.asarray(a) != 0).sum(axis=1)


def brute_force_topn(
    item_embeddings: np.ndarray, interests: np.ndarray, n: int, exclude: ExcludeLike = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Reference ranking in plain numpy (tests, tiny catalogues): top-``n`` of ``max_k`` scores, padding and
    excluded items removed. Ties are broken by the smaller item id."""
    table = np.asarray(item_embeddings, dtype=np.float32)
    x = np.asarray(interests, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, None, :]
    s = np.einsum("bkd,nd->bkn", x, table).max(axis=1)  # [B, N + 1]
    s[:, 0] = -np.inf
    ex = _as_padded(exclude, len(x))
    if ex is not None:
        rows = np.repeat(np.arange(len(x)), ex.shape[1])
        s[rows, ex.ravel()] = -np.inf
        s[:, 0] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :n]
    top = np.take_along_axis(s, order, axis=1)
    return np.where(np.isfinite(top), order, 0).astype(np.int64), top


def _factory(dim: int, spec: str, requested: str):
    """The faiss index of ``spec`` over inner product, or for ``MIPS,<spec>`` over L2 in ``dim + 1`` dimensions."""
    mips, base = split_mips(spec)
    try:
        if mips:
            return faiss.index_factory(dim + 1, base, faiss.METRIC_L2)
        return faiss.index_factory(dim, base, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"retrieval index {requested!r}: faiss cannot build {spec!r} for d={dim} "
                         f"({str(e).strip().splitlines()[-1]})") from None


def split_mips(spec: str) -> Tuple[bool, str]:
    """``MIPS,<spec>`` -> ``(True, <spec>)``; any other spec -> ``(False, spec)``."""
    head, _, rest = spec.partition(",")
    return (True, rest) if head.strip().upper() == "MIPS" and rest else (False, spec)


def _max_sq_norm(rows: np.ndarray) -> float:
    return float(np.einsum("nd,nd->n", rows, rows).max(initial=0.0))


def _max_sq_norm_of_blocks(blocks) -> float:
    """The largest squared row norm over ``blocks()``: one more pass, as the lift needs it before any row goes in."""
    return max(_max_sq_norm(np.asarray(b, dtype=np.float32)) for b in blocks())


def _sample_of_blocks(blocks, n: int, train_size: int) -> np.ndarray:
    """The training sample of :func:`_train_sample_ids` gathered from ``blocks()`` (rows of ids 1..n in order)."""
    pick = _train_sample_ids(n, train_size)
    sample, start = [], 0
    for block in blocks():
        lo, hi = np.searchsorted(pick, [start, start + len(block)])
        sample.append(np.asarray(block, dtype=np.float32)[pick[lo:hi] - start])
        start += len(block)
    return np.concatenate(sample)


def _stored_sq_norm(index) -> float:
    """M^2 of a MIPS index read from disk: every lifted row has squared norm M^2, so the distance of the zero
    query to whatever it finds is M^2 (faiss's file does not hold it; the folder's reader passes only the spec)."""
    d2, pos = index.search(np.zeros((1, index.d), np.float32), 1)
    if pos[0, 0] < 0:
        raise ValueError("a MIPS index that returns nothing for the zero query: cannot recover its norm bound")
    return float(d2[0, 0])


def _check_queries(queries, dim: int) -> Optional[np.ndarray]:
    """The auto guard's check queries as ``[U, K, d]`` float32, at most :data:`AUTO_CHECK_USERS` users (the
    first); None for none."""
    if queries is None:
        return None
    q = queries.detach().float().cpu().numpy() if hasattr(queries, "detach") else np.asarray(queries)
    if q.ndim == 2:
        q = q[:, None, :]
    if q.ndim != 3 or q.shape[2] != dim:
        raise ValueError(f"check queries must be [U, K, {dim}] or [U, {dim}], got {q.shape}")
    if q.shape[0] == 0 or q.shape[1] == 0:
        return None
    return np.ascontiguousarray(q[:AUTO_CHECK_USERS], dtype=np.float32)


def _exact_topn(blocks: Callable[[], Iterable[np.ndarray]], queries: np.ndarray, n: int
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``n`` (ids 1..N, scores) of each query over the rows ``blocks()`` yields in id
    order, one block at a time (no copy of the table); ties: the smaller id."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    ids = np.zeros((len(q), 0), np.int64)
    scores = np.zeros((len(q), 0), np.float32)
    start = 1
    for block in blocks():
        b = np.ascontiguousarray(block, dtype=np.float32)
        if len(b):
            sc, pos = faiss.knn(q, b, min(n, len(b)), metric=faiss.METRIC_INNER_PRODUCT)
            ids = np.hstack([ids, np.where(pos >= 0, pos + start, 0)])
            scores = np.hstack([scores, np.where(pos >= 0, sc, -np.inf).astype(np.float32)])
            order = np.lexsort((ids, -scores), axis=1)[:, :n]
            ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
        start += len(b)
    return ids, scores


def _coarse_centroids(index) -> Optional[np.ndarray]:
    """The centroids of an index's inverted file (through wrappers such as RFlat), or None."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def _set_centroids(index, centroids: np.ndarray) -> bool:
    """Give an untrained inverted file (nothing else to train, e.g. ``IVF<n>,Flat``) these coarse centroids;
    whether the index is trained now."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    if ivf.nlist != len(centroids) or ivf.d != centroids.shape[1] or ivf.quantizer.ntotal != 0:
        return False
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    ivf.is_trained = True
    return bool(index.is_trained)


def _train_sample_ids(n: int, train_size: int) -> np.ndarray:
    """Sorted positions of the rows a training index learns from: all, or a fixed-seed sample of ``train_size``
    (the same for the whole-table and the block-by-block build)."""
    if n <= train_size:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, train_size, replace=False))
