"""EIMF's head (P, g) replicated on every rank beside a distributed backbone (DeepSpeed, or the sharded table).

~0.2 M parameters: no point in sharding them. Their gradients are averaged across ranks after each backward and
their own optimizer (the model's kind and settings) steps them, so every replica stays identical. The head comes
after the backbone's wrapper is built (it needs the annotations), so it cannot join that wrapper's optimizer.
"""
from __future__ import annotations

from typing import Iterable

import torch


class FlatGradients:
    """The ``.grad`` of every trained parameter in ``params`` is a view into one fp32 buffer, so one ``all_reduce``
    averages them all across ranks (as DDP's ``gradient_as_bucket_view``): backward accumulates straight into the
    buffer and nothing is copied. Clear them with :meth:`zero`, never by setting them to None, or backward stops
    writing into the buffer. A parameter outside a step's graph keeps zeros, so every rank joins alike."""

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.dtype != torch.float32:
                raise TypeError(f"averaged gradients need fp32 parameters; got {p.dtype} for a {tuple(p.shape)} "
                                f"parameter")
        device = params[0].device if params else torch.device("cpu")
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=device)
        offset = 0
        for p in params:
            p.grad = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def zero(self) -> None:
        self.buffer.zero_()

    def average(self) -> None:
        """The mean over ranks, in place (a collective: every rank calls it)."""
        torch.distributed.all_reduce(self.buffer)
        self.buffer.div_(torch.distributed.get_world_size())


class ReplicatedHead:
    """Mixin for a ``StepRunner`` with ``_optimizer_factory = (optimizer class, its defaults)``."""

    head = None
    head_optimizer = None
    #: the head's gradients, averaged across ranks each step (None outside a process group)
    _head_grads = None

    def attach_head(self, head: torch.nn.Module) -> None:
        if self.head is not None:
            raise RuntimeError("a head is already attached")
        kind, defaults = self._optimizer_factory
        self.head = head
        self.head_optimizer = kind(head.parameters(), **defaults)
        if distributed():
            for p in head.parameters():  # identical start on every rank, whatever each rank's RNG did
                torch.distributed.broadcast(p.data, src=0)
            self._head_grads = FlatGradients(head.parameters())

    def _head_step(self) -> None:
        if self._head_grads is None:
            self.head_optimizer.step()
            self.head_optimizer.zero_grad(set_to_none=True)
            return
        # Every rank joins the collective, also one whose batch had no typical row (the head was not in its
        # graph: zero gradients), or the other ranks would wait for it forever.
        self._head_grads.average()
        self.head_optimizer.step()
        self._head_grads.zero()


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (a collective: every rank calls it)."""
    objs = [obj]
    torch.distributed.broadcast_object_list(objs, src=0)
    return objs[0]
