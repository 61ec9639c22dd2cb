"""Step ``evaluate``: an exported model on its prepared data, MostPopular beside it (no Ray, no LLM).

The model, its index and the data are loaded once for all splits (:func:`evaluate_splits`), through the folder's
own retrieval index. When that index is approximate (``retrieval.index=auto`` above
``eimf.evaluation.retrieval.AUTO_EXACT_MAX_ITEMS`` items, or any non-``Flat`` string), an exact index over the same
table is built beside it: ``<split>/recall@50`` etc. are exact, ``<split>/ann/recall@50`` etc. are through the
folder's index (what serving returns), ``<split>/ann/recall_of_exact@50`` is how much of the exact top-50 it finds
(eimf.evaluation.evaluate). With ``per_user=True`` each split's per-user metrics go to
``<out_dir>/per_user.<split>.parquet`` too, for paired comparisons (eimf.evaluation.compare).
"""
from __future__ import annotations

import contextlib
import io
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from eimf import fs, tracking
from eimf.evaluation.evaluate import evaluate, most_popular
from eimf.evaluation.metrics import MetricAccumulator
from eimf.evaluation.retrieval import ItemIndex
from eimf.formats.prepared import load_prepared
from eimf.serving.folder import ModelFolder, ModelFolderError
from eimf.steps import StepOutput, mlflow_run, numbers
from eimf.training.warm_start import match_items


def run(cfg, inputs: dict, out_dir: str, tags: Optional[dict] = None, run_name: str = "evaluate",
        splits: Sequence[str] = ("valid", "test"), with_baseline: bool = True, per_user: bool = False,
        log_to_mlflow: bool = True) -> StepOutput:
    frames: Optional[dict] = {} if per_user else None
    with mlflow_run(cfg, run_name, tags) if log_to_mlflow else contextlib.nullcontext() as run_id:
        metrics = evaluate_splits(inputs["model_dir"], splits, with_baseline=with_baseline,
                                  data_path=inputs.get("data_path"), per_user=frames)
        outputs = {"metrics": fs.join(out_dir, "metrics.json")}
        fs.write_json(outputs["metrics"], metrics)
        for split, df in (frames or {}).items():
            outputs[f"per_user_{split}"] = fs.join(out_dir, f"per_user.{split}.parquet")
            buf = io.BytesIO()
            df.to_parquet(buf, index=False)
            fs.write_bytes(outputs[f"per_user_{split}"], buf.getvalue())
        if run_id:
            tracking.log_metrics(tracking.tracking_uri(cfg), run_id, metrics, step=0)
    return StepOutput(outputs, numbers(metrics), run_id, {"model_dir": inputs["model_dir"]})


def evaluate_exported(model_dir: str, split: str = "test", with_baseline: bool = True,
                      data_path: Optional[str] = None) -> Dict[str, float]:
    """One split; see :func:`evaluate_splits`."""
    return evaluate_splits(model_dir, (split,), with_baseline, data_path)


