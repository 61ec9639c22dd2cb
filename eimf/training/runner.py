"""The distributed layer: Ray Train's ``TorchTrainer`` around the single-process loop.

:func:`fit` starts ``train.scaling.num_workers`` workers (eimf.training.worker) on the prepared dataset; each builds the
model, resumes from Ray Train's latest checkpoint when there is one, trains and reports a checkpoint at every
evaluation. The last report carries the best model and its metrics; the train step (eimf.steps.train) exports it.
One config object per concern, as Ray Train has them: scaling, failure, run (storage and checkpoints).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from eimf import fs
from eimf.config import Config, ConfigError, eimf_home, to_dict
from eimf.data.parsers import DataError
from eimf.data.sampling import cut_examples
from eimf.models.text_init import item_text_embeddings, text_init_table
from eimf.training.warm_start import WarmStart
from eimf.training.worker import train_worker

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    run_name: str
    #: the last checkpoint: the best model's weights and EIMF head beside the latest state, and the final metrics
    #: (``metrics.json``)
    checkpoint: Checkpoint
    #: where the Ray Train run folder is (``<storage_path>/<run_name>``), local or ``s3://``
    storage_path: str


def _cut_dataset(data_path: str, cfg: Config):
    """Ray Dataset of training users with one random cut per user per epoch (docs/design.md section 3)."""
    maxlen, min_cut = cfg.model.maxlen, cfg.train.min_cut
    filesystem, path = fs.resolve(fs.join(data_path, "train.parquet"))
    users = ray.data.read_parquet(path, filesystem=filesystem)
    if cfg.train.input == "memory":
        return users

    def cut(batch):
        # A fresh generator per call: every epoch re-cuts every user differently.
        return cut_examples(batch["items"], maxlen, min_cut, np.random.default_rng())

    return users.map_batches(cut, batch_format="numpy")


def restart_attempts(timeout_s: float) -> int:
    """Ray Train retries a worker group that cannot get its resources every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    (60 s by default), without limit: the retries after the first try that together spend about ``timeout_s``."""
    every = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
    return max(0, math.ceil(timeout_s / every) - 1)


def _alive_nodes() -> Dict[str, str]:
    """Node id -> ``hostname (ip)`` of the cluster's live nodes."""
    return {n["NodeID"]: f"{n['NodeManagerHostname']} ({n['NodeManagerAddress']})" for n in ray.nodes() if n["Alive"]}


def default_cpus_per_worker(n_workers: int, total: float) -> float:
    """One logical CPU per worker, but always leave one free: Ray Data's read and cut tasks run beside the
    workers, and on a 2-core laptop 2 workers holding both CPUs would starve them (the run would hang)."""
    if total >= n_workers + 1:
        return 1.0
    # Logical CPUs only (torch threads are set separately): a fraction keeps one whole CPU for Ray Data.
    return max(0.01, int(100 * (total - 1) / n_workers) / 100)


def run_name_of(cfg: Config) -> str:
    """``train.run_name``, default ``<dataset>-<backbone>-s<seed>-<time>``: the same name resumes its checkpoints."""
    return cfg.train.run_name or (
        f"{cfg.data.dataset}-{cfg.model.backbone}-s{cfg.train.seed}-{time.strftime('%Y%m%d-%H%M%S')}")


def storage_of(cfg: Config) -> str:
    return cfg.train.storage_path or os.path.abspath(os.path.join(eimf_home(), "runs"))


def check_cpu_reservation(n_workers: int, cpus_per_worker: int, cluster_cpus: float) -> None:
    """An explicit ``train.scaling.cpus_per_worker`` must leave one CPU of the cluster free: the workers' Ray Data
    tasks (reading and splitting the training users) wait for one, and a run whose workers hold every CPU waits
    forever without an error."""
    if n_workers * cpus_per_worker > cluster_cpus - 1:
        raise ConfigError(
            f"train.scaling.cpus_per_worker={cpus_per_worker} x train.scaling.num_workers={n_workers} reserves "
            f"{n_workers * cpus_per_worker} of the cluster's {cluster_cpus:g} CPUs, and Ray Data's tasks need one "
            f"free, so the run would hang; leave cpus_per_worker unset (each worker then reserves a share and uses "
            f"the node's cores / its workers as threads) or lower it")


