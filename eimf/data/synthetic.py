"""A synthetic catalogue with planted structure, for scale work and for tests without licensed data.

``synthesize(out, users=U, items=N, interactions=M, seed=S)`` writes, in the layout ``data.dataset=custom`` reads
(:func:`custom_overrides` gives the settings), so that it goes through the same ingestion as real logs:

- ``items.parquet``: ``item_id``, ``title``. Items fall into ``clusters`` topics; a title names its topic
  ("vintage jazz records #1234"), so a text encoder or the metadata annotator can recover the topics.
- ``interactions/part-*.parquet``: ``user_id``, ``item_id``, ``timestamp``, written in blocks of users of at most
  about ``block_interactions`` rows, so that memory is bounded by the block, not by M (2.3 GB peak RSS for 10M
  interactions over 1M items with 2M-row blocks, 43 s on 2 cores).

The structure: items have Zipf popularity (exponent ``zipf``) within and across topics; each user has
``interests`` latent topics, drawn by topic popularity; a user's sequence stays on its current topic with
probability ``stickiness`` and otherwise switches to another of its topics, so the next item is predictable
from the history, by topic, beyond popularity. Sequence lengths are geometric around M/U, at least ``min_len``
(so the 5-core keeps almost everyone). Everything is a function of ``seed``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import pandas as pd

ADJECTIVES = ("vintage", "modern", "wild", "quiet", "urban", "tiny", "golden", "dark", "bright", "classic",
              "organic", "electric", "nordic", "tropical", "silent", "rapid")
NOUNS = ("jazz records", "hiking boots", "board games", "tea sets", "sci-fi novels", "yoga mats", "garden tools",
         "lipsticks", "drones", "cookbooks", "watches", "puzzles", "skateboards", "perfumes", "cameras", "candles")


@dataclass
class SynthSummary:
    out_dir: str
    users: int
    items: int
    interactions: int
    clusters: int
    files: List[str]


def topic_name(c: int) -> str:
    """A readable name per topic id (distinct for the first 256 topics, then numbered)."""
    name = f"{ADJECTIVES[c % len(ADJECTIVES)]} {NOUNS[(c // len(ADJECTIVES)) % len(NOUNS)]}"
    return name if c < len(ADJECTIVES) * len(NOUNS) else f"{name} {c // (len(ADJECTIVES) * len(NOUNS))}"


def synthesize(out_dir: str, users: int, items: int, interactions: int, seed: int = 0, clusters: int = 0,
               interests: int = 3, zipf: float = 1.05, stickiness: float = 0.8, min_len: int = 5,
               block_users: int = 200_000, block_interactions: int = 2_000_000) -> SynthSummary:
    if users < 1 or items < 2 or interactions < users * min_len:
        raise ValueError(f"synthetic data: need users >= 1, items >= 2 and interactions >= users * {min_len} "
                         f"(got users={users}, items={items}, interactions={interactions})")
    rng = np.random.default_rng(seed)
    clusters = clusters or int(np.clip(items // 200, 2, 5000))
    os.makedirs(os.path.join(out_dir, "interactions"), exist_ok=True)

    # items: topic and popularity; cdf per topic laid end to end in [c, c + 1) for one vectorised searchsorted
    topic = rng.integers(0, clusters, items)
    pop = 1.0 / rng.permutation(np.arange(1, items + 1)) ** zipf
    order = np.lexsort((-pop, topic))  # items grouped by topic, most popular first
    topic_sorted, pop_sorted = topic[order], pop[order]
    sums = np.bincount(topic_sorted, weights=pop_sorted, minlength=clusters)
    before = np.cumsum(sums) - sums  # popularity of the topics before each one
    cdf = topic_sorted + (np.cumsum(pop_sorted) - before[topic_sorted]) / sums[topic_sorted]
    topic_pop = sums / sums.sum()  # a topic without items has 0 and is never drawn
    titles = [f"{topic_name(t)} #{i}" for i, t in enumerate(topic)]
    pd.DataFrame({"item_id": np.arange(items, dtype=np.int64), "title": titles}).to_parquet(
        os.path.join(out_dir, "items.parquet"), index=False)

    # lengths: min_len + geometric, scaled so that they sum to `interactions`
    extra = interactions - users * min_len
    lengths = min_len + rng.multinomial(extra, rng.dirichlet(np.ones(users) * 2.0)) if extra else \
        np.full(users, min_len)
    # blocks of users holding at most ~block_interactions rows (memory is ~800 bytes a row while a block is built)
    cuts = np.searchsorted(np.cumsum(lengths), np.arange(block_interactions, int(lengths.sum()), block_interactions))
    bounds = sorted(set(np.concatenate([[0], cuts + 1, np.arange(block_users, users, block_users), [users]])))
    bounds = [int(b) for b in bounds if b <= users]
    files = []
    for b, (u0, u1) in enumerate(zip(bounds[:-1], bounds[1:])):
        files.append(_write_block(out_dir, b, u0, u1, lengths[u0:u1], rng, clusters, topic_pop, interests,
                                  stickiness, cdf, order))
    return SynthSummary(out_dir, users, items, int(lengths.sum()), clusters, files)


def _write_block(out_dir, b, u0, u1, lengths, rng, clusters, topic_pop, interests, stickiness, cdf, order) -> str:
    n = u1 - u0
    k = min(interests, int((topic_pop > 0).sum()))
    step = max(1, 20_000_000 // clusters)  # bounded [users, topics] matrices
    user_topics = np.concatenate([_topics(rng, min(step, n - s), k, topic_pop) for s in range(0, n, step)])
    total = int(lengths.sum())
    owner = np.repeat(np.arange(n), lengths)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    # which of its k topics each interaction is on: a sticky chain, switching with probability 1 - stickiness
    switch = rng.random(total) > stickiness
    switch[first] = True
    choice = rng.integers(0, k, total)
    last_switch = np.maximum.accumulate(np.where(switch, np.arange(total), 0))
    slot = choice[last_switch]
    t = user_topics[owner, slot]
    pos = np.searchsorted(cdf, t + rng.random(total), side="right")
    item = order[np.minimum(pos, len(order) - 1)]
    ts = 1_600_000_000 + (np.arange(total) - first[owner]) * 60
    path = os.path.join(out_dir, "interactions", f"part-{b:05d}.parquet")
    pd.DataFrame({"user_id": (u0 + owner).astype(np.int64), "item_id": item.astype(np.int64),
                  "timestamp": ts.astype(np.int64)}).to_parquet(path, index=False)
    return path


def _topics(rng, n, k, p):
    """k distinct topics per user drawn by popularity without replacement (Gumbel top-k)."""
    with np.errstate(divide="ignore"):
        g = np.log(p)[None, :] - np.log(-np.log(rng.random((n, len(p)))))
    return np.argpartition(-g, k - 1, axis=1)[:, :k]


def custom_overrides(out_dir: str) -> List[str]:
    """The config overrides that read a synthesized folder through the normal ingestion."""
    return ["data.dataset=custom", f"data.interactions={os.path.join(out_dir, 'interactions')}",
            f"data.items={os.path.join(out_dir, 'items.parquet')}", "data.text_cols=[title]"]


def describe(s: SynthSummary) -> Dict[str, object]:
    return {"out_dir": s.out_dir, "users": s.users, "items": s.items, "interactions": s.interactions,
            "clusters": s.clusters, "files": len(s.files)}
