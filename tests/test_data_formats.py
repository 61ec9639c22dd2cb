"""eimf.data.parsers (and the datasets' own catalogue parsers): every input format, row validation, drop accounting, error messages."""
from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eimf.data.datasets.movielens import parse_ml100k_genres
from eimf.data.ingest import parse_catalogue
from eimf.data.parsers import (
    CatalogueSpec, DataError, EmptyFileError, InteractionSpec, detect_format, parse_interactions,
)

pytestmark = pytest.mark.timeout(60)

DATA = Path(os.environ.get("EIMF_DATA_DIR", "/work/shared/data"))


def _ok(res):
    """The accounting invariant every parser keeps."""
    assert res.rows_in == res.rows_kept + sum(res.drops.values())
    return res


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    return buf.getvalue()


CSV = b"user_id,item_id,timestamp\n1,10,100\n1,11,90\n2,10,50\n"


@pytest.mark.parametrize("name,raw,spec", [
    ("log.csv", CSV, InteractionSpec()),
    ("log.tsv", CSV.replace(b",", b"\t"), InteractionSpec()),
    ("log.csv.gz", gzip.compress(CSV), InteractionSpec()),
    ("log.tsv.gz", gzip.compress(CSV.replace(b",", b"\t")), InteractionSpec()),
    ("log.parquet", _parquet_bytes(pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 10],
                                                 "timestamp": [100, 90, 50]})), InteractionSpec()),
    ("log.jsonl", b'{"user_id": 1, "item_id": "10", "timestamp": 100}\n{"user_id": "1", "item_id": 11, '
                  b'"timestamp": 90.0}\n\n{"user_id": 2, "item_id": 10, "timestamp": "50"}\n', InteractionSpec()),
    ("ratings.dat", b"1::10::5::100\n1::11::3::90\n2::10::4::50\n",
     InteractionSpec(format="dat", header=False, names=["user_id", "item_id", "rating", "timestamp"])),
])
def test_each_format_reads_the_same_rows(name, raw, spec):
    assert detect_format(name) in ("csv", "tsv", "parquet", "jsonl", "dat")
    res = _ok(parse_interactions(name, raw, spec))
    t = res.table
    assert list(t.columns) == ["user", "item", "ts", "row", "line"]
    assert t["user"].tolist() == ["1", "1", "2"] and t["item"].tolist() == ["10", "11", "10"]
    assert t["ts"].tolist() == [100, 90, 50] and t["ts"].dtype == np.int64
    assert t["row"].tolist() == [0, 1, 2]
    assert res.has_time and not res.drops


def test_line_numbers_per_format():
    assert parse_interactions("a.csv", CSV, InteractionSpec()).table["line"].tolist() == [2, 3, 4]  # header = line 1
    js = b'{"user_id": 1, "item_id": 1, "timestamp": 1}\n\n{"user_id": 1, "item_id": 2, "timestamp": 2}\n'
    res = parse_interactions("a.jsonl", js, InteractionSpec())
    assert res.table["line"].tolist() == [1, 3] and res.blank_lines == 1


def test_sequence_file_order_and_numbers():
    raw = gzip.compress(b"7 3 1 2\n\n8 5\n9\n")
    res = _ok(parse_interactions("seq.txt.gz", raw, InteractionSpec(format="sequences")))
    t = res.table
    assert t["user"].tolist() == ["7", "7", "7", "8"] and t["item"].tolist() == ["3", "1", "2", "5"]
    assert t["ts"].tolist() == [0, 1, 2, 3]  # no time: file order
    assert t["line"].tolist() == [1, 1, 1, 3]
    assert not res.has_time and res.blank_lines == 1 and res.empty_sequences == 1


def test_ids_are_normalised_or_kept_as_strings():
    raw = b"user_id,item_id,timestamp\n007,12.0,1\n"
    t = parse_interactions("a.csv", raw, InteractionSpec()).table
    assert (t["user"].iat[0], t["item"].iat[0]) == ("7", "12")
    t = parse_interactions("a.csv", raw, InteractionSpec(numeric_ids=False)).table
    assert (t["user"].iat[0], t["item"].iat[0]) == ("007", "12.0")
    asin = b"user_id,item_id,timestamp\nA2XX,B004756YJA,1\n"
    assert parse_interactions("a.csv", asin, InteractionSpec(numeric_ids=False)).table["item"].iat[0] == "B004756YJA"