def _scaling(cfg: Config) -> ScalingConfig:
    n_workers, cpus_per_worker = cfg.train.scaling.num_workers, cfg.train.scaling.cpus_per_worker
    total = float(ray.cluster_resources().get("CPU", 1.0))
    if cpus_per_worker:
        check_cpu_reservation(n_workers, cpus_per_worker, total)
    else:
        cpus_per_worker = default_cpus_per_worker(n_workers, total)
    return ScalingConfig(num_workers=n_workers, use_gpu=cfg.train.scaling.use_gpu,
                         resources_per_worker={"CPU": cpus_per_worker},
                         placement_strategy=cfg.train.scaling.placement_strategy)


def _run_config(cfg: Config, run_name: str, storage: str) -> RunConfig:
    # s3:// works on AWS as is; with AWS_ENDPOINT_URL(_S3) (MinIO, moto) Ray needs the file system.
    storage_path, storage_filesystem = fs.ray_storage(storage)
    return RunConfig(
        name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        failure_config=FailureConfig(max_failures=cfg.train.failure.max_failures,
                                     controller_failure_limit=restart_attempts(cfg.train.failure.restart_timeout_s)),
        callbacks=[StopOnRepeatingError()],
    )


#: Worker errors that a retry would meet again the same way: a setting, or the data.
REPEATING_ERRORS = (ConfigError, DataError)


class StopOnRepeatingError(UserCallback):
    """Ray Train retries every worker error up to ``train.failure.max_failures`` times. A :data:`REPEATING_ERRORS`
    one ends the run instead: raised here, on the controller, it is a controller error, which Ray Train's failure
    policy does not retry; :func:`repeating_error` finds it in what ``fit`` raises."""

    def after_exception(self, run_context, worker_exceptions: Dict[int, Exception]) -> None:
        for _, error in sorted(worker_exceptions.items()):
            if isinstance(error, REPEATING_ERRORS):
                raise error


def repeating_error(error: BaseException) -> Optional[Exception]:
    """The :data:`REPEATING_ERRORS` error inside a Ray Train failure (its controller error or a worker's), else
    None."""
    inner = [getattr(error, "controller_failure", None), *getattr(error, "worker_failures", {}).values()]
    return next((e for e in inner if isinstance(e, REPEATING_ERRORS)), None)


def _item_tables(cfg: Config, data_path: str):
    """``(item_init, item_text)`` object refs (or None): the text-initialised table and the items' text vectors,
    through the object store, since workers on other nodes cannot read this machine's cache."""
    item_init = item_text = None
    if cfg.model.item_init == "text":
        item_init = ray.put(np.load(text_init_table(data_path, cfg.model.dim, cfg.semantic.encoder)))
    elif cfg.model.item_init != "random":
        raise ValueError(f"model.item_init must be random or text, got {cfg.model.item_init!r}")
    if cfg.eimf.enabled and cfg.eimf.experimental.lambda_item > 0:
        item_text = ray.put(np.load(item_text_embeddings(data_path, cfg.semantic.encoder)))
    return item_init, item_text


def fit(cfg: Config, data_path: str, run_name: Optional[str] = None, mlflow_run_id: Optional[str] = None,
        mlflow_uri: Optional[str] = None, warm_start: Optional[WarmStart] = None) -> FitResult:
    """Train with Ray Train on the prepared data at ``data_path`` as Ray Train run ``run_name`` (default
    :func:`run_name_of`); the workers log to MLflow run ``mlflow_run_id`` (opened and closed by the caller). A loss
    of hosts that ends the run is named in the error. ``warm_start``: start from an earlier model
    (eimf.training.warm_start; its arrays put in the object store, where each worker fetches what it fills)."""
    run_name, storage = run_name or run_name_of(cfg), storage_of(cfg)
    item_init, item_text = _item_tables(cfg, data_path)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": to_dict(cfg), "data_path": data_path,
            "mlflow_run_id": mlflow_run_id, "mlflow_uri": mlflow_uri, "item_init": item_init, "item_text": item_text,
            "warm_start": warm_start,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.train.scaling.use_gpu else "gloo"),
        datasets={"train": _cut_dataset(data_path, cfg)},
        scaling_config=_scaling(cfg),
        run_config=_run_config(cfg, run_name, storage),
    )
    nodes_before = _alive_nodes()
    try:
        result = trainer.fit()
    except Exception as e:
        if repeating_error(e) is not None:  # a setting or the data: one line, as the config's own checks give
            raise repeating_error(e) from None
        lost = sorted(set(nodes_before) - set(_alive_nodes()))
        if lost:
            raise RuntimeError(f"training failed after losing host(s) {', '.join(nodes_before[n] for n in lost)}: "
                               f"{type(e).__name__}: {str(e)[:2000]}") from e
        raise
    return FitResult(run_name=run_name, checkpoint=result.checkpoint, storage_path=storage)
