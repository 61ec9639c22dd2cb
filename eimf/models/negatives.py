"""Negative sampling and the sampled softmax (Merlin-style: the sampler is swappable, the loss only needs
``sample`` and ``log_q``).

Semantics follow ``tf.nn.sampled_softmax_loss`` as ComiRec calls it: one set of negatives shared by the
whole batch, logits = user . item, log-Q correction subtracted from the positive *and* the negatives
(``subtract_log_q=True``), negatives equal to the example's target masked out (``remove_accidental_hits``),
cross-entropy on the positive, mean over the batch.

Item ids are 1..N sorted by descending frequency (0 = padding, never sampled), so the log-uniform
(Zipfian) sampler draws popular items more often: TF's ``log_uniform_candidate_sampler`` shifted by one.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn


class Negatives(NamedTuple):
    ids: torch.Tensor  # [M] int64 item ids
    #: Draws made to get ``ids`` (== M when sampling with replacement; more with ``unique``; inf = every item).
    num_tries: float


class NegativeSampler:
    """Distribution over ids 1..N. ``unique=True`` rejects repeats until ``num`` distinct ids are found,
    as TF's candidate samplers do with ``unique=True`` (the default of ``sampled_softmax_loss``)."""

    def __init__(self, n_items: int, unique: bool = False):
        if n_items < 1:
            raise ValueError("n_items must be >= 1")
        self.n_items, self.unique = n_items, unique

    def log_prob(self, ids: torch.Tensor) -> torch.Tensor:
        """log P(id) of one draw (float64)."""
        raise NotImplementedError

    def draw(self, num: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``num`` independent draws (with replacement), int64 on the CPU."""
        raise NotImplementedError

    def sample(self, num: int, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device] = None) -> Negatives:
        if not self.unique:
            ids, tries = self.draw(num, generator), float(num)
        elif num >= self.n_items:  # every item, each surely included
            ids, tries = torch.arange(1, self.n_items + 1), math.inf
        else:
            ids, tries = self._sample_unique(num, generator)
        return Negatives(ids if device is None else ids.to(device), float(tries))

    def _sample_unique(self, num: int, generator) -> tuple:
        # Vectorised rejection: draw chunks, keep first occurrences of ids not seen yet, in draw order;
        # num_tries = index of the draw that produced the num-th distinct id (+1).
        seen = torch.zeros(self.n_items + 1, dtype=torch.bool)
        found, offset, chunk = [], 0, 2 * num
        need = num
        while True:
            draws = self.draw(chunk, generator)
            uniq, inv = torch.unique(draws, return_inverse=True)
            first = torch.full((len(uniq),), chunk, dtype=torch.long)
            first = first.scatter_reduce(0, inv, torch.arange(chunk), reduce="amin")
            new = ~seen[uniq]
            uniq, first = uniq[new], first[new]
            order = torch.argsort(first)
            uniq, first = uniq[order], first[order]
            if len(uniq) >= need:
                found.append(uniq[:need])
                return torch.cat(found), offset + int(first[need - 1]) + 1
            found.append(uniq)
            seen[uniq] = True
            need -= len(uniq)
            offset += chunk
            chunk *= 2

    def log_q(self, ids: torch.Tensor, num_tries: float) -> torch.Tensor:
        """log of the expected number of times ``ids`` appear in ``num_tries`` draws (TF's expected count:
        num_tries * p with replacement; 1 - (1 - p)^num_tries with ``unique``). float32, ids' device."""
        logp = self.log_prob(ids)
        if math.isinf(num_tries):
            return torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        if self.unique:
            # log(-expm1(t * log1p(-p))): stable for tiny p and for p near 1.
            out = torch.log(-torch.expm1(num_tries * torch.log1p(-logp.exp())))
        else:
            out = logp + math.log(num_tries)
        return out.float()


class LogUniformSampler(NegativeSampler):
    """P(i) = (log(i+1) - log(i)) / log(N+1), i in 1..N; CDF(i) = log(i+1) / log(N+1)."""

    def log_prob(self, ids: torch.Tensor) -> torch.Tensor:
        i = ids.to(torch.float64)
        return torch.log(torch.log1p(1.0 / i)) - math.log(math.log(self.n_items + 1))

    def draw(self, num: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # Inverse CDF: floor((N+1)^u) = i  <=>  log(i)/log(N+1) <= u < log(i+1)/log(N+1).
        u = torch.rand(num, dtype=torch.float64, generator=generator)
        ids = torch.floor(torch.exp(u * math.log(self.n_items + 1))).long()
        return ids.clamp_(1, self.n_items)


class UniformSampler(NegativeSampler):
    def log_prob(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.full(ids.shape, -math.log(self.n_items), dtype=torch.float64, device=ids.device)

    def draw(self, num: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.randint(1, self.n_items + 1, (num,), generator=generator)


SAMPLERS = {"log_uniform": LogUniformSampler, "uniform": UniformSampler}


class SampledSoftmaxLoss(nn.Module):
    """``forward(user_vec [B, d], target [B], item_table, negatives=None) -> scalar``; ``item_table`` is the
    ``[N+1, d]`` tensor or a module mapping ids to rows (``nn.Embedding``, or the batch's rows of a sharded table).

    ``hard_negative_beta`` > 0 turns on REMI's interest-aware hard negatives (IHN; Xie et al., RecSys 2023,
    ``NCELoss.sampled_softmax_loss`` in github.com/Tokkiu/REMI src/BasicModel.py): the negative mass
    sum_j exp(x_j) becomes M * sum_j w_j exp(x_j) with w = softmax_j(beta * x_j) (M valid negatives),
    i.e. an importance-weighted estimate under a sampler tilted towards high-scoring negatives. We apply it
    to the corrected logits x (log-Q, accidental hits removed), so beta = 0 is exactly the plain loss and,
    with uniform negatives (constant log-Q), it is exactly REMI's formula. As in REMI, gradients also flow
    through the weights.
    """

    def __init__(self, sampler: NegativeSampler, num_negatives: int, logq_correction: bool = True,
                 remove_accidental_hits: bool = True, hard_negative_beta: float = 0.0,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if hard_negative_beta < 0:
            raise ValueError("hard_negative_beta must be >= 0")
        self.sampler, self.num_negatives = sampler, num_negatives
        self.logq_correction, self.remove_accidental_hits = logq_correction, remove_accidental_hits
        self.hard_negative_beta = hard_negative_beta
        #: None: the global torch RNG (seeded by the training loop). Give each rank its own for distinct draws.
        self.generator = generator

    def sample(self) -> Negatives:
        """One draw of the batch's shared negatives."""
        return self.sampler.sample(self.num_negatives, generator=self.generator)

    def forward(self, user_vec: torch.Tensor, target: torch.Tensor, item_table,
                negatives: Optional[Negatives] = None) -> torch.Tensor:
        if negatives is None:
            negatives = self.sample()
        rows = item_table.__getitem__ if isinstance(item_table, torch.Tensor) else item_table
        neg_ids = negatives.ids.to(target.device)
        # The sampling, the lookups and log-Q stay here (data-dependent, float num_tries); ``self.core`` is pure
        # tensor work with fixed shapes, what eimf.training.compiled compiles.
        logq_pos = logq_neg = hits = None
        if self.logq_correction:
            logq_pos = self.sampler.log_q(target, negatives.num_tries)
            logq_neg = self.sampler.log_q(neg_ids, negatives.num_tries)
        if self.remove_accidental_hits:
            hits = neg_ids.unsqueeze(0) == target.unsqueeze(1)
        return self.core(user_vec, rows(target), rows(neg_ids), logq_pos, logq_neg, hits)

    def core(self, user_vec: torch.Tensor, pos_rows: torch.Tensor, neg_rows: torch.Tensor,
             logq_pos: Optional[torch.Tensor], logq_neg: Optional[torch.Tensor],
             hits: Optional[torch.Tensor]) -> torch.Tensor:
        """The loss from ``user_vec`` [B, d], the targets' rows [B, d], the negatives' rows [M, d], their log-Q
        ([B], [M]) and the accidental hits [B, M]. Always fp32, also under a bf16 autocast: logits of a few
        units in bf16 (8 mantissa bits) are off by ~0.05, a log-Q correction of the same order."""
        with torch.autocast(device_type=user_vec.device.type, enabled=False):
            return self._core(user_vec.float(), pos_rows.float(), neg_rows.float(), logq_pos, logq_neg, hits)

    def _core(self, user_vec, pos_rows, neg_rows, logq_pos, logq_neg, hits) -> torch.Tensor:
        pos = (user_vec * pos_rows).sum(-1)  # [B]
        neg = user_vec @ neg_rows.t()  # [B, M]
        if logq_pos is not None:
            pos = pos - logq_pos
            neg = neg - logq_neg.unsqueeze(0)
        lowest = torch.finfo(neg.dtype).min  # TF adds -FLT_MAX to accidental hits
        neg_masked = neg.masked_fill(hits, lowest) if hits is not None else neg
        if self.hard_negative_beta == 0:
            logits = torch.cat([pos.unsqueeze(1), neg_masked], dim=1)
            return (torch.logsumexp(logits, dim=1) - pos).mean()
        tilt = self.hard_negative_beta * neg
        if hits is not None:
            tilt = tilt.masked_fill(hits, lowest)
            n_valid = (~hits).sum(1).clamp(min=1).to(neg.dtype)
        else:
            n_valid = torch.full_like(pos, neg.shape[1])
        log_w = torch.log_softmax(tilt, dim=1)
        # clamp: a row whose negatives are all hits stays finite (and NaN-free in backward)
        log_neg_mass = torch.log(n_valid) + torch.logsumexp((log_w + neg_masked).clamp(min=lowest), dim=1)
        return (torch.logsumexp(torch.stack([pos, log_neg_mass], dim=1), dim=1) - pos).mean()


def build_loss(neg_cfg, n_items: int, batch_size: int, model_cfg=None) -> SampledSoftmaxLoss:
    """From ``cfg.negatives``; ``model_cfg.beta`` (REMI IHN) sets ``hard_negative_beta``."""
    if neg_cfg.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {neg_cfg.sampler!r}; choose one of {sorted(SAMPLERS)}")
    num = neg_cfg.num_negatives or neg_cfg.negatives_per_example * batch_size
    sampler = SAMPLERS[neg_cfg.sampler](n_items, unique=getattr(neg_cfg, "unique", False))
    beta = float(getattr(model_cfg, "beta", 0.0) or 0.0) if model_cfg is not None else 0.0
    return SampledSoftmaxLoss(sampler, num, logq_correction=neg_cfg.logq_correction,
                              remove_accidental_hits=neg_cfg.remove_accidental_hits, hard_negative_beta=beta)