def test_no_time_column_means_file_order():
    raw = b"u,i\n1,5\n1,4\n"
    res = parse_interactions("a.csv", raw, InteractionSpec(user_col="u", item_col="i", time_col=None))
    assert res.table["ts"].tolist() == [0, 1] and not res.has_time


def test_iso_times_and_float_times():
    raw = b"user_id,item_id,timestamp\n1,1,2020-01-01T00:00:00Z\n1,2,2020-01-02\n"
    t = parse_interactions("a.csv", raw, InteractionSpec()).table
    assert t["ts"].tolist() == [1577836800, 1577923200]
    raw = b"user_id,item_id,timestamp\n1,1,1.5\n1,2,2\n"
    t = parse_interactions("a.csv", raw, InteractionSpec()).table
    assert t["ts"].dtype == np.float64 and t["ts"].tolist() == [1.5, 2.0]


# ----------------------------------------------------------------------------------------------- bad rows
BAD_CSV = (b"user_id,item_id,timestamp\n"
           b"1,10,100\n"       # 2 ok
           b"2,,200\n"         # 3 missing item
           b"x,11,300\n"       # 4 non-numeric user
           b"3,1y,300\n"       # 5 non-numeric item
           b"3,12,abc\n"       # 6 non-numeric time
           b"4,13\n"           # 7 missing time (short row)
           b"5,14,500,9\n"     # 8 too many fields
           b",15,600\n"        # 9 missing user
           b"6,16,700\n")      # 10 ok

EXPECTED = {"missing_item": 1, "non_numeric_user": 1, "non_numeric_item": 1, "non_numeric_time": 1,
            "missing_time": 1, "wrong_field_count": 1, "missing_user": 1}


def test_bad_rows_are_counted_never_lost():
    res = _ok(parse_interactions("bad.csv", BAD_CSV, InteractionSpec()))
    assert dict(res.drops) == EXPECTED
    assert res.rows_in == 9 and res.rows_kept == 2
    assert res.table["line"].tolist() == [2, 10]
    assert res.drops.examples["non_numeric_time"] == ["bad.csv:6 (timestamp)"]


@pytest.mark.parametrize("raw,line,fieldname", [
    (b"user_id,item_id,timestamp\n1,10,100\n2,,200\n", 3, "item_id"),
    (b"user_id,item_id,timestamp\n1,10,100\nx,11,300\n", 3, "user_id"),
    (b"user_id,item_id,timestamp\n1,10,100\n1,10,1\n3,12,abc\n", 4, "timestamp"),
    (b"user_id,item_id,timestamp\n1,10,100\n5,14,500,9\n", 3, "the row"),
    (BAD_CSV, 3, "item_id"),
])
def test_error_mode_names_file_line_and_field(raw, line, fieldname):
    with pytest.raises(DataError) as e:
        parse_interactions("data/bad.csv", raw, InteractionSpec(on_bad_rows="error"))
    msg = str(e.value)
    assert "data/bad.csv" in msg and f"line {line}" in msg and fieldname in msg


