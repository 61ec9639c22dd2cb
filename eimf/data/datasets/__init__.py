"""The dataset catalogue: the built-in datasets and their raw layouts, plus ``custom`` (your own files, described by
``DataConfig``). One module per family holds its files, download and catalogue parsers: :mod:`.movielens`,
:mod:`.amazon`, :mod:`.custom`; :mod:`.base` the types; ``checksums.json`` the publishers' checksums.
:func:`eimf.data.inputs.resolve_inputs` picks the files of a run, :mod:`eimf.data.download` fetches them.

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

from typing import Callable, Dict

from eimf.data.datasets import amazon, movielens
from eimf.data.datasets.base import (TOFU, DatasetNotFoundError, DatasetSpec, DownloadSpec, Inputs, RemoteFile,
                                     Source, published_checksums, remote_file)
from eimf.data.datasets.custom import CUSTOM

#: Every dataset by name, in the order ``eimf data list`` shows them.
DATASETS: Dict[str, DatasetSpec] = {s.name: s for s in (
    movielens.ML_100K, movielens.ML_1M, amazon.AMAZON_BEAUTY, amazon.AMAZON_SPORTS, amazon.AMAZON_TOYS, CUSTOM)}

#: The datasets' own catalogue layouts (``CatalogueSpec.format`` -> parser), beside the generic tables.
CATALOGUE_PARSERS: Dict[str, Callable] = {**movielens.CATALOGUE_PARSERS, **amazon.CATALOGUE_PARSERS}

__all__ = ["CATALOGUE_PARSERS", "DATASETS", "TOFU", "DatasetNotFoundError", "DatasetSpec", "DownloadSpec", "Inputs",
           "RemoteFile", "Source", "published_checksums", "remote_file"]
