"""The ``data`` section: which dataset, how its files read, and how it is prepared (k-core, split)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Literal, Optional

from eimf.config.base import ConfigError, Section, check_positive, check_share, operational

#: ``data.format`` (interaction files) and ``data.items_format`` (catalogue files); ``auto``: from the extension.
InteractionFormat = Literal["auto", "csv", "tsv", "parquet", "jsonl", "sequences", "dat"]
CatalogueFormat = Literal["auto", "csv", "tsv", "parquet", "jsonl", "dat", "ml1m-movies", "ml100k-items",
                          "p5-datamaps"]


@dataclass
class DataConfig(Section):
    PATH: ClassVar[str] = "data"
    MINIMUMS: ClassVar[dict] = {"buckets": 0, "min_count": 1}
    #: A built-in dataset name (see ``eimf data list``) or ``custom`` for your own files.
    dataset: str = "ml-1m"
    #: Folder holding the raw datasets (one sub-folder per dataset). Falls back to $EIMF_DATA_DIR.
    data_dir: Optional[str] = None
    #: Built-in datasets with several raw layouts: which one to read (``auto`` picks the first present).
    source: str = "auto"
    #: ``custom`` only: interaction log as a file, folder or glob, local or ``s3://``.
    interactions: Optional[str] = None
    #: ``custom`` only: item catalogue (item id plus text columns), same formats.
    items: Optional[str] = None
    #: csv | tsv | parquet | jsonl | sequences (``user item item ...`` per line) | dat | auto (from the extension).
    format: InteractionFormat = "auto"
    #: ``custom`` only: format of ``items`` (csv | tsv | parquet | jsonl | auto ...).
    items_format: CatalogueFormat = "auto"
    #: ``custom`` only: item id column of ``items``; None: the same as ``item_col``.
    items_item_col: Optional[str] = None
    user_col: str = "user_id"
    item_col: str = "item_id"
    #: Column that orders a user's interactions (unix time or any number); None: file order.
    time_col: Optional[str] = "timestamp"
    #: Catalogue columns joined into an item's text.
    text_cols: List[str] = field(default_factory=lambda: ["title"])
    #: Ids must parse as integers (True) or are free strings such as ASINs (False).
    numeric_ids: bool = True
    #: What to do with a malformed row: ``drop`` (counted in the manifest) or ``error`` (fail naming file/row/field).
    on_bad_rows: Literal["drop", "error"] = "drop"
    #: Repeated (user, item) interactions: ``none`` keeps them all (ComiRec, BERT4Rec), ``consecutive`` drops
    #: an interaction equal to the user's previous one, ``first`` keeps only the first of each pair.
    dedupe: Literal["none", "consecutive", "first"] = "none"
    #: k-core: users and items with fewer interactions are removed, repeatedly, until stable.
    min_count: int = 5
    #: ``user`` (ComiRec: users split 8:1:1, history/truth 80/20) or ``loo`` (leave-one-out).
    split: Literal["user", "loo"] = "user"
    split_seed: int = 1230
    split_ratios: List[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    #: Valid/test users: share of the sequence that is history; the rest is ground truth.
    history_fraction: float = 0.8
    #: The training window, on the time column's own scale (unix seconds for the built-in datasets): only
    #: interactions with ``since <= time < until`` are read (None: unbounded), applied as the files are parsed,
    #: before k-core and split (eimf.data.ingest.Window). Needs a time column.
    since: Optional[float] = None
    until: Optional[float] = None
    #: With ``since``: the share of the interactions before it that are kept too (replayed), each drawn by a
    #: hash of (user, item, time) and ``replay_seed``, so the sample is the same on both engines and every read.
    replay: float = 0.0
    replay_seed: int = 0
    #: Where preprocessed datasets are written (local or ``s3://``); None: <EIMF_HOME>/data.
    output_dir: Optional[str] = operational()
    #: Where preparation runs: ``ray`` (tasks over user and item buckets; no process holds the whole log),
    #: ``local`` (pandas in this process), ``auto`` (local up to ~2M interactions). Both write the same bytes.
    engine: Literal["auto", "local", "ray"] = operational("auto")
    #: ``ray`` engine: user (and item) buckets, so a task holds about 1/buckets of the log; 0: one per ~2M rows.
    buckets: int = operational(0)
    #: ``ray`` engine: interaction files larger than this (MB) are parsed in blocks by separate tasks (text at line
    #: ends, Parquet at row groups); compressed files are parsed whole.
    read_block_mb: float = operational(64.0)
    #: A built-in dataset whose folder is missing: ``auto`` downloads it (checksums checked) when the network
    #: answers, ``never`` fails with the folder it looked in.
    download: Literal["auto", "never"] = operational("auto")

    def __post_init__(self):
        super().__post_init__()
        check_positive("data.read_block_mb", self.read_block_mb)
        r = list(self.split_ratios)
        if len(r) != 3 or min(r) < 0 or abs(sum(r) - 1) > 1e-6:
            raise ConfigError(f"data.split_ratios must be 3 non-negative numbers summing to 1, got {r}")
        check_share("data.history_fraction", self.history_fraction, low_open=True)
        check_share("data.replay", self.replay)
        windowed = self.since is not None or self.until is not None
        if windowed and not self.time_col:
            raise ConfigError(f"data.since/data.until need a time column: data.time_col is {self.time_col!r} "
                              f"(without one the log has no clock to cut)")
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ConfigError(f"data.until must be after data.since, got since={self.since}, until={self.until}")
        if self.replay > 0 and self.since is None:
            raise ConfigError(f"data.replay={self.replay} replays interactions before data.since, which is not set")
