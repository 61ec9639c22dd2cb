"""Raw files -> validated, filtered, re-indexed, split Parquet plus a manifest (see docs/architecture.md).

``prepare(cfg.data)`` runs the steps below on one of two engines that write the same bytes (``data.engine``):
``local`` runs them in pandas in this process (:mod:`eimf.data.local`); ``ray`` runs them as Ray tasks over user and item
buckets, so that no process holds the whole log (:mod:`eimf.data.distributed`); ``auto`` picks local for logs up
to about 2M interactions. This module picks the engine and writes the manifest; the steps' code is shared by both
engines (:mod:`eimf.data.transforms`), and the folder they write is :mod:`eimf.formats.prepared` (which also reads
it back, :func:`~eimf.formats.prepared.load_prepared`). The steps:

1. **read + validate** every file (:mod:`eimf.data.ingest`); malformed rows are dropped and
   counted by reason (``data.on_bad_rows=drop``) or stop the run naming file, line and field (``error``).
2. **order**: each user's interactions sorted stably by (time, file, row in file); without a time column
   the order is the file order.
3. **catalogue join**: interactions whose item is not in the catalogue are kept with empty text and
   counted (``items_not_in_catalogue_in`` before filtering, ``items_missing_text`` in the output); with
   ``on_bad_rows=error`` the first such row is an error. Catalogue items never interacted are counted
   (``catalogue_items_never_interacted``) and left out.
4. **repeats** (``data.dedupe``): ``none`` (default) keeps every interaction, repeats included, as ComiRec and
   BERT4Rec-style preprocessing do; ``consecutive`` drops an interaction equal to the user's previous one;
   ``first`` keeps the first interaction of each (user, item) pair. Counted as ``duplicates_removed``.
5. **k-core** (``data.min_count``): users and items with fewer than ``min_count`` interactions (repeats
   count) are removed, repeatedly, until none is left; ``kcore_rounds`` = passes that removed something.
6. **re-index**: items 1..N by descending frequency (ties: raw id, numerically for numeric ids), 0 =
   padding; users 1..U by raw id (``users.parquet`` keeps the raw ids).
7. **split**: ``user`` (ComiRec: users shuffled with ``random.Random(split_seed)``, cut 8:1:1; valid/test
   history = first ``int(len * history_fraction)`` items, truth = the rest) or ``loo``.

Output ``<output_dir>/<dataset>/<fingerprint[:16]>/``: ``train.parquet``, ``valid.parquet``,
``test.parquet``, ``items.parquet``, ``users.parquet``, ``manifest.json`` (written last: a folder with a
manifest is complete). The fingerprint is a SHA-256 over the input files (name, size, mtime), the parser
settings and the config fields that change the output; a folder that already has a manifest is reused.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import time
from typing import Optional

from eimf.data.distributed import estimate_rows, prepare_bucketed
from eimf.data.inputs import ensure_dataset, resolve_inputs
from eimf.data.local import prepare_local
from eimf.formats.prepared import (FORMAT_VERSION, OUTPUT_FIELDS, PREPROCESS_VERSION, PreparedDataset, fingerprint,
                                   folder, input_infos, is_prepared, load_prepared, output_root, write_manifest)

log = logging.getLogger(__name__)


#: data.engine=auto: logs up to this many interactions (estimated) are prepared in this process, where pandas
#: beats starting Ray tasks (docs/data.md).
LOCAL_ENGINE_MAX_ROWS = 2_000_000


def choose_engine(engine: str, rows: Optional[int]) -> str:
    """``local`` or ``ray`` for ``data.engine`` (``auto``: by ``rows``, the log's estimated interactions); both
    write the same bytes."""
    if engine == "auto":
        return "local" if rows <= LOCAL_ENGINE_MAX_ROWS else "ray"
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be auto, local or ray, got {engine!r}")
    return engine


def prepare(cfg, *, force: bool = False, engine: Optional[str] = None, known_fingerprint: Optional[str] = None
            ) -> PreparedDataset:
    """Prepare ``cfg`` (a ``DataConfig``) or reuse the folder of the same fingerprint. See the module doc.
    ``known_fingerprint``: :func:`fingerprint` as the caller already computed it (a pipeline's plan), so the
    input files are not listed twice for a reuse."""
    t0 = time.perf_counter()
    ensure_dataset(cfg)
    inputs = resolve_inputs(cfg)
    infos = None if known_fingerprint else input_infos(inputs)
    fp = known_fingerprint or fingerprint(cfg, inputs, infos)
    out = folder(output_root(cfg), inputs.dataset, fp)
    if not force and is_prepared(out):
        log.info("%s/%s: reusing %s (same inputs and config)", inputs.dataset, inputs.source, out)
        return load_prepared(out)
    if infos is None:
        infos = input_infos(inputs)
    log.info("%s: reading source %r (%s)", inputs.dataset, inputs.source,
             ", ".join(f["path"] for f in infos))
    engine = engine or cfg.engine
    rows = None
    if engine == "auto" or (engine == "ray" and cfg.buckets <= 0):  # footers or sizes, read once
        rows = estimate_rows(inputs.interaction_files)
    engine = choose_engine(engine, rows)
    if engine == "ray":  # Ray tasks over buckets: no process holds the log (eimf.data.distributed)
        res = prepare_bucketed(cfg, inputs, out, rows=rows)
        summary, c, kcore_removed, n_items, n_users = res.summary, res.counts, res.kcore_removed, res.n_items, res.n_users
        timing = dict(res.timing)
        engine_info = {"buckets": res.buckets, "read_blocks": res.read_blocks,
                       "worker_peak_rss_mb": res.worker_peak_rss_mb}
    else:  # pandas in this process: the same bytes, faster on small inputs (eimf.data.local)
        engine_info = {}
        summary, built, timing = prepare_local(cfg, inputs, out)
        c, kcore_removed, n_items, n_users = built.counts, built.kcore_removed, built.n_items, built.n_users
    c["catalogue_rows_in"] = int(summary.catalogue_rows_in)
    c["catalogue_rows_dropped"] = int(sum(summary.catalogue_drops.values()))
    c["blank_lines"] = int(sum(f["blank_lines"] for f in summary.files))
    c["empty_sequences"] = int(sum(f["empty_sequences"] for f in summary.files))
    empty_files = [f["path"] for f in summary.files if f.get("empty")]
    c["empty_files"] = len(empty_files)
    drops, cat_drops = summary.drops, summary.catalogue_drops
    if drops:
        log.warning("%s: dropped %d of %d rows: %s", inputs.dataset, c["rows_dropped"], c["rows_in"], dict(drops))
    log.info("%s: %d users, %d items, %d interactions in -> %d-core (%d rounds) -> %d users, %d items, "
             "%d interactions; split %s: %d/%d/%d users", inputs.dataset, c["users_in"], c["items_in"],
             c["interactions_in"], cfg.min_count, c["kcore_rounds"], c["users_out"], c["items_out"],
             c["interactions_out"], cfg.split, c["train_users"], c["valid_users"], c["test_users"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "preprocess_version": PREPROCESS_VERSION,
        "dataset": inputs.dataset,
        "source": inputs.source,
        "fingerprint": fp,
        "path": out,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "n_items": n_items,
        "n_users": n_users,
        "counts": c,
        "drops": {k: int(v) for k, v in sorted(drops.items())},
        "drop_examples": {k: v for k, v in sorted(drops.examples.items()) if k in drops},
        "catalogue_drops": {k: int(v) for k, v in sorted(cat_drops.items())},
        "catalogue_drop_examples": {k: v for k, v in sorted(cat_drops.examples.items()) if k in cat_drops},
        "empty_files": empty_files,
        "kcore": {"min_count": cfg.min_count, "rounds": len(kcore_removed), "removed_per_round": kcore_removed},
        "split": {"method": cfg.split, "seed": cfg.split_seed, "ratios": list(cfg.split_ratios),
                  "history_fraction": cfg.history_fraction},
        "config": {k: getattr(cfg, k) for k in OUTPUT_FIELDS} | {"dataset": cfg.dataset, "source": cfg.source},
        "has_time": summary.has_time,
        "interaction_spec": dataclasses.asdict(inputs.interaction_spec),
        "catalogue_spec": dataclasses.asdict(inputs.catalogue_spec) if inputs.catalogue_spec else None,
        "inputs": infos,
        "files": summary.files,
        "engine": {"name": engine, **engine_info},
        "timing_s": {**timing, "total": round(time.perf_counter() - t0, 3)},
    }
    write_manifest(out, manifest)
    log.info("%s: wrote %s in %.1f s", inputs.dataset, out, time.perf_counter() - t0)
    return load_prepared(out)
