"""The text map: an item's row in a trained item table, predicted from its text alone (new items, cold start).

A ridge regression, fitted after training on the warm items: ``row ~= text_embedding @ weight + bias``, with
``text_embedding`` the item's text through the sentence encoder (unit rows, ``eimf.semantic.encoder``). A new item
then gets a row, and a place in the index, the day it arrives, with no retraining (``eimf items add``).

Why a map fitted after training, and ridge: it needs nothing from training (any backbone, any table, sharded or
not), its fit is one pass over the rows (``X^T X`` is ``D x D`` whatever the catalogue's size, so the table is read
in blocks and never whole), and its penalty is chosen on items held out of the fit, so it cannot overfit the rare
items' noisy rows. docs/cold_start.md measures it against the baselines.

Items are weighted by ``log1p(count)`` in the fit (``weighting="log_count"``): a rare item's row has seen few
updates and is mostly its random init, which no text can predict; "uniform" weighs every item alike.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

#: Ridge penalties tried, relative to the mean diagonal of the weighted ``X^T X`` (so they mean the same at any
#: catalogue size); the one with the best held-out cosine is kept.
ALPHAS = (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
#: Percentiles of the trained rows' norms kept in ``fit["row_norms"]``: a mapped row is the conditional mean of
#: the rows, so it is short; :meth:`TextMap.apply` can stretch it to one of them (a new item's reach).
NORM_PERCENTILES = (10, 25, 50, 75, 90)
#: The stretch new items get by default: the median trained norm. Chosen on Beauty's VALID users (docs/cold_start.md):
#: the same ranking of the new items among themselves at any percentile, and the best whole-catalogue recall;
#: higher percentiles reach the new items more often at a cost to the warm targets.
DEFAULT_NORM_PERCENTILE = 50
_FIT = "fit"  # apply()'s default: the stretch recorded in the fit
WEIGHTINGS = ("log_count", "uniform")


@dataclass
class TextMap:
    """``rows = text_embeddings @ weight + bias``: ``weight`` ``[D_text, dim]``, ``bias`` ``[dim]`` (float32)."""

    weight: np.ndarray
    bias: np.ndarray
    #: the sentence encoder whose embeddings it maps (``semantic.encoder``); new texts must go through the same one
    encoder: str
    #: how it was fitted: ``alpha`` (relative), ``weighting``, ``items`` fitted on, ``heldout_items`` and their
    #: ``heldout_cosine`` (mean cosine between predicted and trained rows at the kept alpha), the cosine per alpha
    fit: dict = field(default_factory=dict)

    @property
    def text_dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def apply(self, text_embeddings: np.ndarray, norm_percentile=_FIT) -> np.ndarray:
        """Rows ``[M, dim]`` float32 for ``[M, D_text]`` text embeddings. ``norm_percentile`` (one of
        :data:`NORM_PERCENTILES`): each row stretched to that percentile of the trained rows' norms; None: as
        mapped (short: the conditional mean); default: the fit's ``norm_percentile``."""
        if norm_percentile == _FIT:
            norm_percentile = self.fit.get("norm_percentile")
        x = np.asarray(text_embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.text_dim:
            raise ValueError(f"text map: embeddings of shape {x.shape}, expected [M, {self.text_dim}] "
                             f"(from the encoder {self.encoder!r})")
        rows = x @ self.weight + self.bias
        if norm_percentile is not None:
            norms = self.fit.get("row_norms", {})
            if str(norm_percentile) not in norms:
                raise ValueError(f"text map: no {norm_percentile}th percentile of the row norms (has {sorted(norms)})")
            rows *= float(norms[str(norm_percentile)]) / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return rows.astype(np.float32)

    def to_arrays(self) -> dict:
        """The map as plain arrays and a JSON-able dict (eimf.formats.model_folder stores them)."""
        return {"weight": self.weight, "bias": self.bias, "encoder": self.encoder, "fit": self.fit}

    @classmethod
    def from_arrays(cls, d: dict) -> "TextMap":
        return cls(np.asarray(d["weight"], dtype=np.float32), np.asarray(d["bias"], dtype=np.float32),
                   str(d["encoder"]), dict(d.get("fit") or {}))


# A source of (item ids, text embeddings [b, D], rows [b, dim], counts [b]) blocks over the warm items with text.
Blocks = Callable[[], Iterable[Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]


def fit_text_map(blocks: Blocks, encoder: str, alphas: Sequence[float] = ALPHAS, weighting: str = "log_count",
                 heldout: float = 0.1, seed: int = 0,
                 norm_percentile: Optional[int] = DEFAULT_NORM_PERCENTILE) -> TextMap:
    """Fit the ridge map from ``blocks`` (called three times; see :data:`Blocks`): a first pass gathers the
    normal equations of the fit items, a second scores every alpha on the held-out items (a fixed-seed ``heldout``
    share of the items, by id), and a third refits the kept alpha on every item and reads the rows' norms.
    ``norm_percentile``: the stretch :meth:`TextMap.apply` gives by default (None: none). Memory: ``D x D`` and
    one norm per item."""
    if norm_percentile is not None and norm_percentile not in NORM_PERCENTILES:
        raise ValueError(f"text map: norm_percentile {norm_percentile}, expected one of {NORM_PERCENTILES} or None")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"text map: weighting {weighting!r}, expected one of {WEIGHTINGS}")

    def is_heldout(ids: np.ndarray) -> np.ndarray:  # a hash of the id, so every pass agrees without a list
        return (np.random.default_rng([seed]).random(1)[0] + ids * 0.6180339887498949) % 1.0 < heldout

    def normal_equations(select, norms: Optional[list] = None):
        """The weighted sums of the selected items; ``norms``: also collect every selected row's norm."""
        xtx = xty = sx = sy = None
        total = 0.0
        n = 0
        for ids, x, y, counts in blocks():
            keep = select(np.asarray(ids))
            if not keep.any():
                continue
            x = np.asarray(x, dtype=np.float64)[keep]
            y = np.asarray(y, dtype=np.float64)[keep]
            w = _weights(np.asarray(counts)[keep], weighting)
            if norms is not None:
                norms.append(np.linalg.norm(y, axis=1))
            if xtx is None:
                xtx, xty = np.zeros((x.shape[1],) * 2), np.zeros((x.shape[1], y.shape[1]))
                sx, sy = np.zeros(x.shape[1]), np.zeros(y.shape[1])
            xw = x * w[:, None]
            xtx += xw.T @ x
            xty += xw.T @ y
            sx += xw.sum(axis=0)
            sy += (y * w[:, None]).sum(axis=0)
            total += float(w.sum())
            n += len(x)
        return xtx, xty, sx, sy, total, n

    def solve(eq, alpha_rel: float):
        xtx, xty, sx, sy, total, _ = eq
        mx, my = sx / total, sy / total
        cxx = xtx - total * np.outer(mx, mx)  # centred: the bias is not penalised
        cxy = xty - total * np.outer(mx, my)
        ridge = alpha_rel * float(np.trace(cxx)) / len(cxx)
        weight = np.linalg.solve(cxx + ridge * np.eye(len(cxx)), cxy)
        return weight, my - mx @ weight

    fit_eq = normal_equations(lambda ids: ~is_heldout(ids))
    if fit_eq[0] is None or fit_eq[5] < 2:
        raise ValueError("text map: fewer than 2 items with text and a trained row to fit on")
    scores, n_heldout = _heldout_cosines(blocks, is_heldout, {float(a): solve(fit_eq, a) for a in alphas})
    best = max(scores, key=scores.get) if n_heldout else float(alphas[len(alphas) // 2])
    norms: list = []
    weight, bias = solve(normal_equations(lambda ids: np.ones(len(ids), dtype=bool), norms), best)
    norms = np.concatenate(norms)
    fit = {"alpha": best, "weighting": weighting, "items": int(fit_eq[5]) + int(n_heldout),
           "heldout_items": int(n_heldout), "heldout_cosine": float(scores[best]),
           "heldout_cosine_by_alpha": {str(a): float(c) for a, c in scores.items()},
           "norm_percentile": norm_percentile,
           "row_norms": {str(p): float(v) for p, v in zip(NORM_PERCENTILES, np.percentile(norms, NORM_PERCENTILES))}}
    log.info("text map: ridge alpha %g (of %s) on %d items, held-out cosine %.3f", best, list(alphas),
             fit["items"], fit["heldout_cosine"])
    return TextMap(weight.astype(np.float32), bias.astype(np.float32), encoder, fit)


def _weights(counts: np.ndarray, weighting: str) -> np.ndarray:
    return np.log1p(np.maximum(counts.astype(np.float64), 0)) if weighting == "log_count" else np.ones(len(counts))


def _heldout_cosines(blocks: Blocks, is_heldout, solutions: dict) -> Tuple[dict, int]:
    """For each ``alpha -> (weight, bias)``, the weighted mean cosine between the predicted and the trained rows of
    the held-out items, all in one pass; and the number of held-out items."""
    num = dict.fromkeys(solutions, 0.0)
    den = 0.0
    n = 0
    for ids, x, y, counts in blocks():
        keep = is_heldout(np.asarray(ids))
        if not keep.any():
            continue
        x = np.asarray(x, dtype=np.float64)[keep]
        y = np.asarray(y, dtype=np.float64)[keep]
        y_norm = np.linalg.norm(y, axis=1)
        w = _weights(np.asarray(counts)[keep], "log_count")
        for alpha, (weight, bias) in solutions.items():
            pred = x @ weight + bias
            cos = (pred * y).sum(1) / np.maximum(np.linalg.norm(pred, axis=1) * y_norm, 1e-12)
            num[alpha] += float((cos * w).sum())
        den += float(w.sum())
        n += int(keep.sum())
    return {a: (v / den if den else float("nan")) for a, v in num.items()}, n


def table_blocks(text_embeddings: np.ndarray, rows_of: Callable[[np.ndarray], np.ndarray], counts: np.ndarray,
                 ids: Optional[np.ndarray] = None, block: int = 65_536) -> Blocks:
    """:data:`Blocks` over items ``ids`` (default: every item 1..N whose text embedding is not zero).
    ``text_embeddings``: ``[N + 1, D]`` (memory-mapped is fine); ``rows_of(ids)``: their trained rows;
    ``counts``: ``[N + 1]`` training interactions per item."""
    if ids is None:
        ids = np.array([], dtype=np.int64)
        parts = []
        for start in range(1, len(text_embeddings), block):
            chunk = np.asarray(text_embeddings[start:start + block])
            parts.append(start + np.flatnonzero(np.abs(chunk).sum(axis=1) > 0))
        ids = np.concatenate(parts) if parts else ids
    ids = np.asarray(ids, dtype=np.int64)

    def gen():
        for start in range(0, len(ids), block):
            part = ids[start:start + block]
            yield part, np.asarray(text_embeddings[part]), rows_of(part), np.asarray(counts)[part]
    return gen
