"""The single-device pieces every training worker builds: model, loss, optimizer and step runner, from the config.

The distributed layer (eimf.training.runner, eimf.training.worker) composes them; benchmarks and tests build them
directly to time or check a step without Ray.
"""
from __future__ import annotations

import resource
from typing import Optional

import numpy as np
import torch

from eimf.config import Config
from eimf.models import build_model
from eimf.models.negatives import build_loss
from eimf.training.compiled import compile_step
from eimf.training.hardware import adam, resolve_precision
from eimf.training.loop import StepRunner


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_components(cfg: Config, n_items: int, micro_batch: Optional[int] = None):
    """Model, loss and plain-torch step runner: the single-device pieces every runner shares (with
    ``train.precision`` and ``train.compile`` applied; :func:`deepspeed_runner` carries them over)."""
    model = build_model(cfg.model, n_items)
    loss_fn = build_loss(cfg.negatives, n_items, micro_batch or cfg.train.batch_size, cfg.model)
    lr = cfg.train.lr if cfg.train.lr is not None else model.default_lr
    optimizer = adam(model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    runner = StepRunner(model, optimizer, precision=resolve_precision(cfg.train.precision))
    if cfg.train.compile:
        runner.compiled = compile_step(model, loss_fn)
    return model, loss_fn, runner, lr


def deepspeed_runner(cfg: Config, plain: StepRunner, micro_batch: int):
    """The DeepSpeed step runner around :func:`build_components`' model and optimizer (call inside the workers'
    process group), with ``train.precision`` as its autocast and the same compiled parts."""
    from eimf.training.deepspeed_step import DeepSpeedStepRunner, deepspeed_config  # DeepSpeed: heavy, optional

    runner = DeepSpeedStepRunner(plain.model, plain.optimizer,
                                 deepspeed_config(micro_batch, cfg.train.deepspeed.zero_stage, plain.precision))
    runner.compiled = plain.compiled
    return runner


def replicated_runner(cfg: Config, plain: StepRunner, micro_batch: int) -> StepRunner:
    """The runner of a strategy that replicates the whole model (all but ``sharded``): DeepSpeed where
    :func:`use_deepspeed` says so, plain data parallelism for ``train.strategy=torch`` over several workers, else
    ``plain`` itself (call inside the workers' process group)."""
    if use_deepspeed(cfg):
        return deepspeed_runner(cfg, plain, micro_batch)
    if cfg.train.scaling.num_workers > 1:
        from eimf.training.data_parallel import DataParallelStepRunner

        return DataParallelStepRunner(plain)
    return plain


STRATEGIES = ("auto", "torch", "deepspeed", "sharded")


def build_sharded_components(cfg: Config, n_items: int, micro_batch: int, device: torch.device):
    """The sharded path's model, loss and step runner (call inside the workers' process group)."""
    # TorchRec is optional (train.strategy=sharded) and slow to import
    from eimf.training.sharded import (ShardedItemModel, ShardedStepRunner, default_sparse_lr,
                                       sparse_optimizer_params)

    model = ShardedItemModel(cfg.model, n_items)
    lr = cfg.train.lr if cfg.train.lr is not None else model.backbone.default_lr
    t = cfg.train
    gpu, opt = t.scaling.use_gpu, t.sharded.optimizer
    sparse_lr = t.sharded.lr if t.sharded.lr is not None else default_sparse_lr(opt, lr, gpu)
    sparse = sparse_optimizer_params(opt, sparse_lr, gpu)
    runner = ShardedStepRunner(model, lr, t.weight_decay, sparse, device, init_seed=t.seed,
                                precision=resolve_precision(t.precision, device))
    loss_fn = build_loss(cfg.negatives, n_items, micro_batch, cfg.model)
    if t.compile:
        runner.compiled = compile_step(runner.model, loss_fn)
    return runner.model, loss_fn, runner, lr


def use_deepspeed(cfg: Config) -> bool:
    if cfg.train.strategy not in STRATEGIES:
        raise ValueError(f"train.strategy must be one of {', '.join(STRATEGIES)}, got {cfg.train.strategy!r}")
    if cfg.train.strategy == "sharded":
        return False
    if cfg.train.strategy == "auto":
        return cfg.train.scaling.num_workers > 1 or cfg.train.deepspeed.zero_stage > 0
    return cfg.train.strategy == "deepspeed"


def per_worker_batch(cfg: Config) -> int:
    """``train.batch_size`` is the global batch: N workers each take an equal share."""
    n = cfg.train.scaling.num_workers
    if cfg.train.batch_size % n:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide by train.scaling.num_workers={n}")
    return cfg.train.batch_size // n


def load_item_init(model, table) -> None:
    """Copy the ``model.item_init=text`` table ``[N + 1, d]`` into the model: the whole table, or this worker's
    rows."""
    with torch.no_grad():
        if hasattr(model, "local_rows"):  # the row-sharded table: only this worker's slice is read
            rows, offset = model.local_rows()
            rows.copy_(torch.from_numpy(np.ascontiguousarray(table[offset:offset + rows.shape[0]])))
        else:
            weight = model.item_emb.weight
            if tuple(weight.shape) != table.shape:
                raise ValueError(f"model.item_init: a {table.shape} table for a {tuple(weight.shape)} item table")
            weight.copy_(torch.from_numpy(np.ascontiguousarray(table)))
