"""EIMF auxiliary tasks (docs/design.md section 5): projection P, predictor g, interest matching and the two losses.

For a typical user with behaviour interests v_1..v_K (from the backbone, dim d) and frozen, unit-norm semantic
interests s_1..s_M (text encoder, dim D):

* **Matching** pi: a one-to-one assignment of semantic to behaviour interests maximising a similarity.
  ``matching_space="model"``: cos(v_k, P(s_m)) + cos(g(v_k), s_m), the pairs both auxiliary losses already find
  closest (circular: from a random start the first assignments are arbitrary and then reinforce themselves).
  ``"evidence"``: cos(v_k, e_m), with e_m the mean item embedding of the items the annotator cited for interest m
  (grounded in the behaviour space from the first step; an interest without evidence falls back to "model").
  Discrete, so computed without gradients. ``hungarian`` is optimal (scipy); ``greedy`` takes the best
  remaining pair first. With M > K only K semantic interests are matched; the others take no part.
* **Semantic prediction** L_sp = mean over matched pairs of 1 - cos(g(v_k), s_pi(k)).
* **Modality alignment** L_ma: symmetric InfoNCE over the N matched pairs of the batch, logits
  cos(h(v_i), P(s_j)) / tau, where h is the identity (``ma_projection="none"``) or a behaviour-side MLP
  (``"mlp"``: the loss then shapes h(v), and v, which retrieval uses, only through h). Every other matched
  semantic interest of the batch is a negative, except: near-copies of the positive's vector
  (cos > ``duplicate_cos``: the same user drawn twice, the same phrase for two users, two names of one genre), and
  with ``mask_own_interests`` the same row's other interests (they are the user's own, not another user's).

* **Item-level alignment** (``lambda_item > 0``): InfoNCE between the embeddings e_i of the batch's distinct
  target items and q(t_i), an MLP of their frozen text embeddings, the other targets as negatives: the item table
  itself is pulled toward the text geometry, on every batch, with no interest or matching involved.

P and g live in :class:`EIMFHead`, apart from the backbone: they are trained with it but never exported.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

MATCHING_METHODS = ("hungarian", "greedy")


class Matching(NamedTuple):
    #: [b, M] int64: the behaviour interest matched to semantic interest m (0 where ``matched`` is False).
    behaviour: torch.Tensor
    #: [b, M] bool: semantic interest m is real and matched.
    matched: torch.Tensor


def match_interests(similarity: torch.Tensor, sem_mask: torch.Tensor, method: str = "hungarian") -> Matching:
    """One-to-one assignment maximising the total ``similarity`` [b, K, M] over real semantic interests."""
    if method not in MATCHING_METHODS:
        raise ValueError(f"matching must be one of {MATCHING_METHODS}, got {method!r}")
    sim = similarity.detach().float()
    b, K, M = sim.shape
    sem_mask = sem_mask.bool()
    if method == "greedy":
        return _greedy(sim, sem_mask)

    # One device->host copy for the batch; each user's K x M_u problem is tiny.
    sim_np, mask_np = sim.cpu().numpy(), sem_mask.cpu().numpy()
    beh = np.zeros((b, M), dtype=np.int64)
    matched = np.zeros((b, M), dtype=bool)
    for u in range(b):
        cols = np.flatnonzero(mask_np[u])
        if len(cols) == 0:
            continue
        rows, c = linear_sum_assignment(sim_np[u][:, cols], maximize=True)
        beh[u, cols[c]] = rows
        matched[u, cols[c]] = True
    return Matching(torch.from_numpy(beh).to(sim.device), torch.from_numpy(matched).to(sim.device))


def _greedy(sim: torch.Tensor, sem_mask: torch.Tensor) -> Matching:
    b, K, M = sim.shape
    sim = sim.masked_fill(~sem_mask[:, None, :], -torch.inf)
    beh = torch.zeros(b, M, dtype=torch.long, device=sim.device)
    matched = torch.zeros(b, M, dtype=torch.bool, device=sim.device)
    rows = torch.arange(b, device=sim.device)
    for _ in range(min(K, M)):  # each round takes every user's best remaining pair
        best, flat = sim.flatten(1).max(dim=1)
        ok = torch.isfinite(best)
        k, m = flat // M, flat % M
        beh[rows[ok], m[ok]] = k[ok]
        matched[rows[ok], m[ok]] = True
        sim[rows[ok], k[ok], :] = -torch.inf
        sim[rows[ok], :, m[ok]] = -torch.inf
    return Matching(beh, matched)


def semantic_prediction_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(predicted_i, target_i)) over rows; 0 for no rows."""
    if predicted.shape[0] == 0:
        return predicted.sum() * 0.0
    return (1.0 - F.cosine_similarity(predicted, target, dim=-1)).mean()


