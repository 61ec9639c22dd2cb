"""Loading an exported model back, without Ray and without any LLM or text encoder.

An export folder holds ``model.pt`` (the best weights), ``config.yaml`` and ``dataset.json`` (where the
preprocessed dataset lives, for evaluation). Serving needs only the interest extractor and item table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from eimf.config import Config, load_config


def load_model(model_dir: str | Path) -> Tuple[torch.nn.Module, Config]:
    """The backbone from an export folder (local or ``s3://``), on the CPU, in eval mode."""
    from eimf import fs
    from eimf.models import build_model

    with fs.local_dir(str(model_dir)) as local:
        cfg = load_config(Path(local) / "config.yaml")
        state = torch.load(Path(local) / "model.pt", map_location="cpu")
    n_items = state["item_emb.weight"].shape[0] - 1
    model = build_model(cfg.model, n_items)
    model.load_state_dict(state)
    model.eval()
    return model, cfg


@torch.no_grad()
def recommend(model, hist: np.ndarray, mask: np.ndarray, n: int = 50) -> Tuple[np.ndarray, np.ndarray]:
    """Top-n item ids and scores for a batch of histories (per-interest retrieval merged by score)."""
    from eimf.evaluation.retrieval import ItemIndex

    interests = model.interests(torch.as_tensor(hist), torch.as_tensor(mask)).numpy()
    index = ItemIndex(model.item_embeddings().numpy())
    return index.search_multi(interests, n)


def evaluate_exported(model_dir: str | Path, split: str = "test", with_baseline: bool = True) -> Dict[str, float]:
    from eimf.data.preprocess import load_prepared
    from eimf.evaluation import evaluate, most_popular

    from eimf import fs

    model, cfg = load_model(model_dir)
    data = load_prepared(json.loads(fs.read_text(fs.join(str(model_dir), "dataset.json")))["data_path"])
    split_df = getattr(data, split)
    item_table = model.item_embeddings().detach().numpy()

    def interest_fn(hist, mask):
        with torch.no_grad():
            return model.interests(torch.as_tensor(hist), torch.as_tensor(mask)).numpy()

    topk = tuple(cfg.eval.topk)
    out = {
        f"{split}/{k}": v
        for k, v in evaluate(interest_fn, item_table, split_df, topk=topk, batch_size=cfg.eval.batch_size,
                             maxlen=cfg.model.maxlen, exclude_history=cfg.eval.exclude_history).items()
    }
    if with_baseline:
        out.update({f"{split}/mostpop/{k}": v for k, v in most_popular(data.train, split_df, topk=topk).items()})
    return out
