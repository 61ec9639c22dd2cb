"""Plain data parallelism as a step runner (``train.strategy=torch`` with ``train.scaling.num_workers > 1``).

Every rank holds the whole model and its own optimizer; after each backward the gradients are averaged with one
``all_reduce`` of one flat buffer, so the replicas take identical steps. Each parameter's ``.grad`` is a view into
that buffer (as DDP's ``gradient_as_bucket_view``): backward accumulates straight into it and nothing is copied.
What it costs and gains on one host: docs/benchmarks/train_throughput.md, "Data parallelism on one host".
``train.strategy=auto`` still picks DeepSpeed (ZeRO-0, the same averaging) for several workers.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from eimf.training.loop import StepRunner
from eimf.training.replicated_head import FlatGradients, broadcast_object


class DataParallelStepRunner(StepRunner):
    """The plain runner's model, optimizer, precision and compiled parts, replicated over the process group."""

    def __init__(self, plain: StepRunner):
        super().__init__(plain.model, plain.optimizer, plain.precision)
        self.compiled = plain.compiled
        self._sync(self.model.parameters())
        self._sync(self.model.buffers())
        self._grads = self._bind_grads()

    def _sync(self, tensors) -> None:
        """Rank 0's values everywhere: identical replicas whatever each rank's initialisation did."""
        for t in tensors:
            dist.broadcast(t.data, src=0)

    def _bind_grads(self) -> FlatGradients:
        """Every parameter the optimizer trains, EIMF's head among them once attached, in one buffer."""
        return FlatGradients(p for group in self.optimizer.param_groups for p in group["params"])

    def attach_head(self, head: torch.nn.Module) -> None:
        super().attach_head(head)  # into the same optimizer, so into the same buffer below
        self._sync(head.parameters())
        self._grads = self._bind_grads()

    def backward_and_step(self, loss: torch.Tensor) -> None:
        # Zeroed in place: backward accumulates into the views (the plain runner's set_to_none would undo them).
        self._grads.zero()
        loss.backward()
        self._grads.average()
        self.optimizer.step()

    def broadcast(self, obj):
        return broadcast_object(obj)

    def save(self, folder: Path) -> None:
        if dist.get_rank() == 0:  # the replicas are identical: one copy
            super().save(folder)

    # load: the plain one; every rank reads the chief's copy (it copies into the parameters, the views stay)