def alignment_loss(behaviour: torch.Tensor, semantic: torch.Tensor, temperature: float,
                   not_negative: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned pairs [N, d]: logits cos(b_i, s_j) / tau, positives on the diagonal.

    ``not_negative`` [N, N] bool marks off-diagonal pairs to leave out of both softmaxes (false negatives).
    """
    n = behaviour.shape[0]
    if n == 0:
        return behaviour.sum() * 0.0 + semantic.sum() * 0.0
    logits = F.normalize(behaviour, dim=-1) @ F.normalize(semantic, dim=-1).t() / temperature
    if not_negative is not None:
        eye = torch.eye(n, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(not_negative & ~eye, -torch.inf)
    labels = torch.arange(n, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


MA_PROJECTIONS = ("none", "mlp")
MATCHING_SPACES = ("model", "evidence")


class EIMFHead(nn.Module):
    """P (semantic dim -> d), g (d -> semantic dim) and optionally h (d -> d) with the weighted auxiliary loss of a
    batch."""

    def __init__(self, dim: int, semantic_dim: int = 384, predictor_hidden: int = 256, temperature: float = 0.1,
                 lambda_sp: float = 0.1, lambda_ma: float = 0.1, matching: str = "hungarian",
                 ma_projection: str = "none", duplicate_cos: float = 1.0 - 1e-6, mask_own_interests: bool = False,
                 matching_space: str = "model", lambda_item: float = 0.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        if matching not in MATCHING_METHODS:
            raise ValueError(f"matching must be one of {MATCHING_METHODS}, got {matching!r}")
        if ma_projection not in MA_PROJECTIONS:
            raise ValueError(f"ma_projection must be one of {MA_PROJECTIONS}, got {ma_projection!r}")
        if matching_space not in MATCHING_SPACES:
            raise ValueError(f"matching_space must be one of {MATCHING_SPACES}, got {matching_space!r}")
        if not -1.0 <= duplicate_cos <= 1.0:
            raise ValueError(f"duplicate_cos must be in [-1, 1], got {duplicate_cos}")
        self.dim, self.semantic_dim = dim, semantic_dim
        self.temperature, self.lambda_sp, self.lambda_ma, self.matching = temperature, lambda_sp, lambda_ma, matching
        self.duplicate_cos, self.mask_own_interests = float(duplicate_cos), bool(mask_own_interests)
        self.matching_space = matching_space
        self.projection = nn.Linear(semantic_dim, dim)  # P
        if predictor_hidden > 0:  # g
            self.predictor = nn.Sequential(nn.Linear(dim, predictor_hidden), nn.GELU(),
                                           nn.Linear(predictor_hidden, semantic_dim))
        else:
            self.predictor = nn.Linear(dim, semantic_dim)
        # h: the alignment acts on h(v); absent from old checkpoints' state, so only built when asked for
        self.behaviour_projection = (nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
                                     if ma_projection == "mlp" else None)
        self.lambda_item = float(lambda_item)
        # q: item text embedding -> d, for the item-level alignment
        self.item_projection = (nn.Sequential(nn.Linear(semantic_dim, predictor_hidden or dim), nn.GELU(),
                                              nn.Linear(predictor_hidden or dim, dim)) if lambda_item > 0 else None)
        #: [N + 1, D] frozen item text embeddings (not a buffer: never saved); :meth:`set_item_text`.
        self.item_text: Optional[torch.Tensor] = None

    def set_item_text(self, table) -> None:
        self.item_text = torch.as_tensor(np.asarray(table), dtype=torch.float32)

    def item_alignment(self, item_rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """InfoNCE between ``item_rows`` [n, d] (the table's rows of distinct ``ids``) and q(text of ids)."""
        if self.item_projection is None or self.item_text is None:
            raise RuntimeError("item alignment needs lambda_item > 0 and set_item_text(table)")
        text = self.item_text[ids.cpu()].to(item_rows.device)
        has_text = text.abs().sum(-1) > 0  # items without text take no part
        return alignment_loss(item_rows[has_text].float(), self.item_projection(text[has_text]), self.temperature)

    @property
    def needs_evidence(self) -> bool:
        """True when :meth:`forward` wants ``grounding`` (the evidence items' mean embeddings)."""
        return self.matching_space == "evidence"

    @classmethod
    def from_config(cls, cfg, semantic_dim: int) -> "EIMFHead":
        """From a :class:`eimf.config.Config` (``model.dim``, ``eimf.*`` and ``eimf.experimental.*``)."""
        e, x = cfg.eimf, cfg.eimf.experimental
        return cls(cfg.model.dim, semantic_dim, e.predictor_hidden, e.temperature, e.lambda_sp, e.lambda_ma,
                   e.matching, x.ma_projection, e.duplicate_cos, x.mask_own_interests, x.matching_space,
                   x.lambda_item)

    def match(self, interests: torch.Tensor, sem: torch.Tensor, sem_mask: torch.Tensor,
              grounding: Optional[torch.Tensor] = None) -> Matching:
        """``grounding`` [b, M, d]: mean embedding of each semantic interest's evidence items (zero: none)."""
        with torch.no_grad():
            v = F.normalize(interests.float(), dim=-1)
            proj = F.normalize(self.projection(sem), dim=-1)
            pred = F.normalize(self.predictor(interests.float()), dim=-1)
            sim = torch.einsum("bkd,bmd->bkm", v, proj) + torch.einsum("bkd,bmd->bkm", pred, F.normalize(sem, dim=-1))
            if self.matching_space == "evidence":
                if grounding is None:
                    raise ValueError("matching_space='evidence' needs the evidence items' embeddings (grounding)")
                grounding = grounding.float()
                grounded = torch.einsum("bkd,bmd->bkm", v, F.normalize(grounding, dim=-1))
                has = grounding.abs().sum(-1) > 0  # [b, M]
                sim = torch.where(has[:, None, :], grounded, sim)
        return match_interests(sim, sem_mask, self.matching)

    def forward(self, interests: torch.Tensor, sem: torch.Tensor, sem_mask: torch.Tensor,
                grounding: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """interests [b, K, d] of the typical rows, sem [b, M, D] unit vectors, sem_mask [b, M] (and ``grounding``
        [b, M, d] for evidence matching) -> {"semantic_prediction", "alignment" (unweighted), "loss" (weighted
        sum)}."""
        sem = sem.to(self.projection.weight.dtype)
        m = self.match(interests, sem, sem_mask, grounding)
        u, j = m.matched.nonzero(as_tuple=True)
        v = interests[u, m.behaviour[u, j]].float()  # [N, d] matched behaviour interests
        s = sem[u, j]  # [N, D] their semantic interests
        sp = semantic_prediction_loss(self.predictor(v), s)
        s_unit = F.normalize(s, dim=-1)
        not_negative = (s_unit @ s_unit.t()) > self.duplicate_cos
        if self.mask_own_interests:
            not_negative = not_negative | (u[:, None] == u[None, :])
        behaviour = self.behaviour_projection(v) if self.behaviour_projection is not None else v
        ma = alignment_loss(behaviour, self.projection(s), self.temperature, not_negative=not_negative)
        return {"semantic_prediction": sp, "alignment": ma, "loss": self.lambda_sp * sp + self.lambda_ma * ma}

    @torch.no_grad()
    def predict_semantic(self, interests: torch.Tensor) -> torch.Tensor:
        """g(v) L2-normalised: behaviour interests [..., d] -> [..., D] in the text-encoder space."""
        return F.normalize(self.predictor(interests.to(self.projection.weight.dtype)), dim=-1)
