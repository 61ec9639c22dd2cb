"""Training batches (ComiRec random cut) and evaluation batches, as numpy arrays.

Training instance: a user drawn uniformly among those with ``len(seq) > min_cut``, a cut ``k`` uniform in
``[min_cut, len)``, target ``seq[k]``, history ``seq[:k][-maxlen:]`` right-padded with 0 (oldest kept item
first). Users with ``len <= min_cut`` cannot make an instance: they are excluded and counted
(``TrainSampler.n_excluded``).

All sequences are concatenated once into one flat array with offsets, so a batch is a handful of numpy
operations (hundreds of thousands of examples per second on one core).
"""
from __future__ import annotations

import logging
import sys
from typing import Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

Batch = Tuple[np.ndarray, np.ndarray, np.ndarray]


def _flatten(seqs: Sequence) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = [np.asarray(s, dtype=np.int64).ravel() for s in seqs]
    lens = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    return flat, offsets, lens


def _windows(flat: np.ndarray, ends: np.ndarray, n: np.ndarray, maxlen: int) -> Tuple[np.ndarray, np.ndarray]:
    """Rows ``flat[end-n : end]``, right-padded to ``maxlen`` -> (hist int64 [B, L], mask bool [B, L])."""
    j = np.arange(maxlen, dtype=np.int64)
    mask = j[None, :] < n[:, None]
    if len(flat) == 0:
        return np.zeros(mask.shape, dtype=np.int64), mask
    idx = (ends - n)[:, None] + j[None, :]
    np.clip(idx, 0, len(flat) - 1, out=idx)
    hist = np.where(mask, flat[idx], 0)
    return hist.astype(np.int64, copy=False), mask


def window_overlap(cuts: np.ndarray, maxlen: int, start: int, end: int) -> np.ndarray:
    """Share of the history ``seq[cut - min(cut, maxlen) : cut]`` inside the annotated positions [start, end)."""
    cuts = np.asarray(cuts, dtype=np.int64)
    h = np.minimum(cuts, maxlen)
    inside = np.clip(np.minimum(cuts, end) - np.maximum(cuts - h, start), 0, None)
    return inside / np.maximum(h, 1)


def aligned_cut_low(length: int, maxlen: int, start: int, end: int, share: float, min_cut: int) -> int:
    """The smallest cut in [min_cut, length) whose history has at least ``share`` of its items inside the window
    (the largest overlap there is, when no cut reaches ``share``)."""
    cuts = np.arange(min_cut, length)
    if len(cuts) == 0:
        return min_cut
    got = window_overlap(cuts, maxlen, start, end)
    ok = np.flatnonzero(got >= share - 1e-12)
    return int(cuts[ok[0]] if len(ok) else cuts[int(np.argmax(got))])


class _Stream:
    """``iter()`` over ``sample(rng=...)``: endless or ``num_batches`` long, one RNG stream per DataLoader worker."""

    seed: int
    rng: np.random.Generator
    num_batches: Optional[int]

    def sample(self, batch_size=None, rng=None):
        raise NotImplementedError

    def _stream_rng(self) -> np.random.Generator:
        torch = sys.modules.get("torch")
        if torch is not None:
            info = torch.utils.data.get_worker_info()
            if info is not None and info.num_workers > 1:
                return np.random.default_rng([int(self.seed), int(info.id)])
        return self.rng

    def __iter__(self):
        rng = self._stream_rng()
        n = 0
        while self.num_batches is None or n < self.num_batches:
            yield self.sample(rng=rng)
            n += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"an endless {type(self).__name__} has no length (pass num_batches=)")
        return self.num_batches


