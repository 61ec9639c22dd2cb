"""Amazon reviews (McAuley lab, 2014 release, 5-core): ``amazon-beauty``, ``amazon-sports``, ``amazon-toys``.

Each has the publisher's ``reviews_<Category>_5.json.gz`` (reviewerID, asin, unixReviewTime) and
``meta_<Category>.json.gz`` (item text "title | categories"), downloaded and kept gzipped as served, plus the layouts
of papers that used them (S3-Rec's ``<Category>.txt``, P5's sequences and ``datamaps.json``). The McAuley lab
publishes no checksums: the first download's SHA256 is recorded and later ones are checked against it.
"""
from __future__ import annotations

import json

import numpy as np

from eimf.data.datasets.base import SEQUENCES, DatasetSpec, DownloadSpec, Source, remote_file
from eimf.data.parsers import CatalogueSpec, DataError, InteractionSpec, ParseResult, decompress
from eimf.data.parsers.spec import empty_file
from eimf.data.parsers.validate import catalogue_table

MCAULEY_2014 = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
HOMEPAGE = "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html"
TERMS = "McAuley lab (UCSD), for research; cite He & McAuley (WWW 2016) and McAuley et al. (SIGIR 2015)."

_TSV_TS = InteractionSpec(format="tsv", user_col="user_id", item_col="item_id", time_col="timestamp")
_P5_ASIN = CatalogueSpec(format="p5-datamaps")


def parse_p5_datamaps(path: str, raw: bytes, spec: CatalogueSpec) -> ParseResult:
    """P5 ``datamaps.json``: ``id2item`` (item id -> ASIN). The text is the ASIN (no titles exist)."""
    try:
        obj = json.loads(decompress(raw).decode("utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: not a JSON document ({e})") from None
    id2item = obj.get("id2item") if isinstance(obj, dict) else None
    if not id2item:
        raise empty_file(path, "no id2item map")
    ids = list(id2item.keys())
    texts = [str(v) for v in id2item.values()]
    lines = np.arange(1, len(ids) + 1, dtype=np.int64)
    table, drops = catalogue_table(path, ids, texts, lines, spec, unit="entry")
    return ParseResult(table, drops, rows_in=len(ids))


#: Catalogue formats of this family (``CatalogueSpec.format``), for :func:`eimf.data.ingest.parse_catalogue`.
CATALOGUE_PARSERS = {"p5-datamaps": parse_p5_datamaps}


def _titles() -> CatalogueSpec:
    return CatalogueSpec(format="tsv", item_col="item_id", text_cols=["title"])


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


def _download(name: str, category: str, label: str) -> DownloadSpec:
    reviews, meta = f"reviews_{category}_5.json.gz", f"meta_{category}.json.gz"
    return DownloadSpec(
        name=name,
        description=f"Amazon {label} 5-core reviews + metadata, 2014 release (McAuley lab)",
        files=(remote_file(reviews, MCAULEY_2014), remote_file(meta, MCAULEY_2014)),
        required=((reviews,), (meta,)),
        homepage=HOMEPAGE,
        terms=TERMS,
    )


AMAZON_BEAUTY = DatasetSpec(
    "amazon-beauty", "Amazon Beauty 5-core (2014): 198,502 reviews; product titles",
    (
        Source("interactions", "Beauty_interactions.tsv.gz (day timestamps) + items.tsv.gz titles",
               ("Beauty_interactions.tsv.gz", "Beauty_interactions.tsv"), _TSV_TS,
               ("items.tsv.gz", "items.tsv"), _titles()),
        _reviews("Beauty"),
        Source("sequences", "S3-Rec Beauty.txt.gz (chronological) + items.tsv.gz titles",
               ("Beauty.txt.gz", "Beauty.txt"), SEQUENCES,
               ("items.tsv.gz", "items.tsv"), _titles()),
    ),
    HOMEPAGE, _download("amazon-beauty", "Beauty", "Beauty"),
)

AMAZON_SPORTS = DatasetSpec(
    "amazon-sports", "Amazon Sports_and_Outdoors 5-core (2014): 296,337 reviews; ASIN only",
    (
        Source("interactions", "Sports_and_Outdoors_interactions.tsv.gz (day timestamps) + P5 ASINs",
               ("Sports_and_Outdoors_interactions.tsv.gz", "Sports_and_Outdoors_interactions.tsv"), _TSV_TS,
               ("p5_datamaps.json.gz",), _P5_ASIN),
        _reviews("Sports_and_Outdoors"),
        Source("sequences", "S3-Rec Sports_and_Outdoors.txt.gz + P5 ASINs",
               ("Sports_and_Outdoors.txt.gz", "Sports_and_Outdoors.txt"), SEQUENCES,
               ("p5_datamaps.json.gz",), _P5_ASIN),
    ),
    HOMEPAGE, _download("amazon-sports", "Sports_and_Outdoors", "Sports and Outdoors"),
)

AMAZON_TOYS = DatasetSpec(
    "amazon-toys", "Amazon Toys_and_Games 5-core (2014): 167,597 reviews; ASIN only",
    (
        _reviews("Toys_and_Games"),
        Source("sequences", "P5 p5_sequential.txt.gz (chronological, P5 ids) + P5 ASINs",
               ("p5_sequential.txt.gz", "p5_sequential.txt"), SEQUENCES, ("p5_datamaps.json.gz",), _P5_ASIN),
        Source("s3rec", "S3-Rec Toys_and_Games.txt.gz (S3-Rec ids; no item text)",
               ("Toys_and_Games.txt.gz", "Toys_and_Games.txt"), SEQUENCES),
    ),
    HOMEPAGE, _download("amazon-toys", "Toys_and_Games", "Toys and Games"),
)
