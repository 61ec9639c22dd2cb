"""ComiRec-DR (Cen et al., KDD 2020): dynamic routing with a bilinear map per sequence position."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from eimf.models.base import MultiInterestModel
from eimf.modules.capsule import CapsuleRouting


class ComiRecDR(MultiInterestModel):
    # ComiRec trains the routing models with 5e-3 (README / train.py of THUDM/ComiRec).
    default_lr = 5e-3

    def __init__(self, n_items: int, dim: int = 64, num_interests: int = 4, maxlen: int = 50,
                 routing_iters: int = 3,
                 item_table: Optional[torch.nn.Module] = None):
        super().__init__(n_items, dim, num_interests, maxlen, item_table)
        self.routing = CapsuleRouting(dim, num_interests, maxlen, bilinear="per_position",
                                      iters=routing_iters, relu_layer=False)

    @classmethod
    def from_config(cls, cfg, n_items: int, item_table: Optional[torch.nn.Module] = None) -> "ComiRecDR":
        return cls(n_items, dim=cfg.dim, num_interests=cfg.num_interests, maxlen=cfg.maxlen,
                   routing_iters=cfg.routing_iters, item_table=item_table)

    def encode(self, hist: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        interests, routing = self.routing(self.embed_history(hist, mask), mask)
        return interests, {"routing": routing}
