"""EIMF multi-task training set-up (docs/design.md section 5): annotations -> semantic vectors -> head and batches.

The runner calls :func:`build_eimf` after building the step runner and *before* loading a checkpoint (the head's
parameters must be in the optimizer whose state is restored), then :func:`eimf_batches` for its users, and trains
with :class:`EIMFTrainer`: the generic loop (``eimf.training.loop``) with the EIMF step, so the loop itself knows
nothing of semantics.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from eimf.data.sampling import SemanticBatch, SemanticTrainSampler
from eimf.formats.annotations import read_annotations, semantic_evidence, semantic_vectors, semantic_windows
from eimf.modules.alignment import EIMFHead
from eimf.training.loop import Trainer, to_tensors

log = logging.getLogger(__name__)


def load_semantics(path: str) -> Dict[int, np.ndarray]:
    """``{user: [M_u, D] float32}`` from ``annotations.parquet`` (file or folder, local or ``s3://``): ok rows only."""
    semantics = semantic_vectors(read_annotations(path))
    if not semantics:
        raise ValueError(f"{path}: no successful annotation to train with")
    return semantics


def build_eimf(cfg, step_runner, annotations: Optional[str] = None) -> Dict[int, np.ndarray]:
    """Load the semantic vectors (``annotations`` or ``cfg.eimf.annotations``), attach a new :class:`EIMFHead`
    to ``step_runner`` (trained by its optimizer, saved in its checkpoints); return the vectors."""
    path = annotations or cfg.eimf.annotations
    if not path:
        raise ValueError("eimf.enabled needs eimf.annotations (the annotation step's annotations.parquet)")
    semantics = load_semantics(path)
    dims = {v.shape[1] for v in semantics.values()}
    if len(dims) != 1:
        raise ValueError(f"{path}: semantic vectors of several sizes {sorted(dims)}")
    device = next(step_runner.model.parameters()).device
    step_runner.attach_head(EIMFHead.from_config(cfg, dims.pop()).to(device))
    log.info("EIMF: %d annotated users, %d interests; lambda_sp %g, lambda_ma %g, %s matching",
             len(semantics), sum(len(v) for v in semantics.values()), cfg.eimf.lambda_sp, cfg.eimf.lambda_ma,
             cfg.eimf.matching)
    return semantics


def eimf_batches(cfg, users: Sequence[int], sequences: Sequence, semantics: Dict[int, np.ndarray],
                 batch_size: int, seed: int) -> SemanticTrainSampler:
    """Batches with ``eimf.typical_share`` typical rows carrying their semantic interests, drawn as
    ``eimf.typical_sampling`` says (see :class:`SemanticTrainSampler`). Under N workers ``users`` is one
    worker's shard, which may hold no typical user at a small budget: it then trains without typical rows."""

    x = cfg.eimf.experimental
    needs = x.matching_space == "evidence" or x.window_overlap > 0
    if needs and not cfg.eimf.annotations:
        raise ValueError("eimf.experimental.matching_space=evidence and eimf.experimental.window_overlap > 0 read "
                         "eimf.annotations")
    annotations = read_annotations(cfg.eimf.annotations) if cfg.eimf.annotations else None
    # the cited items ground the matching (EIMFHead.match)
    evidence = semantic_evidence(annotations) if x.matching_space == "evidence" else None
    windows = None
    if x.window_overlap > 0:
        windows = semantic_windows(annotations)
    elif annotations is not None:  # only measured (logged): older annotation sets do not record it
        try:
            windows = semantic_windows(annotations)
        except ValueError:
            pass
    return SemanticTrainSampler(sequences, users, semantics, maxlen=cfg.model.maxlen, batch_size=batch_size,
                                typical_share=cfg.eimf.typical_share, min_cut=cfg.train.min_cut, seed=seed,
                                mode=cfg.eimf.typical_sampling, require_typical=cfg.train.scaling.num_workers == 1,
                                evidence=evidence, windows=windows, window_overlap_share=x.window_overlap)


class EIMFTrainer(Trainer):
    """:class:`~eimf.training.loop.Trainer` whose step on a :class:`SemanticBatch` adds the auxiliary losses of the
    attached :class:`EIMFHead` (docs/design.md section 5); any other batch trains as the backbone's."""

    _warned_no_semantics = False

    def step(self, batch) -> Dict[str, float]:
        head = self.runner.head
        if head is not None and isinstance(batch, SemanticBatch):
            hist, mask, target = to_tensors(batch[:3], self.device)
            return self._eimf_step(hist, mask, target, batch, head)
        if head is not None and not self._warned_no_semantics:
            log.warning("an EIMF head is attached but the batches carry no semantic interests: no auxiliary loss")
            self._warned_no_semantics = True
        return super().step(batch)

    def examples_in(self, batch) -> int:
        # rows after rec_rows (extra sampling) feed the auxiliary losses only: not examples of the recommender
        if isinstance(batch, SemanticBatch) and batch.rec_rows >= 0:
            return batch.rec_rows
        return super().examples_in(batch)

    def _eimf_step(self, hist, mask, target, batch: SemanticBatch, head) -> Dict[str, float]:
        """L = L_main + lambda_sp * L_sp + lambda_ma * L_ma, the auxiliary terms on the typical rows only."""
        n_rec = batch.rec_rows if batch.rec_rows >= 0 else len(target)
        out = self.runner.forward(hist[:n_rec], mask[:n_rec], target[:n_rec], self.loss_fn, True)
        interests = out.pop("interests")
        item_loss = None
        if head.lambda_item > 0:  # right after the forward: on the sharded path its gathered rows are the targets'
            ids = torch.unique(target[:n_rec])
            item_loss = head.item_alignment(self.runner.batch_item_rows(ids), ids)
        # rows for the auxiliary losses only (eimf.typical_sampling=extra): interests, no recommendation loss. A
        # collective runner makes the call on every rank under extra, also on a shard with no typical user (no such
        # rows), so that the lookups stay in step; under oversample no rank has such rows, and none makes the call
        # (at 667K items that call was a fifth of the sharded EIMF step: docs/benchmarks/train_throughput.md).
        extra = self.cfg.eimf.typical_sampling == "extra"
        if n_rec < len(target) or (self.runner.collective_eval and extra):
            interests = torch.cat([interests, self.runner.forward(hist[n_rec:], mask[n_rec:])])
        grounding = None
        if head.needs_evidence:  # before the row check: on the sharded path the lookup is collective
            if batch.evidence is None:
                raise ValueError("eimf.experimental.matching_space=evidence, but the batches carry no evidence items")
            evidence = torch.as_tensor(batch.evidence, device=self.device)
            with torch.no_grad():
                cited = self.runner.item_rows(evidence)  # [b, M, E, d]
            weight = (evidence > 0).unsqueeze(-1).to(cited.dtype)
            grounding = (cited * weight).sum(2) / weight.sum(2).clamp(min=1.0)  # zero where nothing is cited
        if len(batch.sem_rows):
            rows = torch.as_tensor(batch.sem_rows, device=self.device)
            aux = head(interests[rows], torch.as_tensor(batch.sem, device=self.device),
                       torch.as_tensor(batch.sem_mask, device=self.device), grounding)
        else:
            zero = out["loss"].new_zeros(())
            aux = {"semantic_prediction": zero, "alignment": zero, "loss": zero}
        loss = out["loss"] + aux["loss"]
        if item_loss is not None:
            loss = loss + head.lambda_item * item_loss
        self.runner.backward_and_step(loss)
        metrics = {k: float(v.detach()) for k, v in out.items()}
        metrics["loss/main"] = metrics["loss"]
        metrics["loss"] = float(loss.detach())
        metrics["loss/semantic_prediction"] = float(aux["semantic_prediction"].detach())
        metrics["loss/alignment"] = float(aux["alignment"].detach())
        if item_loss is not None:
            metrics["loss/item_alignment"] = float(item_loss.detach())
        return metrics
