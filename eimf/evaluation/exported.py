"""Evaluate a model folder on the prepared data it was trained on (no Ray, no LLM)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Sequence

import torch

from eimf.evaluation.evaluate import evaluate, most_popular
from eimf.evaluation.metrics import MetricAccumulator

if TYPE_CHECKING:
    import pandas as pd


def evaluate_exported(model_dir: str, split: str = "test", with_baseline: bool = True,
                      data_path: Optional[str] = None) -> Dict[str, float]:
    """One split; see :func:`evaluate_splits`."""
    return evaluate_splits(model_dir, (split,), with_baseline, data_path)


def evaluate_splits(model_dir: str, splits: Sequence[str] = ("valid", "test"), with_baseline: bool = True,
                    data_path: Optional[str] = None,
                    per_user: Optional[Dict[str, "pd.DataFrame"]] = None) -> Dict[str, float]:
    """``{"<split>/recall@50": ..., "<split>/mostpop/recall@50": ...}`` for each split, through the folder's own
    retrieval index (the ``retrieval`` setting it was exported with). The model and the data are read once.
    ``data_path``: the prepared dataset, by default the one recorded in the folder. ``per_user``: a dict that
    receives each split's per-user metrics (``MetricAccumulator.per_user``), for paired comparisons."""
    from eimf.data.preprocess import load_prepared
    from eimf.serving.folder import ModelFolder, ModelFolderError

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
    out: Dict[str, float] = {}
    for split in splits:
        split_df = getattr(data, split)
        acc = MetricAccumulator(topk, keep_users=per_user is not None)
        got = evaluate(interest_fn, None, split_df, topk=topk, batch_size=cfg.eval.batch_size,
                       maxlen=cfg.model.maxlen, exclude_history=cfg.eval.exclude_history, index=folder.index,
                       accumulator=acc)
        if per_user is not None:
            per_user[split] = acc.per_user()
        out.update({f"{split}/{k}": v for k, v in got.items()})
        if with_baseline:
            out.update({f"{split}/mostpop/{k}": v for k, v in most_popular(data.train, split_df, topk=topk).items()})
    return out
