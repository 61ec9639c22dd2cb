"""REMI (Xie et al., "Rethinking Multi-Interest Learning for Candidate Matching in Recommender Systems",
RecSys 2023, arXiv:2302.14532; code github.com/Tokkiu/REMI) on the ComiRec-SA backbone.

Two additions, both off at 0:
- Interest-aware hard negatives (IHN), weight ``beta``: a property of the loss, see
  ``SampledSoftmaxLoss(hard_negative_beta=...)`` in ``negatives.py`` (built from ``model.beta``).
- Routing regularisation (RR), weight ``reg_lambda``, on the attention (routing) matrix A [B, K, T]:
      C = (A - mean_t A)(A - mean_t A)^T / d,     reg = sum_b ||diag(C_b)||^2
  as ``REMI.calculate_atten_loss`` in src/REMI.py: the mean runs over all T positions (padding included,
  as the reference's fixed-length batches do), the 1/d scale and the *sum* over the batch are kept so the
  published ``--rlambda`` values (e.g. 100) transfer unchanged.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from eimf.models.comirec_sa import ComiRecSA


def routing_regularization(attention: torch.Tensor, dim: int) -> torch.Tensor:
    # fp32 also under a bf16 autocast: a sum of squares over the whole batch, in bf16 only 8 mantissa bits
    attention = attention.float()
    centred = attention - attention.mean(dim=2, keepdim=True)
    # diag(C C^T) is each interest's squared deviation summed over positions: no K x K product needed.
    diag = centred.pow(2).sum(dim=2) / dim  # [B, K]
    return diag.pow(2).sum()


class REMI(ComiRecSA):
    default_lr = 1e-3

    def __init__(self, n_items: int, dim: int = 64, num_interests: int = 4, maxlen: int = 50,
                 hidden_factor: int = 4, add_pos: bool = True, reg_lambda: float = 0.0,
                 item_table: Optional[torch.nn.Module] = None):
        super().__init__(n_items, dim, num_interests, maxlen, hidden_factor, add_pos, item_table)
        self.reg_lambda = reg_lambda

    @classmethod
    def from_config(cls, cfg, n_items: int, item_table: Optional[torch.nn.Module] = None) -> "REMI":
        return cls(n_items, dim=cfg.dim, num_interests=cfg.num_interests, maxlen=cfg.maxlen,
                   hidden_factor=cfg.hidden_factor, reg_lambda=cfg.reg_lambda, item_table=item_table)

    def extra_losses(self, aux: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.reg_lambda == 0:
            return {}
        return {"reg": self.reg_lambda * routing_regularization(aux["attention"], self.dim)}
