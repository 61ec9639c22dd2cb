"""ComiRec-SA (Cen et al., KDD 2020): self-attentive multi-interest extraction + hard readout."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from eimf.models.base import MultiInterestModel
from eimf.modules.self_attentive import SelfAttentiveExtractor


class ComiRecSA(MultiInterestModel):
    default_lr = 1e-3

    def __init__(self, n_items: int, dim: int = 64, num_interests: int = 4, maxlen: int = 50,
                 hidden_factor: int = 4, add_pos: bool = True,
                 item_table: Optional[torch.nn.Module] = None):
        super().__init__(n_items, dim, num_interests, maxlen, item_table)
        self.extractor = SelfAttentiveExtractor(dim, num_interests, maxlen, hidden_factor, add_pos)

    @classmethod
    def from_config(cls, cfg, n_items: int, item_table: Optional[torch.nn.Module] = None) -> "ComiRecSA":
        return cls(n_items, dim=cfg.dim, num_interests=cfg.num_interests, maxlen=cfg.maxlen,
                   hidden_factor=cfg.hidden_factor, item_table=item_table)

    def encode(self, hist: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        interests, attention = self.extractor(self.embed_history(hist, mask), mask)
        return interests, {"attention": attention}
