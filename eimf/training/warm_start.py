"""Warm start (``pipeline.from_model``): a training run that starts from an earlier model instead of from scratch.

What is carried from the source model folder:

* the interest extractor's weights (every backbone weight but the item table), copied as they are: the source must
  be the same backbone with the same ``model`` shape settings, or the run stops before it starts;
* the item rows, matched by raw id: prepared datasets number their items anew at each preparation (by frequency),
  so an item's row goes from its old id to its new one through ``items.parquet``'s ``raw_id``;
* for items new in this data: the source's text map (eimf.models.text_map) gives a row from the item's text, when the
  folder has a map and the item has text; any other item keeps the usual init (random, or ``model.item_init=text``).

Not carried: the EIMF head (P, g, h) starts anew, as does every optimizer state; the step count starts at 0.

:func:`plan_warm_start` reads the source folder once, on the driver, into a :class:`WarmStart`: the dense weights,
``old_of_new`` (the old id of each new id, 0 for none), the old table in blocks of :data:`ROW_BLOCK` rows and the
mapped rows of the new items. The blocks are handed over through ``put`` (``ray.put`` for Ray Train workers), so no
process but the reader holds the old table, and a sharded source's row blocks are read memory-mapped, one at a time.
:func:`apply_warm_start` runs in each worker after the model is built: the whole-table path fills the whole table,
the row-sharded path (eimf.training.sharded) only the rows this worker owns, fetching only the old blocks that hold
their sources.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import torch

from eimf.config import Config, ConfigError
from eimf.formats import model_folder as fmt
from eimf.formats.prepared import read_split
from eimf.models import build_model
from eimf.models.text_map import TextMap
from eimf.semantic.encoder import SemanticEncoder

log = logging.getLogger(__name__)
#: A warm start that loses more than this share of the source's catalogue says so (plan_warm_start): on Beauty a
#: 15 % window with a tenth of the older log replayed kept 46 items after the 5-core, where the whole log up to the
#: same day keeps 5,926 (docs/cold_start.md).
GONE_WARNING_SHARE = 0.2

#: Rows of the old table per block handed to the workers (a worker holds one block at a time while it fills).
ROW_BLOCK = 1 << 16
#: Texts encoded per call for the new items.
ENCODE_CHUNK = 4096
#: ``model`` settings that change the extractor's weights or what they mean: they must match the source's.
SHAPE_SETTINGS = ("backbone", "dim", "num_interests", "maxlen")
#: The table's weight in a backbone's state dict (eimf.models.base).
TABLE_KEY = "item_emb.weight"


@dataclass
class WarmStart:
    """What :func:`apply_warm_start` needs, built by :func:`plan_warm_start`; ``old_blocks`` and ``old_of_new``
    hold whatever ``put`` returned (arrays, or Ray object refs)."""

    #: the configured source (``pipeline.from_model``) and what it was read as (a version URI or a folder)
    source: str
    resolved: str
    #: the extractor's weights (the backbone's state dict without the item table)
    dense: Dict[str, torch.Tensor]
    #: ``[N + 1]`` int64: the source's id of each item id here, 0 where the source has none (row 0 too)
    old_of_new: Any
    #: ``(first old id, end old id, rows [end - first, d])`` covering the source's ids 0..N_old
    old_blocks: List[Tuple[int, int, Any]]
    #: new item ids (sorted) whose rows come from the source's text map, and those rows ``[M, d]``
    mapped_ids: np.ndarray
    mapped_rows: np.ndarray
    #: rows_matched, rows_text_map, rows_random, items, source_items, source_items_gone
    counts: Dict[str, int] = field(default_factory=dict)
    #: why new items got no mapped rows, or ""
    note: str = ""


def _fail(where: str, msg: str) -> ConfigError:
    return ConfigError(f"pipeline.from_model={where}: {msg}")


def check_compatible(source_cfg: Config, cfg: Config, dense: Dict[str, torch.Tensor], where: str) -> None:
    """The source's extractor loads into this run's backbone: same ``model`` shape settings, same weight names and
    shapes (checked against a one-item model, so nothing of the catalogue's size is built)."""
    diff = [f"model.{k} {getattr(source_cfg.model, k)!r} there, {getattr(cfg.model, k)!r} here"
            for k in SHAPE_SETTINGS if getattr(source_cfg.model, k) != getattr(cfg.model, k)]
    if diff:
        raise _fail(where, f"another model shape ({'; '.join(diff)}): a warm start copies the interest extractor "
                           f"as it is")
    want = {k: tuple(v.shape) for k, v in build_model(cfg.model, 1).state_dict().items() if k != TABLE_KEY}
    have = {k: tuple(v.shape) for k, v in dense.items()}
    if want != have:
        bad = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        raise _fail(where, f"its weights do not fit this backbone ({', '.join(bad[:5])})")


def match_items(new_raw: np.ndarray, old_raw: np.ndarray) -> np.ndarray:
    """``[N + 1]`` int64: for new ids 1..N (raw ids ``new_raw`` in id order), the old id of the same raw id in
    ``old_raw`` (old ids 1..N_old in order), 0 where there is none; entry 0 (padding) is 0."""
    pos = pd.Index(pd.array(old_raw, dtype="str")).get_indexer(pd.array(new_raw, dtype="str"))
    out = np.zeros(len(new_raw) + 1, dtype=np.int64)
    out[1:] = np.where(pos >= 0, pos + 1, 0)
    return out


def _old_blocks(folder: fmt.LocalFolder, put: Callable) -> Tuple[Dict[str, torch.Tensor], list, int]:
    """``(extractor weights, blocks of the old table through put, table dim)``: a sharded export's ``.npy`` row
    blocks memory-mapped, else the table out of ``model.pt``."""
    parts = [folder.local / p for p in folder.manifest.get("item_table", {}).get("parts", [])]
    if parts:
        state = torch.load(folder.local / fmt.WEIGHTS, map_location="cpu")
        sources = [np.load(p, mmap_mode="r") for p in parts]
    else:
        state = folder.state()
        sources = [state.pop(TABLE_KEY).float().numpy()]
    state.pop(TABLE_KEY, None)
    blocks, start, dim = [], 0, 0
    for src in sources:
        dim = int(src.shape[1])
        for lo in range(0, len(src), ROW_BLOCK):
            hi = min(lo + ROW_BLOCK, len(src))
            blocks.append((start + lo, start + hi, put(np.ascontiguousarray(src[lo:hi], dtype=np.float32))))
        start += len(src)
    if start != folder.n_items + 1:
        raise fmt.ModelFolderError(f"{folder.path}: an item table of {start} rows, its catalogue has "
                                   f"{folder.n_items} items")
    return state, blocks, dim


def plan_warm_start(folder_path: str, cfg: Config, data_path: str, source: str, resolved: Optional[str] = None,
                    put: Callable = np.asarray, encoder: Optional[Callable] = None) -> WarmStart:
    """Read the source model folder at ``folder_path`` (local or ``s3://``) against the prepared data at
    ``data_path`` (see the module doc). ``put`` stores each handed-over array (``ray.put`` for workers);
    ``encoder``: texts -> unit text embeddings, by default the sentence encoder the text map was fitted with."""
    where = resolved or source
    with fmt.open_local(folder_path) as folder:
        source_cfg = folder.config()
        old_items = folder.items()
        dense, blocks, dim = _old_blocks(folder, put)
        check_compatible(source_cfg, cfg, dense, where)
        raw_map = folder.text_map()
    items = read_split(data_path, "items").sort_values("item").reset_index(drop=True)
    old_of_new = match_items(items["raw_id"].astype(str).to_numpy(), old_items["raw_id"].astype(str).to_numpy())
    new_ids = np.flatnonzero(old_of_new[1:] == 0) + 1
    texts = items["text"].fillna("").astype(str).to_numpy()
    with_text = new_ids[np.array([bool(t.strip()) for t in texts[new_ids - 1]], dtype=bool)]
    mapped_ids, mapped_rows, note = np.array([], dtype=np.int64), np.zeros((0, dim), np.float32), ""
    if raw_map is None:
        note = "the source folder has no text map: new items keep the usual init"
    elif len(with_text):
        text_map = TextMap.from_arrays(raw_map)
        if text_map.dim != dim:
            raise _fail(where, f"its text map gives rows of {text_map.dim}, its table has {dim}")
        encode = encoder or SemanticEncoder(text_map.encoder).encode
        chunks = [text_map.apply(encode(list(texts[with_text[i:i + ENCODE_CHUNK] - 1])))
                  for i in range(0, len(with_text), ENCODE_CHUNK)]
        mapped_ids, mapped_rows = with_text.astype(np.int64), np.concatenate(chunks).astype(np.float32)
    n, matched = len(items), int((old_of_new > 0).sum())
    counts = {"items": n, "rows_matched": matched, "rows_text_map": int(len(mapped_ids)),
              "rows_random": n - matched - int(len(mapped_ids)), "source_items": int(len(old_items)),
              "source_items_gone": int(len(old_items)) - matched, "new_items_with_text": int(len(with_text))}
    log.info("warm start from %s: %d of %d rows matched by raw id, %d from the text map, %d the usual init%s",
             where, matched, n, counts["rows_text_map"], counts["rows_random"], f" ({note})" if note else "")
    if counts["source_items_gone"] > GONE_WARNING_SHARE * len(old_items):
        log.warning("warm start from %s: %d of the source's %d items are not in this data, so this model cannot "
                    "retrieve them: a training window (data.since) with a k-core (data.min_count=%d) keeps only the "
                    "items and users dense within it. Raise data.replay, or lower data.min_count, to keep the "
                    "catalogue", where, counts["source_items_gone"], len(old_items), cfg.data.min_count)
    return WarmStart(source=source, resolved=where, dense=dense, old_of_new=put(old_of_new), old_blocks=blocks,
                     mapped_ids=mapped_ids, mapped_rows=mapped_rows, counts=counts, note=note)


def fill_rows(rows: torch.Tensor, offset: int, plan: WarmStart, fetch: Callable = lambda x: x) -> int:
    """Overwrite the rows ``rows`` (global ids ``offset``..``offset + len - 1``) that the source gives: matched
    rows from the old blocks that hold them (each fetched once, one at a time), mapped rows of new items. Returns
    the rows written."""
    n = rows.shape[0]
    old = np.asarray(fetch(plan.old_of_new))[offset:offset + n]
    have = np.flatnonzero(old > 0)
    written = 0
    with torch.no_grad():
        if len(have):
            order = have[np.argsort(old[have], kind="stable")]
            old_sorted = old[order]
            for lo, hi, block in plan.old_blocks:
                a, b = np.searchsorted(old_sorted, [lo, hi])
                if a == b:
                    continue
                values = np.asarray(fetch(block))[old_sorted[a:b] - lo]  # a copy: the fetched block may be shared
                rows[torch.from_numpy(order[a:b]).to(rows.device)] = torch.from_numpy(values).to(rows.device,
                                                                                                   rows.dtype)
                written += b - a
        a, b = np.searchsorted(plan.mapped_ids, [offset, offset + n])
        if b > a:
            at = torch.from_numpy(plan.mapped_ids[a:b] - offset).to(rows.device)
            rows[at] = torch.from_numpy(plan.mapped_rows[a:b]).to(rows.device, rows.dtype)
            written += b - a
    return written


def apply_warm_start(model: torch.nn.Module, plan: WarmStart, fetch: Callable = lambda x: x) -> int:
    """Load the source's extractor into ``model`` and fill the item rows it holds: a backbone's whole table, or the
    rows this worker owns of a row-sharded one (``local_rows``). Call after the model's own init, before a resume's
    checkpoint load. Returns the rows written here."""
    with torch.no_grad():
        if hasattr(model, "local_rows"):  # eimf.training.sharded.ShardedItemModel: the table is not in the backbone
            model.backbone.load_state_dict(plan.dense)
            rows, offset = model.local_rows()
        else:
            missing, unexpected = model.load_state_dict(plan.dense, strict=False)
            if unexpected or set(missing) != {TABLE_KEY}:
                raise RuntimeError(f"warm start from {plan.resolved}: weights missing {missing}, unexpected "
                                   f"{unexpected}")
            rows, offset = model.item_emb.weight, 0
        return fill_rows(rows, offset, plan, fetch)


def expected_rows(plan: WarmStart, fetch: Callable = lambda x: x) -> Tuple[np.ndarray, np.ndarray]:
    """``(ids, rows)`` of every row the source gives, whole (tests and small tables only)."""
    old_of_new = np.asarray(fetch(plan.old_of_new))
    table = np.concatenate([np.asarray(fetch(b)) for _, _, b in plan.old_blocks])
    ids = np.flatnonzero(old_of_new > 0)
    all_ids = np.concatenate([ids, plan.mapped_ids])
    all_rows = np.concatenate([table[old_of_new[ids]], plan.mapped_rows]) if len(all_ids) else \
        np.zeros((0, table.shape[1]), np.float32)
    order = np.argsort(all_ids)
    return all_ids[order], all_rows[order]


__all__ = ["ROW_BLOCK", "WarmStart", "apply_warm_start", "check_compatible", "expected_rows", "fill_rows",
           "match_items", "plan_warm_start"]
