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

import pandas as pd
import torch

from eimf import fs, tracking
from eimf.evaluation.evaluate import evaluate, most_popular
from eimf.evaluation.metrics import MetricAccumulator
from eimf.evaluation.retrieval import ItemIndex
from eimf.formats.prepared import load_prepared
from eimf.serving.folder import ModelFolder, ModelFolderError
from eimf.steps import StepOutput, mlflow_run, numbers


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
