"""Recommendations from a model folder, in raw item ids: the core that the CLI, MLflow and Ray Serve share.

A request is a mapping ``{"history": [raw item id, ...], "k": 10, "exclude_seen": true}`` (``k`` and
``exclude_seen`` optional; the contract is :mod:`eimf.serving.schema`). :meth:`Recommender.parse` validates one
request there, then against the catalogue, and maps its ids, so that a bad request fails alone; :meth:`Recommender.answer` serves a batch of parsed requests with one forward pass and one
index search. The answer per request:

``items`` (raw ids, best first), ``scores`` (max over interests of the inner product), ``interests`` (which
interest retrieved each item), ``titles`` (the item text), ``interest_labels`` (EIMF models: the nearest annotated
phrase per interest; empty otherwise), ``unknown_ids`` (history ids not in the catalogue, ignored) and
``history_used`` (known ids fed to the model: the last ``maxlen``).

New items (``eimf items add``, eimf.serving.new_items) are ranked with the rest, by their text-mapped rows, and
those rarely score into a whole-catalogue top list. ``new_item_slots`` (default: what the latest addition set, with
``eimf items add --slots``) reserves that many places of each answer for the best new items the user has not seen
(:func:`eimf.evaluation.retrieval.reserve_slots`), until a retraining learns them.

A history that is empty, or whose ids are all unknown, is an error (:class:`RequestError`), not a popularity
fallback: a caller that wants one for cold users knows better than a model which list to show them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from eimf.data.sampling import last_items
from eimf.evaluation.retrieval import reserve_slots, subset_topn
from eimf.formats.model_folder import reserved_slots
from eimf.serving.explain import label_interests
from eimf.serving.folder import ModelFolder
from eimf.serving.schema import DEFAULT_K, RequestError, validate_request


@dataclass
class Query:
    #: known internal ids, oldest first (all of them: exclusion uses the whole history)
    ids: np.ndarray
    k: int
    exclude_seen: bool
    unknown: int


class Recommender:
    def __init__(self, folder: ModelFolder, default_k: int = DEFAULT_K, exclude_seen: bool = True,
                 new_item_slots: Optional[int] = None):
        if folder.index is None:
            raise ValueError("a Recommender needs the model folder's retrieval index (ModelFolder.load(index=True))")
        self.folder = folder
        self.model = folder.model.eval()
        self.maxlen = int(folder.cfg.model.maxlen)
        self.n_items = folder.n_items
        self.default_k = min(default_k, self.n_items)
        self.exclude_seen = exclude_seen
        self._raw = folder.items["raw_id"].astype(str).to_numpy()
        self._titles = folder.items["text"].astype(str).to_numpy()
        self._lookup = pd.Index(self._raw)  # hash index: raw id -> position (item id - 1)
        self._table = self.model.item_embeddings().detach().float().cpu().numpy()
        added = folder.added_items or []
        self.is_new = np.zeros(self.n_items + 1, dtype=bool)
        for record in added:
            self.is_new[int(record["first_item"]):int(record["first_item"]) + int(record["items"])] = True
        self.new_item_slots = reserved_slots(added) if new_item_slots is None else int(new_item_slots)
        if self.new_item_slots < 0:
            raise ValueError(f"new_item_slots must be 0 or more, got {self.new_item_slots}")
        # the new items as a catalogue of their own (row 0 padding), searched exactly beside the index
        self._new_ids = np.flatnonzero(self.is_new)
        self._new_table = np.concatenate([np.zeros((1, self._table.shape[1]), np.float32),
                                          self._table[self._new_ids]])

    @classmethod
    def load(cls, path: str, threads: Optional[int] = None, **kw) -> "Recommender":
        return cls(ModelFolder.load(path, threads=threads), **kw)

    # ------------------------------------------------------------------------------------------ parse
    def parse(self, request: Any) -> Query:
        """One request (a mapping or a :class:`RecommendRequest`) validated by the shared schema, then against
        the catalogue: its ids mapped, ``k`` at most the number of items."""
        req = validate_request(request)
        pos = self._lookup.get_indexer(req.history)
        known = pos[pos >= 0] + 1
        unknown = int((pos < 0).sum())
        if len(known) == 0:
            raise RequestError(f"none of the {len(req.history)} ids is in the catalogue (e.g. {req.history[0]!r:.40}); "
                               "there is no popularity fallback", "history")
        k = self.default_k if req.k is None else req.k
        if k > self.n_items:
            raise RequestError(f"{k} is more than the catalogue's {self.n_items} items", "k")
        exclude = self.exclude_seen if req.exclude_seen is None else req.exclude_seen
        return Query(ids=known.astype(np.int64), k=k, exclude_seen=exclude, unknown=unknown)

    # ----------------------------------------------------------------------------------------- answer
    @torch.no_grad()
    def answer(self, queries: List[Query]) -> List[Dict[str, Any]]:
        if not queries:
            return []
        hist, mask = last_items([q.ids for q in queries], self.maxlen)  # the window training and evaluation use
        interests = self.model.interests(torch.from_numpy(hist), torch.from_numpy(mask))
        x = interests.float().numpy()
        exclude = [q.ids if q.exclude_seen else np.zeros(0, np.int64) for q in queries]
        any_exclude = any(q.exclude_seen for q in queries)
        ids, scores = self.folder.index.search_multi(x, max(q.k for q in queries),
                                                     exclude=exclude if any_exclude else None)
        if self.new_item_slots and len(self._new_ids):
            ids, scores = self._with_new_items(x, ids, scores, exclude, queries)
        labels = self._labels(interests)
        out = []
        for i, q in enumerate(queries):
            row = ids[i, : q.k]
            row_scores = scores[i, : q.k]
            keep = row > 0  # fewer than k left after exclusion
            row, row_scores = row[keep], row_scores[keep]
            which = np.einsum("kd,nd->nk", x[i], self._table[row]).argmax(axis=1) if len(row) else row
            out.append({
                "items": self._raw[row - 1].tolist(), "scores": row_scores.astype(float).tolist(),
                "interests": which.astype(int).tolist(), "titles": self._titles[row - 1].tolist(),
                "interest_labels": labels[i] if labels else [], "unknown_ids": q.unknown,
                "history_used": int(min(len(q.ids), self.maxlen)),
            })
        return out

    def _with_new_items(self, x, ids, scores, exclude, queries):
        """Each row's top list with its reserved places for new items: an exact search over the new items alone
        (they are few next to the catalogue), merged per row at that row's ``k``."""
        slots = min(self.new_item_slots, len(self._new_ids))
        top, top_scores = subset_topn(self._new_table, self._new_ids, x, slots, exclude=exclude)
        out_ids, out_scores = ids.copy(), scores.copy()
        for i, q in enumerate(queries):  # rows have their own k: the reserve counts within each
            row_ids, row_scores = reserve_slots(ids[i:i + 1, :q.k], scores[i:i + 1, :q.k], top[i:i + 1],
                                                top_scores[i:i + 1], self.is_new, slots)
            out_ids[i, :q.k], out_scores[i, :q.k] = row_ids[0], row_scores[0]
        return out_ids, out_scores

    def recommend(self, requests: Sequence[Any]) -> List[Dict[str, Any]]:
        """Parse and answer a batch; the first bad request raises :class:`RequestError` naming its position."""
        queries = []
        for i, r in enumerate(requests):
            try:
                queries.append(self.parse(r))
            except RequestError as e:
                raise (e.prefixed(f"request {i}") if len(requests) > 1 else e) from None
        return self.answer(queries)

    def _labels(self, interests: torch.Tensor) -> Optional[List[List[str]]]:
        f = self.folder
        if f.head is None or f.phrases is None:
            return None

        return [[names[0][0] for names in user] for user in label_interests(f.head, interests, f.phrases, topk=1)]

