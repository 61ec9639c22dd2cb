"""MovieLens (GroupLens): ``ml-100k`` and ``ml-1m``, their raw layouts, download and catalogue parsers.

Downloads: GroupLens' ``ml-100k.zip`` / ``ml-1m.zip``, extracted into the dataset folder (the zip is kept), checked
against the published checksums of ``checksums.json``. Catalogue texts: "Toy Story (1995) | Animation, Children's,
Comedy" (title, then genres).
"""
from __future__ import annotations

import dataclasses
from typing import List

import numpy as np

from eimf import fs
from eimf.data.datasets.base import SEQUENCES, DatasetSpec, DownloadSpec, Source, remote_file
from eimf.data.parsers import CatalogueSpec, InteractionSpec, ParseResult, decompress, join_text
from eimf.data.parsers.spec import empty_file
from eimf.data.parsers.validate import catalogue_table

GROUPLENS = "https://files.grouplens.org/datasets/movielens/"
TERMS = (
    "GroupLens terms: research use only, cite Harper & Konstan (2015), no redistribution, "
    "no endorsement implied (see the README inside the zip)."
)
_RATINGS = ["user_id", "item_id", "rating", "timestamp"]


# ------------------------------------------------------------------------------------------------ parsers
#: Genre flag order of MovieLens 100K (the content of ``u.genre``); used when ``u.genre`` is not given.
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]


def _parse_lines(path: str, raw: bytes, spec: CatalogueSpec, sep: str, fields: int, text_of) -> ParseResult:
    """A MovieLens catalogue: latin-1 lines of ``fields`` fields cut at ``sep``, the item id first; ``text_of(fields)``
    gives the item text. A line with another number of fields is malformed (``wrong_field_count``)."""
    text = decompress(raw).decode(spec.encoding if spec.encoding != "utf-8" else "latin-1")
    ids, texts, lines, bad = [], [], [], []
    blank = 0
    for ln, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            blank += 1
            continue
        parts = line.split(sep)
        lines.append(ln)
        ids.append(parts[0])
        ok = len(parts) == fields
        texts.append(text_of(parts) if ok else "")
        bad.append(not ok)
    if not lines:
        raise empty_file(path)
    table, drops = catalogue_table(path, ids, texts, np.asarray(lines), spec, np.asarray(bad))
    return ParseResult(table, drops, rows_in=len(lines), blank_lines=blank)


def parse_ml1m_movies(path: str, raw: bytes, spec: CatalogueSpec) -> ParseResult:
    """MovieLens 1M ``movies.dat``: ``MovieID::Title::Genres`` (latin-1) -> "Title | Genre, Genre"."""
    return _parse_lines(path, raw, spec, "::", 3, lambda p: join_text([p[1], [g for g in p[2].split("|") if g]]))


def parse_ml100k_items(path: str, raw: bytes, spec: CatalogueSpec) -> ParseResult:
    """MovieLens 100K ``u.item``: ``id|title|release|video release|url|19 genre flags`` (latin-1)."""
    genres = spec.genre_names or ML100K_GENRES
    return _parse_lines(path, raw, spec, "|", 5 + len(genres),
                        lambda p: join_text([p[1], [g for g, f in zip(genres, p[5:]) if f.strip() == "1"]]))


def parse_ml100k_genres(raw: bytes) -> List[str]:
    """``u.genre`` (``name|index`` lines) -> names in index order."""
    pairs = []
    for line in decompress(raw).decode("latin-1").splitlines():
        if "|" in line:
            name, idx = line.rsplit("|", 1)
            pairs.append((int(idx), name))
    return [n for _, n in sorted(pairs)]


def ml100k_genre_names(spec: CatalogueSpec, root: str, present: set) -> CatalogueSpec:
    """``u.item``'s genre names from the folder's ``u.genre`` when it has one (else the standard 19)."""
    if spec.format == "ml100k-items" and "u.genre" in present:
        return dataclasses.replace(spec, genre_names=parse_ml100k_genres(fs.read_bytes(fs.join(root, "u.genre"))))
    return spec


#: Catalogue formats of this family (``CatalogueSpec.format``), for :func:`eimf.data.ingest.parse_catalogue`.
CATALOGUE_PARSERS = {"ml1m-movies": parse_ml1m_movies, "ml100k-items": parse_ml100k_items}


# ------------------------------------------------------------------------------------------------ datasets
ML_100K = DatasetSpec(
    "ml-100k", "MovieLens 100K: 100,000 ratings with timestamps; titles + genres",
    (Source("ratings", "u.data (tab, unix timestamps) + u.item/u.genre", ("u.data", "u.data.gz"),
            InteractionSpec(format="tsv", header=False, names=_RATINGS),
            ("u.item",), CatalogueSpec(format="ml100k-items"), adapt_catalogue=ml100k_genre_names),),
    "https://grouplens.org/datasets/movielens/100k/",
    DownloadSpec(
        name="ml-100k",
        description="MovieLens 100K (GroupLens): 100,000 ratings, 943 users, 1,682 movies, with timestamps",
        files=(remote_file("ml-100k.zip", GROUPLENS, extract=True),),
        required=(("u.data", "u.data.gz"), ("u.item",), ("u.genre",), ("u.user",)),
        homepage="https://grouplens.org/datasets/movielens/100k/",
        terms=TERMS,
    ),
)

ML_1M = DatasetSpec(
    "ml-1m", "MovieLens 1M: 1,000,209 ratings; titles + genres",
    (
        Source("ratings", "GroupLens ratings.dat (::, unix timestamps) + movies.dat", ("ratings.dat",),
               InteractionSpec(format="dat", header=False, names=_RATINGS),
               ("movies.dat",), CatalogueSpec(format="ml1m-movies")),
        Source("sequences", "sequences_chronological.txt.gz (chronological, no timestamps) + movies.dat",
               ("sequences_chronological.txt.gz", "sequences_chronological.txt"), SEQUENCES,
               ("movies.dat",), CatalogueSpec(format="ml1m-movies")),
    ),
    "https://grouplens.org/datasets/movielens/1m/",
    DownloadSpec(
        name="ml-1m",
        description="MovieLens 1M (GroupLens): 1,000,209 ratings, 6,040 users, 3,706 movies, with timestamps",
        files=(remote_file("ml-1m.zip", GROUPLENS, extract=True),),
        required=(("ratings.dat",), ("movies.dat",), ("users.dat",)),
        homepage="https://grouplens.org/datasets/movielens/1m/",
        terms=TERMS,
    ),
)
