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
from typing import Iterator, Optional, Sequence, Tuple

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


class TrainSampler:
    """Endless (or ``num_batches``-long) stream of ``(hist [B, L] int64, mask [B, L] bool, target [B] int64)``.

    ``iter(sampler)`` continues the same random stream each time it is called. In a torch ``DataLoader``
    with several workers, each worker draws its own stream (seeded by ``seed`` and the worker id).
    """

    def __init__(self, sequences: Sequence, maxlen: int, batch_size: int, min_cut: int = 4, seed: int = 0,
                 num_batches: Optional[int] = None):
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
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size: Optional[int] = None, rng: Optional[np.random.Generator] = None) -> Batch:
        b = batch_size or self.batch_size
        rng = rng or self.rng
        u = rng.integers(0, self.n_users, size=b)
        k = rng.integers(self.min_cut, self.lengths[u])  # uniform in [min_cut, len)
        ends = self.offsets[u] + k
        target = self.flat[ends]
        hist, mask = _windows(self.flat, ends, np.minimum(k, self.maxlen), self.maxlen)
        return hist, mask, target

    def _stream_rng(self) -> np.random.Generator:
        torch = sys.modules.get("torch")
        if torch is not None:
            info = torch.utils.data.get_worker_info()
            if info is not None and info.num_workers > 1:
                return np.random.default_rng([int(self.seed), int(info.id)])
        return self.rng

    def __iter__(self) -> Iterator[Batch]:
        rng = self._stream_rng()
        n = 0
        while self.num_batches is None or n < self.num_batches:
            yield self.sample(rng=rng)
            n += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless TrainSampler has no length (pass num_batches=)")
        return self.num_batches


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
        flat, offsets, lens = _flatten(hs)
        n = np.minimum(lens, maxlen)
        hist, mask = _windows(flat, offsets[1:], n, maxlen)
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
