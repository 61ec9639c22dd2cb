"""MIND (Li et al., CIKM 2019) as ComiRec implements it (``Model_MIND``): one shared bilinear map,
routing logits drawn from a truncated N(0, 1) every forward, then a ReLU dense layer (relu_layer=True)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from eimf.models.base import MultiInterestModel
from eimf.modules.capsule import CapsuleRouting


class MIND(MultiInterestModel):
    default_lr = 1e-3

    def __init__(self, n_items: int, dim: int = 64, num_interests: int = 4, maxlen: int = 50,
                 routing_iters: int = 3, relu_layer: bool = True,
                 item_table: Optional[torch.nn.Module] = None):
        super().__init__(n_items, dim, num_interests, maxlen, item_table)
        self.routing = CapsuleRouting(dim, num_interests, maxlen, bilinear="shared",
                                      iters=routing_iters, relu_layer=relu_layer)

    @classmethod
    def from_config(cls, cfg, n_items: int, item_table: Optional[torch.nn.Module] = None) -> "MIND":
        return cls(n_items, dim=cfg.dim, num_interests=cfg.num_interests, maxlen=cfg.maxlen,
                   routing_iters=cfg.routing_iters, item_table=item_table)

    def encode(self, hist: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        interests, routing = self.routing(self.embed_history(hist, mask), mask)
        return interests, {"routing": routing}
