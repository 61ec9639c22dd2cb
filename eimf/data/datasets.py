"""Built-in datasets and their raw layouts, plus ``custom`` (your own files, described by ``DataConfig``).

Each built-in dataset lives in ``<data_dir>/<name>/`` (``data.data_dir``, else ``$EIMF_DATA_DIR``, else
``~/.cache/eimf/datasets``, the default folder of ``eimf data download``) and may hold several raw layouts
("sources"). ``data.source=auto`` picks the first source whose files are present, in the order listed:

==================  ============  ==================================================================================
dataset             source        files (catalogue -> item text)
==================  ============  ==================================================================================
ml-100k             ratings       ``u.data`` or ``u.data.gz`` (tab, with timestamps); ``u.item`` + ``u.genre``
                                  -> "Toy Story (1995) | Animation, Children's, Comedy"
ml-1m               ratings       ``ratings.dat`` (GroupLens ``ml-1m.zip``, ``::``, timestamps); ``movies.dat``
                    sequences     ``sequences_chronological.txt.gz`` (``user item item ...``, chronological)
amazon-beauty       interactions  ``Beauty_interactions.tsv.gz`` (timestamps); ``items.tsv.gz`` -> title
                    reviews       ``reviews_Beauty_5.json.gz`` (publisher's 5-core reviews: reviewerID, asin,
                                  unixReviewTime); ``meta_Beauty.json.gz`` -> "title | categories"
                    sequences     ``Beauty.txt.gz`` (S3-Rec); ``items.tsv.gz``
amazon-sports       interactions  ``Sports_and_Outdoors_interactions.tsv.gz``; ``p5_datamaps.json.gz`` -> ASIN
                    reviews       ``reviews_Sports_and_Outdoors_5.json.gz``; ``meta_Sports_and_Outdoors.json.gz``
                    sequences     ``Sports_and_Outdoors.txt.gz``; ``p5_datamaps.json.gz`` -> ASIN
amazon-toys         reviews       ``reviews_Toys_and_Games_5.json.gz``; ``meta_Toys_and_Games.json.gz``
                    sequences     ``p5_sequential.txt.gz`` (P5 ids, no timestamps); ``p5_datamaps.json.gz`` -> ASIN
                    s3rec         ``Toys_and_Games.txt.gz`` (S3-Rec ids, which differ from P5's): no item text
custom              -             ``data.interactions`` (file, folder or glob; local or s3://), ``data.items``
==================  ============  ==================================================================================
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from eimf import fs
from eimf.data import download as dl
from eimf.data.formats import CatalogueSpec, DataError, InteractionSpec, parse_ml100k_genres

log = logging.getLogger(__name__)

DATA_DIR_ENV = "EIMF_DATA_DIR"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "eimf", "datasets")


class DatasetNotFoundError(DataError):
    """The dataset folder (or the files of the requested source) is not there."""


@dataclass(frozen=True)
class Source:
    """One raw layout of a dataset: interaction file(s) and an optional catalogue."""

    name: str
    description: str
    #: Alternative file names (relative to the dataset folder): the first one present is read.
    interactions: Tuple[str, ...]
    spec: InteractionSpec
    catalogue: Tuple[str, ...] = ()
    catalogue_spec: Optional[CatalogueSpec] = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    sources: Tuple[Source, ...]
    homepage: str = ""
    #: What ``eimf data download`` (and ``data.download=auto``) fetches; None: not downloadable.
    download: Optional[dl.DownloadSpec] = None

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise DataError(f"dataset {self.name!r} has no source {name!r}; sources: "
                        f"{', '.join(s.name for s in self.sources)} (or auto)")


_ML_NAMES_RATINGS = ["user_id", "item_id", "rating", "timestamp"]
_SEQ = InteractionSpec(format="sequences", user_col="user", item_col="item", time_col=None)
_TSV_TS = InteractionSpec(format="tsv", user_col="user_id", item_col="item_id", time_col="timestamp")
_P5_ASIN = CatalogueSpec(format="p5-datamaps")


def _reviews(category: str) -> Source:
    return Source(
        "reviews",
        f"publisher's reviews_{category}_5.json.gz (reviewerID, asin, unixReviewTime) + meta_{category}.json.gz",
        (f"reviews_{category}_5.json.gz", f"reviews_{category}_5.json"),
        InteractionSpec(format="jsonl", user_col="reviewerID", item_col="asin", time_col="unixReviewTime",
                        numeric_ids=False),
        (f"meta_{category}.json.gz", f"meta_{category}.json"),
        CatalogueSpec(format="jsonl", item_col="asin", text_cols=["title", "categories"], numeric_ids=False),
    )


DATASETS: Dict[str, DatasetSpec] = {
    "ml-100k": DatasetSpec(
        "ml-100k", "MovieLens 100K: 100,000 ratings with timestamps; titles + genres",
        (Source("ratings", "u.data (tab, unix timestamps) + u.item/u.genre", ("u.data", "u.data.gz"),
                InteractionSpec(format="tsv", header=False, names=_ML_NAMES_RATINGS),
                ("u.item",), CatalogueSpec(format="ml100k-items")),),
        "https://grouplens.org/datasets/movielens/100k/", dl.ML_100K,
    ),
    "ml-1m": DatasetSpec(
        "ml-1m", "MovieLens 1M: 1,000,209 ratings; titles + genres",
        (
            Source("ratings", "GroupLens ratings.dat (::, unix timestamps) + movies.dat", ("ratings.dat",),
                   InteractionSpec(format="dat", header=False, names=_ML_NAMES_RATINGS),
                   ("movies.dat",), CatalogueSpec(format="ml1m-movies")),
            Source("sequences", "sequences_chronological.txt.gz (chronological, no timestamps) + movies.dat",
                   ("sequences_chronological.txt.gz", "sequences_chronological.txt"), _SEQ,
                   ("movies.dat",), CatalogueSpec(format="ml1m-movies")),
        ),
        "https://grouplens.org/datasets/movielens/1m/", dl.ML_1M,
    ),
    "amazon-beauty": DatasetSpec(
        "amazon-beauty", "Amazon Beauty 5-core (2014): 198,502 reviews; product titles",
        (
            Source("interactions", "Beauty_interactions.tsv.gz (day timestamps) + items.tsv.gz titles",
                   ("Beauty_interactions.tsv.gz", "Beauty_interactions.tsv"), _TSV_TS,
                   ("items.tsv.gz", "items.tsv"), CatalogueSpec(format="tsv", item_col="item_id", text_cols=["title"])),
            _reviews("Beauty"),
            Source("sequences", "S3-Rec Beauty.txt.gz (chronological) + items.tsv.gz titles",
                   ("Beauty.txt.gz", "Beauty.txt"), _SEQ,
                   ("items.tsv.gz", "items.tsv"), CatalogueSpec(format="tsv", item_col="item_id", text_cols=["title"])),
        ),
        "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html", dl.AMAZON_BEAUTY,
    ),
    "amazon-sports": DatasetSpec(
        "amazon-sports", "Amazon Sports_and_Outdoors 5-core (2014): 296,337 reviews; ASIN only",
        (
            Source("interactions", "Sports_and_Outdoors_interactions.tsv.gz (day timestamps) + P5 ASINs",
                   ("Sports_and_Outdoors_interactions.tsv.gz", "Sports_and_Outdoors_interactions.tsv"), _TSV_TS,
                   ("p5_datamaps.json.gz",), _P5_ASIN),
            _reviews("Sports_and_Outdoors"),
            Source("sequences", "S3-Rec Sports_and_Outdoors.txt.gz + P5 ASINs",
                   ("Sports_and_Outdoors.txt.gz", "Sports_and_Outdoors.txt"), _SEQ,
                   ("p5_datamaps.json.gz",), _P5_ASIN),
        ),
        "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html", dl.AMAZON_SPORTS,
    ),
    "amazon-toys": DatasetSpec(
        "amazon-toys", "Amazon Toys_and_Games 5-core (2014): 167,597 reviews; ASIN only",
        (
            _reviews("Toys_and_Games"),
            Source("sequences", "P5 p5_sequential.txt.gz (chronological, P5 ids) + P5 ASINs",
                   ("p5_sequential.txt.gz", "p5_sequential.txt"), _SEQ, ("p5_datamaps.json.gz",), _P5_ASIN),
            Source("s3rec", "S3-Rec Toys_and_Games.txt.gz (S3-Rec ids; no item text)",
                   ("Toys_and_Games.txt.gz", "Toys_and_Games.txt"), _SEQ),
        ),
        "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html", dl.AMAZON_TOYS,
    ),
    "custom": DatasetSpec(
        "custom", "your own files: data.interactions (+ data.items), format and column names from data.*",
        (),
    ),
}


@dataclass
class Inputs:
    """What to read for one prepare run."""

    dataset: str
    source: str
    #: Dataset folder (built-in datasets) or None (custom).
    root: Optional[str]
    interaction_files: List[str]
    interaction_spec: InteractionSpec
    catalogue_files: List[str] = field(default_factory=list)
    catalogue_spec: Optional[CatalogueSpec] = None


def data_dir(cfg) -> str:
    """``cfg.data_dir``, else ``$EIMF_DATA_DIR``, else ``~/.cache/eimf/datasets``."""
    d = cfg.data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return d if fs.is_s3(d) else os.path.abspath(os.path.expanduser(d))


def _not_found(name: str, folder: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"dataset {name!r} not found: there is no folder {folder}. Point eimf at the folder that holds the "
        f"datasets with data.data_dir=/path/to/datasets or the environment variable {DATA_DIR_ENV}, "
        f"or download it with `eimf data download {name}` (it writes to $EIMF_DATA_DIR or --data-dir)."
    )


def _present(root: str) -> set:
    if not fs.is_dir(root) or not _has_files(root):
        return set()
    return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.expand(root)}


def ensure_dataset(cfg) -> None:
    """Download a built-in dataset whose folder holds none of its sources, when ``data.download=auto`` and the
    dataset is downloadable (checksums checked, eimf.data.download). Without a network the error names the
    folder it looked in, how to fetch it by hand, and why the download failed. Local data folders only."""
    spec = DATASETS.get(cfg.dataset)
    if spec is None or spec.download is None or getattr(cfg, "download", "auto") != "auto":
        return
    folder = data_dir(cfg)
    root = fs.join(folder, spec.name)
    present = _present(root)
    if any(_first_present(s.interactions, present) for s in spec.sources) or fs.is_s3(folder):
        return
    log.info("%s: not in %s; downloading it (data.download=auto)", spec.name, root)
    try:
        dl.download(spec.name, folder, retries=2, backoff=0.5, timeout=30.0)
    except dl.DownloadError as e:
        raise DatasetNotFoundError(
            f"dataset {spec.name!r} not found in {root}, and downloading it failed: {e}. Point eimf at the folder "
            f"that holds the datasets with data.data_dir=/path/to/datasets or {DATA_DIR_ENV}, or set "
            f"data.download=never to skip the download.") from e


def _first_present(names: Tuple[str, ...], present: set) -> Optional[str]:
    return next((n for n in names if n in present), None)


def resolve_inputs(cfg) -> Inputs:
    """The files and parser settings for ``cfg`` (a ``DataConfig``)."""
    if cfg.on_bad_rows not in ("drop", "error"):
        raise DataError(f"data.on_bad_rows must be drop or error, got {cfg.on_bad_rows!r}")
    if cfg.dataset == "custom":
        return _custom_inputs(cfg)
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset {cfg.dataset!r}; built-in: {', '.join(DATASETS)}")
    spec = DATASETS[cfg.dataset]
    root = fs.join(data_dir(cfg), spec.name)
    if not fs.is_dir(root):
        raise _not_found(spec.name, root)
    present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.expand(root)} if _has_files(root) else set()
    available = [s for s in spec.sources if _first_present(s.interactions, present)]
    if cfg.source == "auto":
        if not available:
            expected = "; ".join(f"{s.name}: {' or '.join(s.interactions)}" for s in spec.sources)
            raise DatasetNotFoundError(
                f"dataset {spec.name!r}: {root} holds none of the expected files ({expected}). "
                f"Download it with `eimf data download {spec.name}`, or set data.data_dir=/path/to/datasets "
                f"or {DATA_DIR_ENV} to the folder that holds {spec.name}/.")
        src = available[0]
    else:
        src = spec.source(cfg.source)
        if src not in available:
            others = ", ".join(s.name for s in available) or "none"
            raise DatasetNotFoundError(
                f"dataset {spec.name!r}, source {src.name!r}: {' or '.join(src.interactions)} is not in {root} "
                f"(sources present there: {others}; data.source=auto picks the first).")
    inter = fs.join(root, _first_present(src.interactions, present))
    ispec = dataclasses.replace(src.spec, on_bad_rows=cfg.on_bad_rows)
    cat_files: List[str] = []
    cspec = None
    if src.catalogue:
        cat = _first_present(src.catalogue, present)
        if cat:
            cat_files = [fs.join(root, cat)]
            cspec = dataclasses.replace(src.catalogue_spec, on_bad_rows=cfg.on_bad_rows)
            if cspec.format == "ml100k-items" and "u.genre" in present:
                cspec = dataclasses.replace(cspec, genre_names=parse_ml100k_genres(fs.read_bytes(fs.join(root, "u.genre"))))
        else:
            log.warning("%s/%s: no item catalogue (%s) in %s: items get empty text", spec.name, src.name,
                        " or ".join(src.catalogue), root)
    return Inputs(spec.name, src.name, root, [inter], ispec, cat_files, cspec)


def _has_files(root: str) -> bool:
    try:
        fs.expand(root)
        return True
    except FileNotFoundError:
        return False


def _custom_inputs(cfg) -> Inputs:
    if not cfg.interactions:
        raise DataError("data.dataset=custom needs data.interactions=<file, folder or glob> (local or s3://)")
    try:
        files = fs.expand(cfg.interactions)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"data.interactions={cfg.interactions}: no such file, folder or glob") from None
    fmt = cfg.format
    ispec = InteractionSpec(format=fmt, user_col=cfg.user_col, item_col=cfg.item_col, time_col=cfg.time_col,
                            numeric_ids=cfg.numeric_ids, on_bad_rows=cfg.on_bad_rows)
    cat_files: List[str] = []
    cspec = None
    if cfg.items:
        try:
            cat_files = fs.expand(cfg.items)
        except FileNotFoundError:
            raise DatasetNotFoundError(f"data.items={cfg.items}: no such file, folder or glob") from None
        items_format = getattr(cfg, "items_format", "auto")
        cspec = CatalogueSpec(format=items_format, item_col=getattr(cfg, "items_item_col", None) or cfg.item_col,
                              text_cols=list(cfg.text_cols), numeric_ids=cfg.numeric_ids,
                              on_bad_rows=cfg.on_bad_rows)
    return Inputs("custom", "files", None, files, ispec, cat_files, cspec)
