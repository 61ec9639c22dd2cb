"""Plain data parallelism as a step runner (``train.strategy=torch`` with ``train.scaling.num_workers > 1``).

Every rank holds the whole model and its own optimizer; after each backward the gradients are averaged with one
``all_reduce`` of one flat buffer, so the replicas take identical steps. Each parameter's ``.grad`` is a view into
that buffer (as DDP's ``gradient_as_bucket_view``): backward accumulates straight into it and nothing is copied.
What it costs and gains on one host: docs/benchmarks/train_throughput.md, "Data parallelism on one host".
``train.strategy=auto`` still picks DeepSpeed (ZeRO-0, the same averaging) for several workers.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import torch
import torch.distributed as dist

from eimf.training.loop import StepRunner
from eimf.training.replicated_head import broadcast_object


class DataParallelStepRunner(StepRunner):
    """The plain runner's model, optimizer, precision and compiled parts, replicated over the process group."""

    def __init__(self, plain: StepRunner):
        super().__init__(plain.model, plain.optimizer, plain.precision)
        self.compiled = plain.compiled
        self.world = dist.get_world_size()
        self._flat = torch.empty(0)
        self._sync(self.model.parameters())
        self._sync(self.model.buffers())
        self._bind_grads()

    def _sync(self, tensors) -> None:
        """Rank 0's values everywhere: identical replicas whatever each rank's initialisation did."""
        for t in tensors:
            dist.broadcast(t.data, src=0)

    def _params(self) -> List[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def _bind_grads(self) -> None:
        """One fp32 buffer for every trained parameter's gradient, each ``.grad`` a view of its slice."""
        params = self._params()
        device = params[0].device if params else torch.device("cpu")
        self._flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=device)
        offset = 0
        for p in params:
            if p.dtype != torch.float32:
                raise TypeError(f"data parallel training keeps fp32 parameters; got {p.dtype} for a {tuple(p.shape)} "
                                f"parameter")
            p.grad = self._flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def attach_head(self, head: torch.nn.Module) -> None:
        super().attach_head(head)  # into the same optimizer, so into the same buffer below
        self._sync(head.parameters())
        self._bind_grads()

    def backward_and_step(self, loss: torch.Tensor) -> None:
        # Zeroed in place, never set to None: backward must accumulate into the views. A parameter outside this
        # step's graph (EIMF's head on a rank without typical rows) then contributes zeros, on every rank alike.
        self._flat.zero_()
        loss.backward()
        dist.all_reduce(self._flat)
        self._flat.div_(self.world)
        self.optimizer.step()

    def broadcast(self, obj):
        return broadcast_object(obj)

    def save(self, folder: Path) -> None:
        if dist.get_rank() == 0:  # the replicas are identical: one copy
            super().save(folder)

    # load: the plain one; every rank reads the chief's copy (it copies into the parameters, the views stay)