def evaluate_splits(model_dir: str, splits: Sequence[str] = ("valid", "test"), with_baseline: bool = True,
                    data_path: Optional[str] = None,
                    per_user: Optional[Dict[str, pd.DataFrame]] = None) -> Dict[str, float]:
    """``{"<split>/recall@50": ..., "<split>/mostpop/recall@50": ...}`` for each split, through the folder's own
    retrieval index (the ``retrieval`` setting it was exported with); an approximate one adds ``<split>/ann/...``
    beside exact plain keys (module doc), and a folder whose ``auto`` index checked its fast candidate at export
    adds ``index/auto_candidate_recall_of_exact`` and ``index/auto_candidate_kept`` (0/1). The model and the data
    are read once.
    ``data_path``: the prepared dataset, by default the one recorded in the folder. ``per_user``: a dict that
    receives each split's per-user metrics (``MetricAccumulator.per_user``), for paired comparisons."""
    folder = ModelFolder.load(model_dir)
    path = data_path or folder.data_path
    if not path:
        raise ModelFolderError(f"{model_dir}: the folder records no prepared dataset; pass data_path")
    data = load_prepared(path)
    if data.n_items != folder.n_items:
        raise ModelFolderError(f"{model_dir}: a model of {folder.n_items} items, {path} has {data.n_items}")
    cfg, model = folder.cfg, folder.model

    def interest_fn(hist, mask):
        with torch.no_grad():
            return model.interests(torch.as_tensor(hist), torch.as_tensor(mask)).numpy()

    topk = tuple(cfg.eval.topk)
    exact = None
    if not folder.index.exact:  # built once for all splits; the metrics are never the lossy index's alone
        exact = ItemIndex(model.item_embeddings().detach().float().cpu().numpy(), index="Flat")
    out: Dict[str, float] = {}
    check = folder.index.auto_check  # retrieval.index=auto's check of its fast candidate at export, if any
    if check and check.get("candidate_recall_of_exact") is not None:
        out["index/auto_candidate_recall_of_exact"] = float(check["candidate_recall_of_exact"])
        out["index/auto_candidate_kept"] = float(bool(check["kept"]))
    for split in splits:
        split_df = getattr(data, split)
        acc = MetricAccumulator(topk, keep_users=per_user is not None)
        got = evaluate(interest_fn, None, split_df, topk=topk, batch_size=cfg.eval.batch_size,
                       maxlen=cfg.model.maxlen, exclude_history=cfg.eval.exclude_history, index=folder.index,
                       accumulator=acc, exact_index=exact)
        if per_user is not None:
            per_user[split] = acc.per_user()
        out.update({f"{split}/{k}": v for k, v in got.items()})
        if with_baseline:
            out.update({f"{split}/mostpop/{k}": v for k, v in most_popular(data.train, split_df, topk=topk).items()})
    return out


def score_on_data(model_dir: str, data_path: str, split: str, topk: Sequence[int], exclude_history: bool = False,
                  batch_size: Optional[int] = None) -> Dict[str, float]:
    """A model folder scored on ``split`` of the prepared data at ``data_path``, which may be another preparation
    than the one it was trained on (the promotion gate scores the served champion on the newest holdout): items are
    matched by raw id. A history keeps the items the model knows (a user left with none gets a zero query); a truth
    item it does not know still counts, and it cannot retrieve it. The same code scores the model of this very
    data (every item known), so two models compared are scored alike. Exact metrics (an approximate folder index
    gets an exact one beside it, as in :func:`evaluate_splits`), plus ``unknown_truth_share`` (truth items the
    model does not know) and ``users_without_history``."""
    folder = ModelFolder.load(model_dir)
    data = load_prepared(data_path)
    items = data.items.sort_values("item")
    to_model = match_items(items["raw_id"].astype(str).to_numpy(), folder.items["raw_id"].astype(str).to_numpy())
    n_model = folder.n_items
    split_df = getattr(data, split)
    histories, truths, empty, unknown, total = [], [], 0, 0, 0
    for h, t in zip(split_df["history"], split_df["truth"]):
        mh = to_model[np.asarray(h, dtype=np.int64)]
        histories.append(mh[mh > 0])
        empty += int(not (mh > 0).any())
        t = np.asarray(t, dtype=np.int64)
        mt = to_model[t]
        unknown, total = unknown + int((mt == 0).sum()), total + len(t)
        truths.append(np.where(mt > 0, mt, n_model + t))  # unknown: distinct ids past the catalogue, never retrieved
    mapped = pd.DataFrame({"user": split_df["user"].to_numpy(), "history": histories, "truth": truths})
    cfg, model = folder.cfg, folder.model

    def interest_fn(hist, mask):
        out = np.zeros((len(hist), cfg.model.num_interests, cfg.model.dim), dtype=np.float32)
        some = mask.any(dim=1)
        if bool(some.any()):
            with torch.no_grad():
                out[some.numpy()] = model.interests(hist[some], mask[some]).float().numpy()
        return out

    exact = None
    if not folder.index.exact:
        exact = ItemIndex(model.item_embeddings().detach().float().cpu().numpy(), index="Flat")
    got = evaluate(interest_fn, None, mapped, topk=tuple(topk), batch_size=batch_size or cfg.eval.batch_size,
                   maxlen=cfg.model.maxlen, exclude_history=exclude_history, index=folder.index, exact_index=exact)
    got["unknown_truth_share"] = unknown / max(1, total)
    got["users_without_history"] = float(empty)
    return got