class TrainSampler(_Stream):
    """Endless (or ``num_batches``-long) stream of ``(hist [B, L] int64, mask [B, L] bool, target [B] int64)``.

    ``iter(sampler)`` continues the same random stream each time it is called. In a torch ``DataLoader``
    with several workers, each worker draws its own stream (seeded by ``seed`` and the worker id).
    """

    def __init__(self, sequences: Sequence, maxlen: int, batch_size: int, min_cut: int = 4, seed: int = 0,
                 num_batches: Optional[int] = None, cut_low: Optional[np.ndarray] = None):
        """``cut_low`` (one per sequence, >= min_cut): the smallest cut drawn for that user (EIMF's window
        alignment); default ``min_cut`` for everyone."""
        if maxlen < 1 or batch_size < 1:
            raise ValueError("maxlen and batch_size must be >= 1")
        if min_cut < 1:
            raise ValueError("min_cut must be >= 1 (a history needs at least one item)")
        self.maxlen, self.batch_size, self.min_cut, self.seed = int(maxlen), int(batch_size), int(min_cut), seed
        self.num_batches = num_batches
        flat_all, _, lens_all = _flatten(sequences)
        eligible = lens_all > min_cut
        self.n_users_total = int(len(lens_all))
        self.n_excluded = int((~eligible).sum())
        if self.n_excluded:
            log.info("TrainSampler: %d of %d users have <= %d items and make no training example",
                     self.n_excluded, self.n_users_total, min_cut)
        if not eligible.any():
            raise ValueError(f"no training sequence is longer than min_cut={min_cut}")
        self.flat, self.offsets, self.lengths = _flatten([s for s, e in zip(sequences, eligible) if e])
        self.n_users = int(len(self.lengths))
        self.cut_low = None
        if cut_low is not None:
            cut_low = np.asarray(cut_low, dtype=np.int64)
            if len(cut_low) != len(lens_all):
                raise ValueError(f"cut_low has {len(cut_low)} entries for {len(lens_all)} sequences")
            self.cut_low = np.clip(cut_low[eligible], min_cut, self.lengths - 1)
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size: Optional[int] = None, rng: Optional[np.random.Generator] = None) -> Batch:
        return self.sample_users(batch_size or self.batch_size, rng)[1:]

    def sample_users(self, batch_size: Optional[int] = None, rng: Optional[np.random.Generator] = None):
        """Like :meth:`sample`, plus the drawn rows' indices among the eligible users (first element)."""
        b = self.batch_size if batch_size is None else batch_size
        rng = rng or self.rng
        u = rng.integers(0, self.n_users, size=b)
        low = self.min_cut if self.cut_low is None else self.cut_low[u]
        k = rng.integers(low, self.lengths[u])  # uniform in [min_cut (or the user's cut_low), len)
        ends = self.offsets[u] + k
        target = self.flat[ends]
        hist, mask = _windows(self.flat, ends, np.minimum(k, self.maxlen), self.maxlen)
        return u, hist, mask, target


class SemanticBatch(NamedTuple):
    """A training batch whose ``sem_rows`` are typical users, with their semantic interests (EIMF)."""

    hist: np.ndarray  # [B, L] int64
    mask: np.ndarray  # [B, L] bool
    target: np.ndarray  # [B] int64
    sem_rows: np.ndarray  # [b] int64: rows of the batch that are typical users
    sem: np.ndarray  # [b, M, D] float32 unit vectors (zeros where sem_mask is False)
    sem_mask: np.ndarray  # [b, M] bool
    #: The first ``rec_rows`` rows feed the recommendation loss; -1: all rows. Rows after them (``extra``
    #: sampling) are typical users that feed the auxiliary losses only.
    rec_rows: int = -1
    #: [b, M, E] int64: the item ids each semantic interest cites (0: padding), or None when not asked for.
    evidence: Optional[np.ndarray] = None


