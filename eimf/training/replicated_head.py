"""EIMF's head (P, g) replicated on every rank beside a distributed backbone (DeepSpeed, or the sharded table).

~0.2 M parameters: no point in sharding them. Their gradients are averaged across ranks after each backward and
their own optimizer (the model's kind and settings) steps them, so every replica stays identical. The head comes
after the backbone's wrapper is built (it needs the annotations), so it cannot join that wrapper's optimizer.
"""
from __future__ import annotations

import torch


class ReplicatedHead:
    """Mixin for a ``StepRunner`` with ``_optimizer_factory = (optimizer class, its defaults)``."""

    head = None
    head_optimizer = None

    def attach_head(self, head: torch.nn.Module) -> None:
        if self.head is not None:
            raise RuntimeError("a head is already attached")
        kind, defaults = self._optimizer_factory
        self.head = head
        self.head_optimizer = kind(head.parameters(), **defaults)
        if distributed():
            for p in head.parameters():  # identical start on every rank, whatever each rank's RNG did
                torch.distributed.broadcast(p.data, src=0)

    def _head_step(self) -> None:
        if distributed():
            # Every rank joins the collective, also one whose batch had no typical row (the head was not in its
            # graph: zero gradients), or the other ranks would wait for it forever.
            params = list(self.head.parameters())
            world = torch.distributed.get_world_size()
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in params])  # one collective for the whole head
            torch.distributed.all_reduce(flat)
            flat /= world
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).clone()
                offset += n
        self.head_optimizer.step()
        self.head_optimizer.zero_grad(set_to_none=True)


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (a collective: every rank calls it)."""
    objs = [obj]
    torch.distributed.broadcast_object_list(objs, src=0)
    return objs[0]
