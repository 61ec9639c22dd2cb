"""New items without retraining: ``eimf items add MODEL --items new_items.csv``.

An item that arrives after training has no row in the item table and no place in the index. The model folder's
text map (eimf.models.text_map, fitted at export) gives it one from its text alone: the text goes through the
map's sentence encoder, the map turns the embedding into a row, and the row is appended to the table (``model.pt``'s
``item_emb.weight``, or one more ``.npy`` row block for a sharded export) and added to the faiss index
(:meth:`eimf.evaluation.retrieval.ItemIndex.add`, which rebuilds a MIPS-lifted index when a new row is longer than
its norm bound). The items get ids ``N + 1 .. N + M`` and ``count`` 0 in ``items.parquet``, and
``folder.json``'s ``added_items`` records the addition.

The result is a new model folder; the source is never changed. From an MLflow model URI (``models:/eimf-x/3``,
``models:/eimf-x@champion``), the new folder is logged as the next version of the same registered model, in a new
run of the source run's experiment tagged with the source URI and the number of items added.

Everything is checked before anything is written or registered (:class:`NewItemsError` names the file, the line
and the field): the file's columns and fields, an empty id or text, an id twice in the file or already in the
catalogue, a model folder without a text map, an encoder that is not installed, an output folder that is not new.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pandas as pd
import torch
import yaml
from mlflow import MlflowClient, artifacts
from mlflow.store.artifact.utils.models import get_model_name_and_version

from eimf import fs, tracking
from eimf.formats import model_folder as fmt
from eimf.models.text_map import TextMap
from eimf.semantic.encoder import SemanticEncoder
from eimf.serving.folder import load_index
from eimf.serving.pyfunc import ARTIFACT, log_recommender

log = logging.getLogger(__name__)

ID_COLUMN = "item_id"
TEXT_COLUMN = "text"
#: Problems listed in one error (the rest are counted).
MAX_LISTED = 10


class NewItemsError(ValueError):
    """New items that cannot be added; the message names the file, the line and the field. Nothing was written."""


@dataclass
class AddedItems:
    #: the new model folder (local or ``s3://``; a temporary one is gone once an MLflow model is logged from it)
    folder: str
    #: items added, and the first one's id (they are ``first_item .. first_item + added - 1``)
    added: int
    first_item: int
    #: what the retrieval index did: ``added`` the rows, or ``rebuilt`` itself (eimf.evaluation.retrieval.ItemIndex.add)
    index: str
    #: the logged MLflow model (``models:/<name>/<version>``) when the source was an MLflow model, else None
    model_uri: Optional[str] = None

    @property
    def n_items(self) -> int:
        return self.first_item + self.added - 1


# ---------------------------------------------------------------------------------------------- the file
def read_new_items(path: str, id_column: str = ID_COLUMN, text_column: str = TEXT_COLUMN) -> pd.DataFrame:
    """The new items of a CSV file (local or ``s3://``, UTF-8, a header line): ``raw_id``, ``text`` and ``line``
    (where the item's record starts in the file, the header being line 1), checked: the columns exist, every
    record has the header's number of fields, an id without surrounding spaces and a text, and no id comes twice.
    Raises :class:`NewItemsError` listing every problem."""
    if not fs.exists(str(path)):
        raise NewItemsError(f"{path}: no such file")
    try:  # the csv module, not pandas: every value a string as written ("007", "NA"), a ragged record an error
        reader = csv.reader(io.StringIO(fs.read_bytes(str(path)).decode("utf-8-sig"), newline=""))
        header = next(reader, None)
        records = []
        for record in reader:
            if record:  # a blank line
                records.append((reader.line_num - sum(field.count("\n") for field in record), record))
    except (csv.Error, UnicodeDecodeError) as e:
        raise NewItemsError(f"{path}: not a readable UTF-8 CSV file ({e})") from None
    header = [h.strip() for h in header or []]
    missing = [c for c in (id_column, text_column) if c not in header]
    if missing:
        raise NewItemsError(f"{path}: no column {', '.join(repr(c) for c in missing)} (its columns: "
                            f"{', '.join(repr(c) for c in header)}; name them with --id-column / --text-column)")
    if not records:
        raise NewItemsError(f"{path}: no items (a header and no records)")
    at_id, at_text = header.index(id_column), header.index(text_column)
    problems, first_line, out = [], {}, []
    for line, record in records:
        if len(record) != len(header):
            problems.append(f"line {line}: {len(record)} fields, the header has {len(header)} (quote a text with "
                            "commas)")
            continue
        raw, text = record[at_id], record[at_text]
        if not raw.strip():
            problems.append(f"line {line}: field {id_column!r} is empty")
            continue
        if raw != raw.strip():
            problems.append(f"line {line}: field {id_column!r} {raw!r} has leading or trailing spaces")
        if raw in first_line:
            problems.append(f"line {line}: field {id_column!r} {raw!r} is also on line {first_line[raw]} "
                            "(each new item once)")
        else:
            first_line[raw] = line
        if not text.strip():
            problems.append(f"line {line} ({raw!r}): field {text_column!r} is empty (the text places a new item)")
        out.append((raw, text, line))
    _raise(path, problems)
    return pd.DataFrame(out, columns=["raw_id", "text", "line"])


def _raise(path, problems: List[str]) -> None:
    if problems:
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise NewItemsError(f"{path}: {len(problems)} problem(s), nothing was added: "
                            + "; ".join(problems[:MAX_LISTED]) + more)


# ------------------------------------------------------------------------------------------- a folder
def add_to_folder(source: str, new: pd.DataFrame, out: str, items_file: str = "new items",
                  id_column: str = ID_COLUMN, threads: Optional[int] = None, slots: Optional[int] = None
                  ) -> AddedItems:
    """Add the checked items ``new`` (:func:`read_new_items`, from ``items_file``) to the model folder ``source``
    and write the result to ``out`` (both local or ``s3://``); ``source`` is left as it is. ``slots``: the places
    of each answer reserved for the added items (eimf.serving.recommender; None: as the last addition set, else 0)."""
    _check_slots(slots)
    _check_out(out, source)
    with fmt.open_local(str(source)) as folder:
        mapped = folder.text_map()
        if mapped is None:
            raise NewItemsError(f"{source}: the model folder has no text map ({fmt.TEXT_MAP}), so new items cannot "
                                "be placed without retraining: export it from items with text "
                                "(data.text_cols) with train.text_map=auto")
        text_map = TextMap.from_arrays(mapped)
        dim = int(folder.manifest["dim"])
        if text_map.dim != dim:
            raise NewItemsError(f"{source}: its text map gives rows of {text_map.dim} values, the model's are {dim}")
        items = folder.items()
        known = pd.Index(items["raw_id"].astype(str)).get_indexer(new["raw_id"])
        _raise(items_file, [f"line {line}: field {id_column!r} {raw!r} is already in the catalogue of {source} "
                            f"(item {k + 1})" for line, raw, k in zip(new["line"], new["raw_id"], known) if k >= 0])
        rows = _rows(text_map, list(new["text"]), source)
        n, m = folder.n_items, len(new)

        with tempfile.TemporaryDirectory(prefix="eimf-items-") as tmp:
            parts = [str(p) for p in folder.table_parts()]
            state = folder.state(whole_table=not parts)
            if parts:  # a sharded export: one more row block, the table never assembled
                parts.append(os.path.join(tmp, "added.npy"))
                np.save(parts[-1], rows)

                def blocks():
                    for i, p in enumerate(parts):
                        block = np.load(p, mmap_mode="r")
                        yield block[1:] if i == 0 else block
            else:  # the whole table: its weight grows by the new rows
                table = state["item_emb.weight"].detach().float().cpu()
                state["item_emb.weight"] = torch.cat([table, torch.from_numpy(rows)])
                whole = state["item_emb.weight"].numpy()

                def blocks():
                    return (whole[s:s + 1_000_000] for s in range(1, n + m + 1, 1_000_000))
            index = load_index(folder, threads)
            done = index.add(rows, blocks)
            added = pd.DataFrame({"item": np.arange(n + 1, n + m + 1, dtype=np.int64), "raw_id": new["raw_id"],
                                  "text": new["text"], "count": np.zeros(m, dtype=np.int64)})
            phrases = folder.phrases()
            record = {"first_item": n + 1, "items": m, "source": str(source), "file": str(items_file),
                      "index": done,
                      "slots": int(slots) if slots is not None else fmt.reserved_slots(folder.added_items),
                      "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            fmt.write(str(out), fmt.FolderParts(
                state=state, cfg=folder.config(), items=pd.concat([items, added], ignore_index=True),
                save_index=index.save, index_spec=index.record(), metrics=folder.metrics(),
                head_state=folder.head_state(), phrases=phrases, data_path=folder.manifest.get("data_path"),
                table_parts=parts or None, text_map=mapped, added_items=folder.added_items + [record],
                extra_files=folder.extra_files()))
    log.info("new items: %d added to %s as items %d..%d (index %s), written to %s", m, source, n + 1, n + m, done,
             out)
    return AddedItems(folder=str(out), added=m, first_item=n + 1, index=done)


def _rows(text_map: TextMap, texts: List[str], source) -> np.ndarray:
    """The new items' rows: their texts through the map's encoder, then the map."""
    try:
        encoder = SemanticEncoder(text_map.encoder)
        embeddings = encoder.encode(texts)
    except (ImportError, RuntimeError, OSError) as e:
        raise NewItemsError(f"{source}: the text map's sentence encoder {text_map.encoder!r} is not available "
                            f"here ({e})") from None
    if embeddings.shape[1] != text_map.text_dim:
        raise NewItemsError(f"{source}: the encoder {text_map.encoder!r} gives {embeddings.shape[1]} values per "
                            f"text, the text map was fitted on {text_map.text_dim}")
    rows = text_map.apply(embeddings)
    if not np.isfinite(rows).all():
        raise NewItemsError(f"{source}: the text map gives rows with NaN or infinite values")
    return rows


def _check_slots(slots: Optional[int]) -> None:
    if slots is not None and slots < 0:
        raise NewItemsError(f"slots must be 0 or more, got {slots}")


def _check_out(out: str, source: str) -> None:
    """``out`` is a new folder: never the source, never a folder with something in it."""
    if not out:
        raise NewItemsError("no output folder given (--out)")
    if not fs.is_s3(str(out)) and not fs.is_s3(str(source)) and \
            Path(out).expanduser().resolve() == Path(source).expanduser().resolve():
        raise NewItemsError(f"{out}: the output is the source model folder; a new folder is written, the source is "
                            "never changed")
    if fs.exists(fs.join(str(out), fmt.MANIFEST)) or (not fs.is_s3(str(out)) and Path(out).is_dir()
                                                      and any(Path(out).iterdir())):
        raise NewItemsError(f"{out}: not empty; name a new folder for the model with the new items (--out)")


# ------------------------------------------------------------------------------------------- MLflow models
def add_items(model: str, items_file: str, out: Optional[str] = None, id_column: str = ID_COLUMN,
              text_column: str = TEXT_COLUMN, tracking_uri: Optional[str] = None,
              threads: Optional[int] = None, slots: Optional[int] = None) -> AddedItems:
    """Add the items of ``items_file`` to ``model``: a model folder (local or ``s3://``; the result goes to
    ``out``, default a new temporary folder) or an MLflow model URI (the result is logged as the next version of
    the same registered model, see the module doc; ``out`` keeps a copy of its folder). ``tracking_uri``: the
    MLflow store (default: ``$MLFLOW_TRACKING_URI``, else eimf's own). ``slots``: see :func:`add_to_folder`."""
    _check_slots(slots)
    new = read_new_items(items_file, id_column, text_column)  # the file first: a bad one costs no download
    if fs.exists(fs.join(str(model), fmt.MANIFEST)):
        return add_to_folder(model, new, out or tempfile.mkdtemp(prefix="eimf-items-"), items_file, id_column,
                             threads, slots)
    if out:
        _check_out(out, model)
    uri = tracking_uri or tracking.default_tracking_uri()
    with tempfile.TemporaryDirectory(prefix="eimf-items-") as tmp:
        folder, run_id, registered = _fetch(model, uri, tmp)
        added = add_to_folder(folder, new, out or os.path.join(tmp, "model"), items_file, id_column, threads, slots)
        client = tracking.client(uri)
        source_run = client.get_run(run_id)
        run = client.create_run(source_run.info.experiment_id, run_name=f"items-add-{len(new)}", tags={
            "source_model_uri": model, "source_run_id": run_id, "items_added": str(added.added),
            "first_item": str(added.first_item), "index": added.index})
        new_run = run.info.run_id
        try:
            tracking.log_metrics(uri, new_run, {"items_added": added.added, "n_items": added.n_items}, step=0)
            with tempfile.TemporaryDirectory(prefix="eimf-items-file-") as copy:
                Path(copy, Path(items_file).name or "new_items.csv").write_bytes(fs.read_bytes(items_file))
                tracking.log_artifacts(uri, new_run, copy, "new_items")
            added.model_uri = log_recommender(added.folder, uri, new_run, registered)
            client.set_tag(new_run, "model_uri", added.model_uri)
            if registered and added.model_uri.startswith("models:/"):
                version = added.model_uri.rsplit("/", 1)[1]
                client.set_model_version_tag(registered, version, "source_model_uri", model)
                client.set_model_version_tag(registered, version, "items_added", str(added.added))
        except BaseException:
            tracking.end_run(uri, new_run, status="FAILED")
            raise
        tracking.end_run(uri, new_run)
    log.info("new items: %s logged as %s (run %s)", model, added.model_uri, new_run)
    return added


def _fetch(model: str, uri: str, dest: str) -> Tuple[str, str, Optional[str]]:
    """An MLflow model's folder downloaded under ``dest``: ``(model folder, source run id, registered model name or
    None)``."""
    registered = None
    with tracking.fluent_tracking_uri(uri):  # models:/ URIs resolve against the process's registry
        if str(model).startswith("models:/"):
            name_version = get_model_name_and_version(MlflowClient(tracking_uri=uri), model)
            registered = name_version[0] if len(name_version) == 2 else None
        local = Path(artifacts.download_artifacts(artifact_uri=str(model), dst_path=dest))
    spec_file = local / "MLmodel"
    if not spec_file.exists():
        raise NewItemsError(f"{model}: neither a model folder nor an MLflow model (no MLmodel in it)")
    spec = yaml.safe_load(spec_file.read_text())
    folder = (spec.get("flavors", {}).get("python_function", {}).get("artifacts", {}) or {}).get(ARTIFACT, {})
    if not folder.get("path") or not spec.get("run_id"):
        raise NewItemsError(f"{model}: an MLflow model, but not an eimf recommender (no {ARTIFACT!r} artifact or "
                            "source run)")
    return str(local / folder["path"]), str(spec["run_id"]), registered
