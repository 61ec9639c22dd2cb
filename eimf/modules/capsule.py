"""Dynamic-routing multi-interest extractor: ComiRec-DR and MIND (THUDM/ComiRec ``CapsuleNetwork``).

    item_hat[b, k, t] = bilinear_t(h[b, t])                                  [B, K, T, d]
    repeat: c = softmax_over_interests(b_logits), 0 at padded positions
            v_k = squash(sum_t c[k, t] item_hat[k, t]);  b_logits += <item_hat, v>

``bilinear="per_position"`` (ComiRec-DR, bilinear_type=2): a separate d x (K*d) map per position,
routing logits start at 0. ``bilinear="shared"`` (MIND as ComiRec implements it, bilinear_type=0): one
d->d map shared by all interests, so the interests only differ through the routing logits, which start
from a truncated N(0, 1) draw made afresh every forward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


def squash(s: torch.Tensor) -> torch.Tensor:
    norm2 = s.pow(2).sum(-1, keepdim=True)
    return s * (norm2 / (1 + norm2) / torch.sqrt(norm2 + 1e-9))


class CapsuleRouting(nn.Module):
    def __init__(self, dim: int, num_interests: int, maxlen: int, bilinear: str = "per_position",
                 iters: int = 3, relu_layer: bool = False, random_init: Optional[bool] = None):
        super().__init__()
        if bilinear not in ("per_position", "shared"):
            raise ValueError(f"bilinear must be 'per_position' or 'shared', got {bilinear!r}")
        self.dim, self.num_interests, self.maxlen = dim, num_interests, maxlen
        self.bilinear, self.iters = bilinear, iters
        # The reference ties the routing-logit init to the bilinear type (random only for MIND).
        self.random_init = (bilinear == "shared") if random_init is None else random_init
        if bilinear == "per_position":
            self.weight = nn.Parameter(torch.empty(maxlen, num_interests * dim, dim))
        else:
            self.linear = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim) if relu_layer else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.bilinear == "per_position":
            nn.init.normal_(self.weight, std=1.0)  # tf.random_normal_initializer() in the reference
        else:
            # Reference: tf.layers.dense(..., bias_initializer=None), which leaves TF's default glorot-uniform
            # initialiser on the bias (1-D shape: fan_in = fan_out = d), not zeros.
            nn.init.xavier_uniform_(self.linear.weight)
            nn.init.uniform_(self.linear.bias, -(3.0 / self.dim) ** 0.5, (3.0 / self.dim) ** 0.5)
        if self.proj is not None:
            nn.init.xavier_uniform_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def _item_hat(self, h: torch.Tensor) -> torch.Tensor:
        B, T, d = h.shape
        if self.bilinear == "per_position":
            # [T, K*d, d] x [B, T, d] -> [B, T, K*d] -> [B, K, T, d]
            hat = torch.einsum("tmd,btd->btm", self.weight[:T], h)
            return hat.view(B, T, self.num_interests, d).transpose(1, 2)
        # Same map for every interest: keep a broadcastable [B, 1, T, d] instead of tiling K copies.
        return self.linear(h).unsqueeze(1)

    def _initial_logits(self, h: torch.Tensor) -> torch.Tensor:
        B, T, _ = h.shape
        if not self.random_init:
            return h.new_zeros(B, self.num_interests, T)
        # Drawn at full maxlen then cut, so appending padding does not change the draw for the real items.
        logits = torch.empty(B, self.num_interests, self.maxlen, dtype=h.dtype)
        nn.init.trunc_normal_(logits, std=1.0, a=-2.0, b=2.0)  # tf.truncated_normal(stddev=1.0)
        return logits[:, :, :T].to(h.device)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """h: item embeddings [B, T, d] (T <= maxlen), mask: bool [B, T].
        Returns interests [B, K, d] and the last iteration's routing weights [B, K, T] (0 at padding)."""
        T = h.shape[1]
        if T > self.maxlen:
            raise ValueError(f"history length {T} > maxlen {self.maxlen}")
        h = h * mask.unsqueeze(-1).to(h.dtype)
        hat = self._item_hat(h)
        # Only the last iteration back-propagates into item_hat; earlier ones just find the routing.
        hat_iter = hat.detach()
        logits = self._initial_logits(h)
        keep = mask.unsqueeze(1)  # [B, 1, T]
        for i in range(self.iters):
            c = torch.softmax(logits, dim=1).masked_fill(~keep, 0.0)  # softmax over interests
            last = i == self.iters - 1
            caps = squash(torch.matmul(c.unsqueeze(2), hat if last else hat_iter))  # [B, K, 1, d]
            if not last:
                logits = logits + torch.matmul(hat_iter, caps.transpose(2, 3)).squeeze(-1)
        interests = caps.squeeze(2)
        if self.proj is not None:
            interests = torch.relu(self.proj(interests))
        return interests, c
