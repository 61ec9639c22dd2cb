"""EIMF multi-task training set-up (docs/design.md section 5): annotations -> semantic vectors -> head and batches.

The runner calls :func:`build_eimf` after building the step runner and *before* loading a checkpoint (the head's
parameters must be in the optimizer whose state is restored), then :func:`eimf_batches` for its users.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import numpy as np

from eimf.data.sampling import SemanticTrainSampler
from eimf.modules.alignment import EIMFHead

log = logging.getLogger(__name__)


def load_semantics(path: str) -> Dict[int, np.ndarray]:
    """``{user: [M_u, D] float32}`` from ``annotations.parquet`` (file or folder, local or ``s3://``): ok rows only."""
    from eimf.semantic.annotate import read_annotations, semantic_vectors

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
    from eimf.semantic.annotate import read_annotations, semantic_evidence, semantic_windows

    needs = cfg.eimf.matching_space == "evidence" or cfg.eimf.window_overlap > 0
    if needs and not cfg.eimf.annotations:
        raise ValueError("eimf.matching_space=evidence and eimf.window_overlap > 0 read eimf.annotations")
    annotations = read_annotations(cfg.eimf.annotations) if cfg.eimf.annotations else None
    # the cited items ground the matching (EIMFHead.match)
    evidence = semantic_evidence(annotations) if cfg.eimf.matching_space == "evidence" else None
    windows = None
    if cfg.eimf.window_overlap > 0:
        windows = semantic_windows(annotations)
    elif annotations is not None:  # only measured (logged): older annotation sets do not record it
        try:
            windows = semantic_windows(annotations)
        except ValueError:
            pass
    return SemanticTrainSampler(sequences, users, semantics, maxlen=cfg.model.maxlen, batch_size=batch_size,
                                typical_share=cfg.eimf.typical_share, min_cut=cfg.train.min_cut, seed=seed,
                                mode=cfg.eimf.typical_sampling, require_typical=cfg.train.num_workers == 1,
                                evidence=evidence, windows=windows, window_overlap_share=cfg.eimf.window_overlap)