@pytest.mark.parametrize("name,raw,spec,reasons", [
    ("bad.jsonl",
     b'{"user_id": 1, "item_id": 2, "timestamp": 3}\nnot json\n{"user_id": 1, "timestamp": 3}\n'
     b'{"user_id": "a", "item_id": 2, "timestamp": 3}\n{"user_id": 1, "item_id": 2, "timestamp": "t"}\n[1, 2]\n',
     InteractionSpec(), {"invalid_json": 2, "missing_item": 1, "non_numeric_user": 1, "non_numeric_time": 1}),
    ("bad.parquet", _parquet_bytes(pd.DataFrame({"user_id": ["1", None, "z", "2"], "item_id": [1.0, 2.0, 3.0, 2.5],
                                                 "timestamp": [1, 2, 3, 4]})),
     InteractionSpec(), {"missing_user": 1, "non_numeric_user": 1, "non_numeric_item": 1}),
    ("bad.txt", b"1 2 3\nu 4 5\n2 6 q\n", InteractionSpec(format="sequences"),
     {"non_numeric_user": 2, "non_numeric_item": 1}),
])
def test_bad_rows_other_formats(name, raw, spec, reasons):
    res = _ok(parse_interactions(name, raw, spec))
    assert dict(res.drops) == reasons
    with pytest.raises(DataError, match=rf"{name}, (line|row) \d+: .*(field|row)"):
        parse_interactions(name, raw, InteractionSpec(**{**spec.__dict__, "on_bad_rows": "error"}))


def test_python_literal_json_lines_are_read():
    raw = b"{'asin': 'B01', 'title': 'Nail polish', 'categories': [['Beauty', 'Nails'], ['Beauty']]}\n"
    res = parse_catalogue("meta.json", raw, CatalogueSpec(format="jsonl", item_col="asin",
                                                          text_cols=["title", "categories"], numeric_ids=False))
    assert res.table.to_dict("records")[0] == {"item": "B01", "text": "Nail polish | Beauty, Nails", "line": 1}


@pytest.mark.parametrize("name,raw,spec", [
    ("empty.csv", b"", InteractionSpec()),
    ("header.csv", b"user_id,item_id,timestamp\n", InteractionSpec()),
    ("empty.csv.gz", gzip.compress(b""), InteractionSpec()),
    ("blank.jsonl", b"\n\n", InteractionSpec()),
    ("empty.parquet", b"", InteractionSpec()),
    ("zero.parquet", _parquet_bytes(pd.DataFrame({"user_id": pd.Series([], dtype="int64"),
                                                  "item_id": pd.Series([], dtype="int64"),
                                                  "timestamp": pd.Series([], dtype="int64")})), InteractionSpec()),
    ("seq.txt", b"\n1\n", InteractionSpec(format="sequences")),
])
def test_empty_files_name_the_file(name, raw, spec):
    with pytest.raises(EmptyFileError, match=rf"{name}: file is empty"):
        parse_interactions(name, raw, spec)


def test_missing_column_is_a_clear_error():
    with pytest.raises(DataError, match=r"a.csv: no column 'timestamp'.*columns: user_id, item_id"):
        parse_interactions("a.csv", b"user_id,item_id\n1,2\n", InteractionSpec())


def test_unknown_extension_asks_for_format():
    with pytest.raises(DataError, match="data.format"):
        parse_interactions("log.txt", b"1 2\n", InteractionSpec())


# ------------------------------------------------------------------------------------------- catalogues
def test_catalogue_table_duplicates_and_missing():
    raw = b"item_id\ttitle\tbrand\n1\tLipstick\tOPI\n2\t\t\n1\tAgain\tX\n\tNo id\tY\nq\tBad\tZ\n"
    res = _ok(parse_catalogue("items.tsv", raw, CatalogueSpec(text_cols=["title", "brand"])))
    assert res.table[["item", "text"]].values.tolist() == [["1", "Lipstick | OPI"], ["2", ""]]
    assert dict(res.drops) == {"duplicate_item": 1, "missing_item": 1, "non_numeric_item": 1}
    with pytest.raises(DataError, match=r"items.tsv, line 4: field 'item_id' repeats"):
        parse_catalogue("items.tsv", raw, CatalogueSpec(text_cols=["title", "brand"], on_bad_rows="error"))


def test_p5_datamaps_gives_asins():
    raw = gzip.compress(json.dumps({"id2item": {"1": "B001", "2": "B002"}, "item2id": {}}).encode())
    res = parse_catalogue("p5_datamaps.json.gz", raw, CatalogueSpec(format="p5-datamaps"))
    assert res.table[["item", "text"]].values.tolist() == [["1", "B001"], ["2", "B002"]]


