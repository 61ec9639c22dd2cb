"""Shared base of the multi-interest backbones: item table, hard readout, loss plumbing.

A backbone only implements ``encode(hist, mask) -> (interests [B, K, d], aux)``; ``aux`` carries what its
extra loss terms need (e.g. REMI's attention matrix) so the training step runs the extractor once.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn


class MultiInterestModel(nn.Module):
    #: Adam learning rate when ``train.lr`` is unset (ComiRec's defaults).
    default_lr: float = 1e-3

    def __init__(self, n_items: int, dim: int, num_interests: int, maxlen: int,
                 item_table: Optional[nn.Module] = None):
        super().__init__()
        self.n_items, self.dim, self.num_interests, self.maxlen = n_items, dim, num_interests, maxlen
        if item_table is not None:
            # Looked up elsewhere (the row-sharded table, eimf/training/sharded.py): ids -> rows, no weights here.
            self.item_emb = item_table
            return
        # Row 0 is padding; the table is also the output layer of the sampled softmax.
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.reset_item_embeddings()

    def reset_item_embeddings(self) -> None:
        # Reference: tf.get_variable([n_mid, d]) with TF's default glorot-uniform initialiser.
        nn.init.xavier_uniform_(self.item_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @classmethod
    def from_config(cls, cfg, n_items: int, item_table: Optional[nn.Module] = None) -> "MultiInterestModel":
        return cls(n_items, dim=cfg.dim, num_interests=cfg.num_interests, maxlen=cfg.maxlen, item_table=item_table)

    # -- to implement -----------------------------------------------------------------------------
    def encode(self, hist: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """hist [B, T] item ids, mask [B, T] bool -> (interests [B, K, d], aux tensors for extra losses)."""
        raise NotImplementedError

    def extra_losses(self, aux: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Weighted extra terms added to the recommendation loss (none by default)."""
        return {}

    # -- shared -----------------------------------------------------------------------------------
    def embed_history(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = self.item_emb(hist)
        return rows * mask.unsqueeze(-1).to(rows.dtype)

    def interests(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encode(hist, mask.bool())[0]

    def readout(self, interests: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Hard readout: the interest with the largest inner product with the target item. [B, d]"""
        scores = torch.einsum("bkd,bd->bk", interests, self.item_emb(target))
        idx = scores.argmax(dim=1)
        return interests[torch.arange(interests.shape[0], device=interests.device), idx]

    def loss(self, hist: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
             loss_fn: Callable[..., torch.Tensor], return_interests: bool = False,
             negatives=None) -> Dict[str, torch.Tensor]:
        """{"loss": rec + extra terms, "rec": sampled softmax, ...extra terms}; with ``return_interests`` also
        "interests" [B, K, d] (EIMF's auxiliary losses reuse them instead of running the extractor again).
        ``negatives``: drawn beforehand (the sharded table must look them up first); None: the loss draws them."""
        interests, aux = self.encode(hist, mask.bool())
        rec = loss_fn(self.readout(interests, target), target, self.item_emb, negatives)
        out = {"rec": rec, **self.extra_losses(aux)}
        out["loss"] = sum(out.values())
        if return_interests:
            out["interests"] = interests
        return out

    def forward(self, hist: torch.Tensor, mask: torch.Tensor, target=None, loss_fn=None, return_interests=False,
                negatives=None):
        # DDP/DeepSpeed wrappers only sync gradients for work done through forward().
        if target is None:
            return self.interests(hist, mask)
        return self.loss(hist, mask, target, loss_fn, return_interests, negatives)

    def item_embeddings(self) -> torch.Tensor:
        """The item table [n_items + 1, d] (row 0 = padding) used for retrieval."""
        return self.item_emb.weight
