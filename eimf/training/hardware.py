"""How a training process uses the CPU: its threads (set here and nowhere else in training) and its optimizer
kernel."""
from __future__ import annotations

import logging
import os
from typing import Iterable

import torch

log = logging.getLogger(__name__)


def set_threads(threads: int) -> int:
    """The training process's CPU threads: torch's intra-op pool (OpenMP, MKL, oneDNN) and faiss's, both ``threads``;
    ``OMP_NUM_THREADS`` for child processes (inductor's compile workers) unless already set. No ``KMP_*`` and no
    affinity: torch's CPU wheel runs GNU OpenMP (``torch.__config__.parallel_info()``), which ignores ``KMP_*``,
    and pinning cores on a host shared with other processes has not been measured to pay."""
    from eimf.evaluation import set_faiss_threads  # faiss is heavy: only when threads are set

    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    set_faiss_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return threads


def adam(params: Iterable, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with torch's fused kernel where the parameters' device has one (CPU and CUDA in torch 2.13: one kernel
    per step for all parameters instead of several ops per tensor), else the multi-tensor ``foreach`` one. Same
    update as the plain loop (tests/test_precision_compile.py)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError) as e:  # a device or dtype without the fused kernel
        log.info("fused Adam unavailable (%s): foreach", e)
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)