def test_movielens_catalogues_latin1():
    movies = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Caf\u00e9 (1999)::Drama\n".encode("latin-1")
    res = _ok(parse_catalogue("movies.dat", movies, CatalogueSpec(format="ml1m-movies")))
    assert res.table["text"].tolist() == ["Toy Story (1995) | Animation, Children's, Comedy", "Caf\u00e9 (1999) | Drama"]
    flags = "|".join(["0", "0", "0", "1", "1", "1"] + ["0"] * 13)
    uitem = f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags}\n2|Bad row|x\n".encode("latin-1")
    res = _ok(parse_catalogue("u.item", uitem, CatalogueSpec(format="ml100k-items")))
    assert res.table["text"].tolist() == ["Toy Story (1995) | Animation, Children's, Comedy"]
    assert dict(res.drops) == {"wrong_field_count": 1}


# ------------------------------------------------------------------------------ real files (small slices)
def _head(path: Path, n: int) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return b"".join(f.readline() for _ in range(n))


@pytest.mark.skipif(not (DATA / "ml-100k").is_dir(), reason="no shared ml-100k")
def test_real_ml100k_slice(tmp_path):
    sl = tmp_path / "u.data.gz"
    sl.write_bytes(gzip.compress(_head(DATA / "ml-100k" / "u.data.gz", 500)))
    res = _ok(parse_interactions(str(sl), sl.read_bytes(), InteractionSpec(
        format="tsv", header=False, names=["user_id", "item_id", "rating", "timestamp"])))
    assert res.rows_kept == 500 and res.table.iloc[0][["user", "item", "ts"]].tolist() == ["196", "242", 881250949]
    genres = parse_ml100k_genres((DATA / "ml-100k" / "u.genre").read_bytes())
    assert len(genres) == 19 and genres[3] == "Animation"
    items = parse_catalogue("u.item", (DATA / "ml-100k" / "u.item").read_bytes(),
                            CatalogueSpec(format="ml100k-items", genre_names=genres))
    assert items.rows_kept == 1682 and items.table["text"].iat[0] == "Toy Story (1995) | Animation, Children's, Comedy"


@pytest.mark.skipif(not (DATA / "ml-1m").is_dir(), reason="no shared ml-1m")
def test_real_ml1m_slices(tmp_path):
    seq = _head(DATA / "ml-1m" / "sequences_chronological.txt.gz", 20)
    res = _ok(parse_interactions("seq.txt", seq, InteractionSpec(format="sequences")))
    assert res.table["item"].tolist()[:4] == ["3186", "1721", "1022", "1270"]
    # the same interactions written as GroupLens ratings.dat (::) parse to the same rows
    dat = "".join(f"{u}::{i}::5::{t}\n" for u, i, t in res.table[["user", "item", "ts"]].itertuples(index=False))
    res2 = _ok(parse_interactions("ratings.dat", dat.encode(), InteractionSpec(
        format="dat", header=False, names=["user_id", "item_id", "rating", "timestamp"])))
    assert res2.table[["user", "item", "ts"]].values.tolist() == res.table[["user", "item", "ts"]].values.tolist()
    movies = parse_catalogue("movies.dat", (DATA / "ml-1m" / "movies.dat").read_bytes(),
                             CatalogueSpec(format="ml1m-movies"))
    assert movies.rows_kept == 3883 and not movies.drops


def test_parquet_datetime_and_nullable_ids():
    df = pd.DataFrame({"user_id": pd.array([1, None, 3], dtype="Int64"), "item_id": [5, 6, 7],
                       "timestamp": pd.to_datetime(["2020-01-01", "2020-01-02", None])})
    res = _ok(parse_interactions("t.parquet", _parquet_bytes(df), InteractionSpec()))
    assert dict(res.drops) == {"missing_user": 1, "missing_time": 1}
    assert res.table["ts"].tolist() == [1577836800] and res.table["user"].tolist() == ["1"]
    with pytest.raises(DataError, match=r"t.parquet, row 2: field 'user_id' is missing"):
        parse_interactions("t.parquet", _parquet_bytes(df), InteractionSpec(on_bad_rows="error"))
