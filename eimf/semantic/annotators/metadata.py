"""The offline, no-LLM baseline annotator (docs/design.md section 4, point 4, ``metadata``).

For one user, the items listed in the prompt are grouped by their text embeddings and each group is named
by the words its items share:

1. **Groups.** Ward agglomerative clustering (scipy) of the L2-normalised item-text embeddings, cut into
   ``min(K, n_items // min_group_size)`` groups (deterministic: no random start). The items of a group under
   ``min_group_size`` join the kept group whose mean is nearest. Groups are ordered by size (largest first).
2. **Terms.** An item text ``"Title (1999) | Genre, Genre"`` (MovieLens; Amazon's ``"title | categories"``)
   gives its categories (after the first ``" | "``, comma-separated) and its year; a text without categories
   (Amazon titles) gives its informative title words (>= 3 letters, not a stopword or a unit; shown in their
   most frequent spelling, so brands keep their case).
3. **Name.** Terms are scored per group by ``share_in_group * (1 + log(n_user / count_user))``: how many of
   the group's items carry the term, boosted when the term is rarer in the user's whole list (a category
   every item carries does not tell groups apart). The name is the best term, joined by the next one carried
   by at least half of the group ("Comedy & Romance"); a group whose terms equal an earlier group's takes the
   best term no earlier name used instead of its second. When no term is shared by two items the name says
   so: ``"Assorted: a, b, c"``.
4. **Description** (at most 200 characters): the three most frequent terms with their shares, the decades
   of the group when the texts carry years, and the two titles nearest the group mean. **Evidence**: the (at
   most 10) items nearest the group mean.

The answer goes through the same JSON validation as an LLM answer. Token counts are 0.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from eimf.semantic.annotators.base import AnnotationRequest, Annotator, Generation
from eimf.semantic.encoder import SemanticEncoder
from eimf.semantic.prompts import DESCRIPTION_MAX, EVIDENCE_MAX, NAME_MAX, extract_data_block

log = logging.getLogger(__name__)

METADATA_VERSION = "m1"

STOPWORDS = frozenset("""
a about after all also an and any are as at be been being best but by can for from has have in into is it its
just more most new no not of off on one only or other our out over per plus pro so some than that the their
them then there these this those through to too top two up use very was we were what when which while will
with without you your yours
women woman womens men man mens unisex girls boys kids kid adult adults lady ladies
oz ml fl ounce ounces fluid count ct pack packs pcs pc piece pieces set sets size inch inches lb lbs pound gram
grams mg kg cm mm liter litre gallon value box boxed bottle bottles tube jar refill travel mini full large small
medium extra ultra super original formula edition collection item product products brand new each total
color colors colour shade
""".split())

_YEAR = re.compile(r"\((\d{4})\)\s*$")
_WORD = re.compile(r"[^\W\d_][\w'\-]*", re.UNICODE)


def split_item_text(text: str) -> Tuple[str, List[str], Optional[int]]:
    """``"Title (1999) | A, B"`` -> ``("Title (1999)", ["A", "B"], 1999)``."""
    parts = [p.strip() for p in str(text).split(" | ")]
    title = parts[0]
    cats = []
    for p in parts[1:]:
        cats.extend(c.strip().strip("[]'\"").strip() for c in p.split(","))
    cats = [c for c in cats if c]
    m = _YEAR.search(title)
    year = int(m.group(1)) if m and 1800 <= int(m.group(1)) <= 2100 else None
    return title, list(dict.fromkeys(cats)), year


def title_words(title: str) -> List[str]:
    """Informative lower-case words of a title, in order, without repeats."""
    return [w.lower() for w in _title_tokens(title)]


def _title_tokens(title: str) -> List[str]:
    title = _YEAR.sub("", title)
    out, seen = [], set()
    for w in _WORD.findall(title):
        w = w.strip("'-")
        low = w.lower()
        if len(w) >= 3 and low not in STOPWORDS and not any(ch.isdigit() for ch in w) and low not in seen:
            seen.add(low)
            out.append(w)
    return out


def _terms(text: str) -> Tuple[List[str], bool, List[str]]:
    """Terms of one item, whether they are categories (True) or title words (False), and their surface forms."""
    title, cats, _ = split_item_text(text)
    if cats:
        return cats, True, cats
    tokens = _title_tokens(title)
    return [t.lower() for t in tokens], False, tokens


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1].rstrip() + "\u2026"


def group_items(emb: np.ndarray, n_groups: int) -> np.ndarray:
    """Ward clustering of unit rows into at most ``n_groups`` labels 0..g-1 (deterministic)."""
    n = len(emb)
    if n <= 1 or n_groups <= 1:
        return np.zeros(n, dtype=np.int64)

    z = linkage(np.asarray(emb, dtype=np.float64), method="ward")
    labels = fcluster(z, t=min(n_groups, n), criterion="maxclust")
    _, labels = np.unique(labels, return_inverse=True)
    return labels.astype(np.int64)


def _groups(emb: np.ndarray, max_interests: int, min_group_size: int) -> List[np.ndarray]:
    """Item groups, largest first; items of groups under ``min_group_size`` join the nearest kept group."""
    n = len(emb)
    labels = group_items(emb, min(max_interests, max(1, n // max(1, min_group_size))))
    groups = [np.nonzero(labels == g)[0] for g in range(labels.max() + 1)]
    groups.sort(key=lambda idx: (-len(idx), int(idx[0])))
    kept = [g for g in groups if len(g) >= min_group_size][:max_interests] or groups[:1]
    stray = np.setdiff1d(np.arange(n), np.concatenate(kept))
    if len(stray):
        means = np.stack([emb[g].mean(axis=0) for g in kept])
        nearest = np.argmax(emb[stray] @ means.T, axis=1)
        kept = [np.sort(np.concatenate([g, stray[nearest == j]])) for j, g in enumerate(kept)]
    return kept


def describe_groups(item_texts: Sequence[str], emb: np.ndarray, max_interests: int,
                    min_group_size: int = 2) -> List[dict]:
    """Interests ``[{"name", "description", "evidence"}]`` for one user's listed items (see module doc)."""
    n = len(item_texts)
    if n == 0:
        return []
    emb = np.asarray(emb, dtype=np.float32)
    groups = _groups(emb, max_interests, min_group_size)
    parsed = [_terms(t) for t in item_texts]
    user_counts = Counter(t for terms, _, _ in parsed for t in terms)
    surface: Dict[str, Counter] = {}
    for terms, _, forms in parsed:
        for t, f in zip(terms, forms):
            surface.setdefault(t, Counter())[f] += 1

    def show(term: str) -> str:
        form = surface[term].most_common(1)[0][0]
        return form[:1].upper() + form[1:] if form.islower() else form

    interests, used = [], []
    for idx in groups:
        size = len(idx)
        counts = Counter(t for i in idx for t in parsed[i][0])
        is_cat = sum(parsed[i][1] for i in idx) * 2 >= size
        score = {t: (counts[t] / size) * (1 + math.log(n / user_counts[t])) for t in counts}
        center = emb[idx].mean(axis=0)
        order = idx[np.argsort(-(emb[idx] @ center), kind="stable")]  # most central item first
        first_seen: Dict[str, int] = {}
        for r, i in enumerate(order):
            for t in parsed[i][0]:
                first_seen.setdefault(t, r)
        # ties (common with short titles) go to the terms of the most central items
        scored = sorted(counts, key=lambda t: (-score[t], -counts[t], first_seen[t], t))
        titles = [split_item_text(item_texts[i])[0] for i in idx]
        if scored and (counts[scored[0]] >= 2 or size == 1):
            chosen = [scored[0]]
            second = next((t for t in scored[1:] if counts[t] * 2 >= size), None)
            if second is not None:
                chosen.append(second)
            if set(chosen) in used:  # the same words as an earlier group: add what sets this one apart
                other = next((t for t in scored if t not in chosen and all(t not in u for u in used)), None)
                chosen = [chosen[0], other] if other is not None else chosen
            used.append(set(chosen))
            name = " & ".join(show(t) for t in chosen)
        elif scored:  # nothing shared by two items: say so
            used.append(set(scored[:3]))
            name = "Assorted: " + ", ".join(show(t) for t in scored[:3])
        else:
            name = _clip(titles[0], NAME_MAX)

        facts = sorted(counts, key=lambda t: (-counts[t], -score[t], first_seen[t], t))[:3]
        shares = ", ".join(f"{show(t)} {counts[t] / size:.0%}" for t in facts)
        desc = f"{size} {'titles' if is_cat else 'products'}" + (f": {shares}" if shares else "")
        years = [y for y in (split_item_text(item_texts[i])[2] for i in idx) if y is not None]
        if years:
            decades = Counter(y // 10 * 10 for y in years)
            d, c = decades.most_common(1)[0]
            desc += f"; mostly {d}s" if c * 2 >= len(years) else f"; {min(decades)}s-{max(decades)}s"
        examples = "; ".join(_YEAR.sub("", split_item_text(item_texts[i])[0]).strip() for i in order[:2])
        desc = _clip(f"{desc}; e.g. {examples}", DESCRIPTION_MAX)
        evidence = sorted(int(i) + 1 for i in order[:EVIDENCE_MAX])
        interests.append({"name": _clip(name, NAME_MAX), "description": desc, "evidence": evidence})
    names = [it["name"] for it in interests]
    for j, nm in enumerate(names):  # exact duplicates left: number them
        if names.index(nm) != j:
            interests[j]["name"] = _clip(f"{nm} ({j + 1})", NAME_MAX)
    return interests


class MetadataAnnotator(Annotator):
    """No LLM: groups of the user's items by text embedding, named by shared category/title words.

    ``embed`` maps a list of texts to ``[M, d]`` vectors (default: the packaged sentence encoder, loaded on
    first use). Embeddings are memoised by text, so a catalogue item is embedded once per annotator.
    """

    kind = "metadata"

    def __init__(self, embed: Optional[Callable[[List[str]], np.ndarray]] = None, encoder_name: Optional[str] = None,
                 min_group_size: int = 2, max_attempts: int = 1):
        super().__init__(max_attempts=max_attempts)
        self._embed = embed
        self.encoder_name = encoder_name or ("custom" if embed is not None else "all-MiniLM-L6-v2")
        self.min_group_size = int(min_group_size)
        self._memo: Dict[str, np.ndarray] = {}

    @property
    def model_id(self) -> str:
        return f"metadata-{METADATA_VERSION}:{self.encoder_name}:min{self.min_group_size}"

    def _embedder(self):
        if self._embed is None:
            self._embed = SemanticEncoder(self.encoder_name if self.encoder_name != "custom" else "all-MiniLM-L6-v2")
        return self._embed

    def _vectors(self, texts: Sequence[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if new:
            v = np.asarray(self._embedder()(list(new)), dtype=np.float32)
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            self._memo.update(zip(new, v))
        return np.stack([self._memo[t] for t in texts]) if texts else np.zeros((0, 1), np.float32)

    def generate(self, requests: Sequence[AnnotationRequest], attempt: int) -> List[Generation]:
        texts_per = []
        for r in requests:
            texts = r.item_texts
            if texts is None:
                texts = [e["item"] for e in extract_data_block(r.messages)]
            texts_per.append(list(texts))
        self._vectors([t for ts in texts_per for t in ts])  # one batched call for the whole batch
        out = []
        for r, texts in zip(requests, texts_per):
            try:
                interests = describe_groups(texts, self._vectors(texts), r.max_interests, self.min_group_size)
                out.append(Generation(text=json.dumps({"interests": interests}, ensure_ascii=False)))
            except Exception as e:  # recorded as a failed attempt, never raised past the batch
                log.exception("metadata annotator failed for user %s", r.user)
                out.append(Generation(text=None, error=f"{type(e).__name__}: {e}"))
        return out