def pad_semantics(vectors: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Per-user ``[M_u, D]`` arrays -> ``(sem [n, max M_u, D] float32, mask [n, max M_u] bool)``."""
    if not vectors:
        return np.zeros((0, 0, 0), dtype=np.float32), np.zeros((0, 0), dtype=bool)
    m = max(len(v) for v in vectors)
    d = int(np.asarray(vectors[0]).shape[1])
    sem = np.zeros((len(vectors), m, d), dtype=np.float32)
    mask = np.zeros((len(vectors), m), dtype=bool)
    for i, v in enumerate(vectors):
        sem[i, :len(v)] = v
        mask[i, :len(v)] = True
    return sem, mask


class SemanticTrainSampler(_Stream):
    """EIMF batches (docs/design.md section 5), each part drawn as :class:`TrainSampler` draws (uniform user, random cut).

    ``oversample`` (the paper's): ``round(typical_share * batch_size)`` rows from the typical users (those with
    semantic interests), the rest from the other training users; typical rows come first; every row feeds the
    recommendation loss, so a small annotation budget makes a few users weigh heavily in it.
    ``extra``: the batch is the backbone's (``batch_size`` rows from all training users), and
    ``round(typical_share * batch_size)`` typical rows are appended that feed only the auxiliary losses
    (``rec_rows = batch_size``); the recommendation objective is then the backbone's, whatever the budget.
    ``sem_rows`` names the typical rows either way.

    ``require_typical=False`` (a worker's shard under N workers): a shard without a typical user draws batches with
    no typical rows instead of raising.

    ``semantics``: ``{user id: [M_u, D]}`` as :func:`eimf.semantic.annotate.semantic_vectors` returns. The prompts
    saw only training sequences, and here every instance is cut from a training sequence, so the semantic
    interests reveal nothing outside the training data.
    """

    MODES = ("oversample", "extra")

    def __init__(self, sequences: Sequence, users: Sequence[int], semantics: Mapping[int, np.ndarray], maxlen: int,
                 batch_size: int, typical_share: float, min_cut: int = 4, seed: int = 0,
                 num_batches: Optional[int] = None, mode: str = "oversample", require_typical: bool = True,
                 evidence: Optional[Mapping[int, np.ndarray]] = None,
                 windows: Optional[Mapping[int, Tuple[int, int]]] = None, window_overlap_share: float = 0.0):
        if not 0.0 <= typical_share <= 1.0:
            raise ValueError(f"typical_share must be in [0, 1], got {typical_share}")
        if mode not in self.MODES:
            raise ValueError(f"eimf.typical_sampling must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if len(users) != len(sequences):
            raise ValueError(f"{len(users)} users for {len(sequences)} sequences")
        self.batch_size, self.seed, self.num_batches = int(batch_size), seed, num_batches
        self.n_typical_rows = int(round(typical_share * self.batch_size))
        users = np.asarray(users, dtype=np.int64)
        lens = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        annotated = np.array([len(semantics.get(int(u), ())) > 0 for u in users], dtype=bool)
        typical, others = annotated & (lens > min_cut), ~annotated & (lens > min_cut)
        n_unknown = len(set(int(u) for u in semantics) - set(users.tolist()))
        if n_unknown or (annotated & ~typical).any():
            log.info("SemanticTrainSampler: %d annotated users are not training users here, %d are too short",
                     n_unknown, int((annotated & ~typical).sum()))
        if self.n_typical_rows and not typical.any():
            if require_typical:
                raise ValueError("no annotated user has a training sequence longer than min_cut")
            # One worker's shard of the users, and a small budget: the other workers' typical rows carry the
            # auxiliary losses (their head gradients are averaged with this worker's zeros).
            log.warning("SemanticTrainSampler: none of the %d annotated users is in this shard (%d users): its "
                        "batches have no typical rows", len(semantics), len(users))
            self.n_typical_rows = 0
        if mode == "oversample" and self.n_typical_rows < self.batch_size and not others.any():
            # every training user is annotated (a 100 % budget): every row is a typical row
            log.info("SemanticTrainSampler: every training user is annotated: typical share %g -> 1",
                     typical_share)
            self.n_typical_rows = self.batch_size
        # Pre-filtered, so each sub-sampler's user index i is our i-th typical (other) user.
        sub = dict(maxlen=maxlen, batch_size=self.batch_size, min_cut=min_cut, seed=seed)
        idx_t, idx_o = np.flatnonzero(typical), np.flatnonzero(others)
        cut_low = None
        #: Mean share of a typical row's history inside its annotated window, over the cuts drawn (None: unknown).
        self.overlap_share = None
        if windows is not None:
            if not 0.0 <= window_overlap_share <= 1.0:
                raise ValueError(f"eimf.experimental.window_overlap must be in [0, 1], got {window_overlap_share}")
            spans = [windows.get(int(users[i])) for i in idx_t]
            if any(w is None for w in spans):
                raise ValueError("some typical users have no annotated window")
            cut_low = np.array([aligned_cut_low(int(lens[i]), maxlen, a, b, window_overlap_share, min_cut)
                                if window_overlap_share > 0 else min_cut
                                for i, (a, b) in zip(idx_t, spans)], dtype=np.int64)
            shares = [float(window_overlap(np.arange(lo, lens[i]), maxlen, a, b).mean())
                      for i, lo, (a, b) in zip(idx_t, cut_low, spans)]
            self.overlap_share = float(np.mean(shares)) if shares else None
            log.info("SemanticTrainSampler: typical rows see their annotated window in %.1f %% of their history "
                     "on average (window_overlap >= %g)", 100 * (self.overlap_share or 0.0), window_overlap_share)
        self.typical = TrainSampler([sequences[i] for i in idx_t], cut_low=cut_low, **sub) if len(idx_t) else None
        self.others = TrainSampler([sequences[i] for i in idx_o], **sub) if len(idx_o) else None
        self.typical_users = users[idx_t]
        # extra: the recommendation rows come from every training user, as the backbone's batches do
        self.everyone = TrainSampler(sequences, **sub) if mode == "extra" else None
        self.sem, self.sem_mask = pad_semantics([np.asarray(semantics[int(u)], np.float32) for u in self.typical_users])
        self.evidence = None
        if evidence is not None:  # [n_typical, M, E], aligned with self.sem
            tables = [np.asarray(evidence.get(int(u), np.zeros((0, 1), np.int64)), np.int64)
                      for u in self.typical_users]
            width = max([t.shape[1] for t in tables] + [1])
            self.evidence = np.zeros((len(tables), self.sem.shape[1], width), dtype=np.int64)
            for i, t in enumerate(tables):
                self.evidence[i, :t.shape[0], :t.shape[1]] = t[:self.sem.shape[1]]
        self.rng = np.random.default_rng(seed)

    def _evidence(self, u) -> Optional[np.ndarray]:
        return None if self.evidence is None else self.evidence[u]

    def sample(self, batch_size=None, rng: Optional[np.random.Generator] = None) -> SemanticBatch:
        if batch_size is not None and batch_size != self.batch_size:
            raise ValueError("SemanticTrainSampler draws batches of its own batch_size")
        rng = rng or self.rng
        n_t = self.n_typical_rows
        if self.mode == "extra":
            hist, mask, target = self.everyone.sample(self.batch_size, rng)
            rows = np.arange(self.batch_size, self.batch_size + n_t, dtype=np.int64)
            if not n_t:
                return SemanticBatch(hist, mask, target, rows, self.sem[:0], self.sem_mask[:0], self.batch_size,
                                     self._evidence(slice(0, 0)))
            u, *extra = self.typical.sample_users(n_t, rng)
            hist, mask, target = (np.concatenate([a, b]) for a, b in zip((hist, mask, target), extra))
            return SemanticBatch(hist, mask, target, rows, self.sem[u], self.sem_mask[u], self.batch_size,
                                 self._evidence(u))
        parts = []
        if n_t:
            u, *batch_t = self.typical.sample_users(n_t, rng)
            parts.append(batch_t)
        if n_t < self.batch_size:
            parts.append(self.others.sample_users(self.batch_size - n_t, rng)[1:])
        hist, mask, target = (np.concatenate(x) for x in zip(*parts))
        if not n_t:
            return SemanticBatch(hist, mask, target, np.zeros(0, np.int64), self.sem[:0], self.sem_mask[:0],
                                 evidence=self._evidence(slice(0, 0)))
        return SemanticBatch(hist, mask, target, np.arange(n_t, dtype=np.int64), self.sem[u], self.sem_mask[u],
                             evidence=self._evidence(u))


def last_items(histories: Sequence[Sequence[int]], maxlen: int) -> Tuple[np.ndarray, np.ndarray]:
    """The last ``maxlen`` items of each history, right-padded with 0 (oldest kept item first) ->
    ``(hist int64 [B, maxlen], mask bool [B, maxlen])``: what a model reads for a valid/test/serving user."""
    flat, offsets, lens = _flatten(histories)
    return _windows(flat, offsets[1:], np.minimum(lens, maxlen), maxlen)


def eval_batches(split_df, maxlen: int, batch_size: int):
    """Yield ``(users [b] int64, hist [b, L] int64, mask [b, L] bool, truth: list of arrays, history: list of arrays)``.

    ``split_df`` has ``user``, ``history``, ``truth`` (valid/test). ``hist`` holds the last ``maxlen`` history
    items, right-padded with 0; ``history`` the whole history (for excluding seen items).
    """
    users = np.asarray(split_df["user"], dtype=np.int64)
    histories = [np.asarray(h, dtype=np.int64) for h in split_df["history"]]
    truths = [np.asarray(t, dtype=np.int64) for t in split_df["truth"]]
    for s in range(0, len(users), batch_size):
        hs = histories[s:s + batch_size]
        hist, mask = last_items(hs, maxlen)
        yield users[s:s + batch_size], hist, mask, truths[s:s + batch_size], hs


def cut_examples(sequences: Sequence, maxlen: int, min_cut: int, rng: np.random.Generator) -> dict:
    """One training instance per sequence (ComiRec random cut), as column arrays for a Ray Data batch.

    Sequences too short for a cut (``len <= min_cut``) give no row; the caller counts them.
    """
    flat, offsets, lens = _flatten(sequences)
    ok = lens > min_cut
    starts, lens = offsets[:-1][ok], lens[ok]
    k = rng.integers(min_cut, lens) if len(lens) else np.zeros(0, dtype=np.int64)  # cut in [min_cut, len)
    target = flat[starts + k] if len(lens) else np.zeros(0, dtype=np.int64)
    hist, mask = _windows(flat, starts + k, np.minimum(k, maxlen), maxlen)
    return {"hist": hist, "mask": mask, "target": target.astype(np.int64)}
