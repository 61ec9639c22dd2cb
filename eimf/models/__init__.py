"""Multi-interest backbones, one per file, and ``build_model`` to pick one by ``model.backbone``."""
from __future__ import annotations

from typing import Dict, Type

from eimf.models.base import MultiInterestModel
from eimf.models.comirec_dr import ComiRecDR
from eimf.models.comirec_sa import ComiRecSA
from eimf.models.mind import MIND
from eimf.models.remi import REMI

MODELS: Dict[str, Type[MultiInterestModel]] = {
    "comirec_sa": ComiRecSA,
    "comirec_dr": ComiRecDR,
    "mind": MIND,
    "remi": REMI,
}


def build_model(model_cfg, n_items: int, item_table=None) -> MultiInterestModel:
    """``model_cfg``: an ``eimf.config.ModelConfig``; ``n_items``: catalogue size (ids 1..n_items);
    ``item_table``: a module mapping ids to rows that replaces the model's own ``nn.Embedding`` (sharded path)."""
    name = model_cfg.backbone.lower().replace("-", "_")
    if name not in MODELS:
        raise ValueError(f"unknown backbone {model_cfg.backbone!r}; choose one of {sorted(MODELS)}")
    return MODELS[name].from_config(model_cfg, n_items, item_table=item_table)


__all__ = ["MODELS", "MultiInterestModel", "ComiRecSA", "ComiRecDR", "MIND", "REMI", "build_model"]
