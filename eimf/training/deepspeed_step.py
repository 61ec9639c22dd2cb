"""DeepSpeed as a step runner: ZeRO stage 0-3, fp32 or bf16 (``train.precision``), with a torch optimizer handed in.

bf16 is DeepSpeed's ``torch_autocast`` section, not its ``bf16`` one: the same autocast as the other strategies
(parameters and optimizer state fp32, the sampled softmax in fp32), where the ``bf16`` section would turn the
module's weights themselves to bf16 and run every op in bf16. DeepSpeed then reduces the Linear layers' gradients
in bf16.

The engine replaces forward/backward/step; ZeRO shards optimizer state (1), gradients (2) and the
parameters themselves (3) across the ranks, so under stage 3 the item table (the bulk of the model) is
partitioned. Collective operations (gathering ZeRO-3 parameters for evaluation, broadcasting the early-
stopping decision) go through ``full_params`` and ``broadcast``, which every rank must call.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import deepspeed
import torch

from eimf.formats.checkpoints import HEAD as HEAD_FILE
from eimf.training.loop import StepRunner, check_precision
from eimf.training.replicated_head import ReplicatedHead, broadcast_object
from eimf.training.replicated_head import rank as _rank

CHECKPOINT_TAG = "deepspeed"


def deepspeed_config(micro_batch: int, zero_stage: int, precision: str) -> dict:
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.deepspeed.zero_stage must be 0-3, got {zero_stage}")
    check_precision(precision)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": False},  # weights stay fp32: bf16 is the autocast below
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }


class DeepSpeedStepRunner(ReplicatedHead, StepRunner):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
        self.zero_stage = config["zero_optimization"]["stage"]
        self.partitioned = self.zero_stage == 3
        # How to build the EIMF head's own optimizer later: the same kind and settings as the model's.
        self._optimizer_factory = (type(optimizer), dict(optimizer.defaults))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False,
        )
        self.model = self.engine.module
        self.precision = "bf16" if config.get("torch_autocast", {}).get("enabled") else "fp32"

    def _forward(self, *args):
        return self.engine(*args)

    def autocast(self, device_type: str):
        # the engine enters its own (torch_autocast); one entered here would make it switch autocast off
        return contextlib.nullcontext()

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # autograd also fills the head's gradients (it sits outside the engine)
        if self.head is not None:
            self._head_step()
        self.engine.step()

    def full_params(self):
        if self.zero_stage < 3:
            return contextlib.nullcontext()

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def broadcast(self, obj):
        return broadcast_object(obj)

    def item_rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.zero_stage < 3:
            return super().item_rows(ids)

        weight = self.model.item_emb.weight  # partitioned: gathered for the lookup (collective, every rank)
        with torch.no_grad(), deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            return torch.nn.functional.embedding(ids, weight).clone()

    def save(self, folder: Path) -> None:
        # Every rank writes its own shard files (distinct names), so Ray merges them into one checkpoint.
        self.engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG)
        if self.head is not None and _rank() == 0:  # replicas are identical: rank 0 writes them
            torch.save({"head": self.head.state_dict(), "optimizer": self.head_optimizer.state_dict()},
                       Path(folder) / HEAD_FILE)

    def load(self, folder: Path) -> None:
        if not (Path(folder) / CHECKPOINT_TAG).is_dir():  # DeepSpeed itself fails with a bare assert
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder} (expected {CHECKPOINT_TAG}/)")
        path, _ = self.engine.load_checkpoint(str(folder), tag=CHECKPOINT_TAG)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder}")
        if self.head is not None:
            head_file = Path(folder) / HEAD_FILE
            if not head_file.is_file():
                raise FileNotFoundError(f"{head_file}: the checkpoint has no EIMF head (trained without eimf?)")
            state = torch.load(head_file, map_location="cpu")
            self.head.load_state_dict(state["head"])
            self.head_optimizer.load_state_dict(state["optimizer"])

