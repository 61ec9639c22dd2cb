"""How a training process uses its hardware: its threads (set here and nowhere else in training), the precision
``train.precision=auto`` resolves to, and its optimizer kernel."""
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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 in hardware: a CUDA GPU of compute capability 8.0 or newer, a CPU with
    AVX-512 BF16 or AMX. Elsewhere torch emulates bf16, which is slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(setting: str, device: torch.device = torch.device("cpu")) -> str:
    """``train.precision`` as trained on ``device``: ``auto`` is bf16 where the device has native bf16, else fp32
    (no difference in accuracy from fp32 on ML-1M and Beauty: docs/results.md, "bf16 against fp32")."""
    if setting != "auto":
        return setting
    return "bf16" if native_bf16(device) else "fp32"


def agreed_precision(setting: str, device: torch.device) -> str:
    """:func:`resolve_precision` agreed by every worker of the process group: ``auto`` is bf16 only if every
    worker's device has native bf16, so one old host cannot leave a run half emulated."""
    if setting != "auto" or not torch.distributed.is_initialized():
        return resolve_precision(setting, device)
    answers = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(answers, resolve_precision(setting, device))
    return "bf16" if all(a == "bf16" for a in answers) else "fp32"


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
