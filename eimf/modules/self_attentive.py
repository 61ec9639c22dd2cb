"""ComiRec-SA multi-interest extractor (Cen et al., KDD 2020; THUDM/ComiRec ``Model_ComiRec_SA``).

    A = softmax_over_positions(W2 tanh(W1 (H + P)))      [B, K, T]
    V = A H                                               [B, K, d]

The position embedding P only shapes the attention (keys); the interests are mixtures of the plain item
embeddings H, so they live in the same space as the item table used for retrieval.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


def masked_fill_min(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Padded positions get the dtype's most negative value (the reference uses -2**32+1, which overflows
    fp16); exp() of it is 0 after the softmax's max subtraction."""
    return scores.masked_fill(~keep, torch.finfo(scores.dtype).min)


class SelfAttentiveExtractor(nn.Module):
    def __init__(self, dim: int, num_interests: int, maxlen: int, hidden_factor: int = 4, add_pos: bool = True):
        super().__init__()
        self.dim, self.num_interests, self.maxlen = dim, num_interests, maxlen
        self.position = nn.Parameter(torch.empty(maxlen, dim)) if add_pos else None
        # TF dense defaults in the reference: glorot-uniform kernels, zero biases.
        self.w1 = nn.Linear(dim, hidden_factor * dim)
        self.w2 = nn.Linear(hidden_factor * dim, num_interests)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.position is not None:
            # tf.get_variable([1, L, d]) default: glorot uniform with fan_in=L, fan_out=d (same limit here).
            nn.init.xavier_uniform_(self.position)
        for lin in (self.w1, self.w2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """h: item embeddings [B, T, d] (T <= maxlen), mask: bool [B, T] (True = real item).
        Returns interests [B, K, d] and the attention matrix A [B, K, T] (0 at padded positions)."""
        T = h.shape[1]
        if T > self.maxlen:
            raise ValueError(f"history length {T} > maxlen {self.maxlen}")
        h = h * mask.unsqueeze(-1).to(h.dtype)  # whatever id sits at a padded position must not leak in
        keys = h + self.position[:T] if self.position is not None else h
        scores = self.w2(torch.tanh(self.w1(keys))).transpose(1, 2)  # [B, K, T]
        attn = torch.softmax(masked_fill_min(scores, mask.unsqueeze(1)), dim=-1)
        return torch.matmul(attn, h), attn
