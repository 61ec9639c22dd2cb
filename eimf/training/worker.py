"""What runs inside each Ray Train worker: build the pieces, resume, train, report.

:func:`train_worker` reads top to bottom as those steps. Checkpoints go out through :class:`CheckpointReporter`,
the loop's report callback; the final report carries the best model and the run's final metrics.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint

from eimf import tracking
from eimf.config import Config, from_dict
from eimf.data.sampling import TrainSampler
from eimf.formats import checkpoints as ckpt
from eimf.formats.prepared import read_manifest, read_split
from eimf.training.components import (
    build_components,
    build_sharded_components,
    load_item_init,
    peak_rss_mb,
    per_worker_batch,
    replicated_runner,
)
from eimf.training.hardware import agreed_precision, set_threads
from eimf.training.host_stats import WorkerPlacement, as_dicts, link_bytes, placement_metrics, placement_tags
from eimf.training.loop import (
    LoopState,
    Trainer,
    load_best_head,
    load_training_state,
    save_training_state,
    seed_everything,
)
from eimf.training.multitask import EIMFTrainer, build_eimf, eimf_batches
from eimf.training.warm_start import apply_warm_start

log = logging.getLogger(__name__)

#: How long the end of training waits for metrics held back by a tracking-server outage.
METRICS_DRAIN_S = 300.0
#: How long a checkpoint waits for the metrics logged before it (a reachable server takes milliseconds).
METRICS_BEFORE_CHECKPOINT_S = 10.0


def shard_batches(cfg: Config, micro_batch: int, seed: int, semantics=None):
    """``(batches, stats)``: this worker's training batches, from its Ray Data shard of the training users (EIMF
    batches, with their typical users' semantic vectors, when ``semantics`` is given), and numbers about them
    for the run's final metrics (EIMF: ``window_overlap_share``, the mean share of a typical row's history
    inside the window its prompt showed)."""
    shard = ray.train.get_dataset_shard("train")
    if cfg.train.input == "memory":
        # Hold only this shard's users; draw users with replacement as ComiRec does.
        frames = list(shard.iter_batches(batch_format="pandas"))
        sequences = [np.asarray(s) for b in frames for s in b["items"]]
        log.info("worker shard: %d training users", len(sequences))
        if semantics is not None:
            users = [int(u) for b in frames for u in b["user"]]
            sampler = eimf_batches(cfg, users, sequences, semantics, micro_batch, seed)
            stats = {} if sampler.overlap_share is None else {"window_overlap_share": sampler.overlap_share}
            return iter(sampler), stats
        return iter(TrainSampler(sequences, maxlen=cfg.model.maxlen, batch_size=micro_batch,
                                 min_cut=cfg.train.min_cut, seed=seed)), {}
    if cfg.train.input != "ray_data":
        raise ValueError(f"train.input must be memory or ray_data, got {cfg.train.input!r}")
    if semantics is not None:
        raise ValueError("eimf.enabled needs train.input=memory (the Ray Data cut carries no semantic interests)")

    def epochs():
        # The random cut ran inside the Ray Data pipeline (see _cut_dataset); here we only batch.
        while True:
            for b in shard.iter_batches(batch_size=micro_batch, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=4 * micro_batch, local_shuffle_seed=None):
                yield b["hist"], b["mask"], b["target"]

    return epochs(), {}


class CheckpointReporter:
    """The loop's report callback: every metric line to MLflow (off the training thread: an unreachable tracking
    server delays the metrics, not the steps), and at each evaluation a checkpoint to Ray Train."""

    def __init__(self, trainer, step_runner, is_chief: bool, uri, run_id):
        self.trainer, self.step_runner, self.is_chief = trainer, step_runner, is_chief
        self.uri, self.run_id = uri, run_id
        self.metrics_out = tracking.MetricSender(uri, run_id if is_chief else None)

    def __call__(self, metrics: dict, loop_state: LoopState, is_eval: bool) -> None:
        self.metrics_out.log(metrics, step=loop_state.step)
        if not is_eval:
            return
        # a resume starts after this checkpoint: what was logged up to it must reach the server first, unless the
        # server is away (then training goes on and the batches follow when it returns)
        self.metrics_out.flush(timeout=METRICS_BEFORE_CHECKPOINT_S)
        with tempfile.TemporaryDirectory() as tmp:
            save_training_state(Path(tmp), self.step_runner, loop_state, self.trainer.best_state, self.is_chief,
                                self.trainer.best_head_state)
            ray.train.report({**metrics, "step": loop_state.step, "best_metric": loop_state.best_metric},
                             checkpoint=Checkpoint.from_directory(tmp))

    def final(self, final: dict, state: LoopState, placement) -> None:
        """The last report: final metrics (with what reached MLflow) and the best model with its EIMF head."""
        sent = self.metrics_out.close(timeout=METRICS_DRAIN_S)
        final.update({f"tracking/metric_batches_{k}": v for k, v in sent.items()})
        if self.is_chief:
            if sent["dropped"]:
                log.warning("%d metric batches could not reach the tracking server and were dropped", sent["dropped"])
            tracking.log_metrics(self.uri, self.run_id, final, step=state.step)
            tracking.set_tags(self.uri, self.run_id, placement_tags(placement))
            log.info("final: %s", json.dumps({k: round(v, 4) for k, v in final.items()}))
            log.info("workers: %s", json.dumps(as_dicts(placement)))
        with tempfile.TemporaryDirectory() as tmp:
            # with g of the best model beside it: it labels that model's interests (eimf.serving.explain)
            save_training_state(Path(tmp), self.step_runner, state, self.trainer.best_state, self.is_chief,
                                self.trainer.best_head_state)
            if self.is_chief:
                (Path(tmp) / ckpt.METRICS).write_text(json.dumps(final, indent=2))
            ray.train.report(final, checkpoint=Checkpoint.from_directory(tmp))


def _set_threads(cfg: Config, ctx) -> None:
    # Our step/eval lines at INFO; Ray's own per-report INFO lines would drown them.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("eimf").setLevel(logging.INFO)
    # Torch threads: the configured CPUs, else this node's cores shared by the workers on it.
    threads = cfg.train.scaling.cpus_per_worker or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size())
    set_threads(threads)


def _build(cfg: Config, loop_config: dict, n_items: int, micro_batch: int, device: torch.device):
    """``(model, loss, step runner, lr, semantics)``, every rank with identical initial weights."""
    seed_everything(cfg.train.seed)
    sharded = cfg.train.strategy == "sharded"
    if sharded:
        model, loss_fn, step_runner, lr = build_sharded_components(cfg, n_items, micro_batch, device)
    else:
        model, loss_fn, step_runner, lr = build_components(cfg, n_items, micro_batch)
    if loop_config.get("item_init") is not None:  # model.item_init=text; a resume overwrites it from the checkpoint
        load_item_init(step_runner.model, ray.get(loop_config["item_init"]))
    if loop_config.get("warm_start") is not None:  # pipeline.from_model: over the init, under a resume's checkpoint
        written = apply_warm_start(step_runner.model, loop_config["warm_start"], fetch=_fetch)
        log.info("warm start: %d item rows from %s in this worker", written, loop_config["warm_start"].resolved)
    loss_fn.to(device)
    if not sharded:
        model.to(device)
        step_runner = replicated_runner(cfg, step_runner, micro_batch)
    semantics = None
    if cfg.eimf.enabled:
        # Before the checkpoint load: the head's parameters are in the optimizer state restored there.
        semantics = build_eimf(cfg, step_runner)
        if loop_config.get("item_text") is not None:  # eimf.experimental.lambda_item > 0
            step_runner.head.set_item_text(ray.get(loop_config["item_text"]))
    return model, loss_fn, step_runner, lr, semantics


def _fetch(value):
    """An array handed over in the object store, or as it is."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _resume(step_runner, is_chief: bool):
    """``(loop state, best weights, best head)`` from Ray Train's latest checkpoint, or Nones."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None, None, None
    with checkpoint.as_directory() as folder:
        state, best_state = load_training_state(Path(folder), step_runner)
        best_head_state = load_best_head(Path(folder))
    state.resumes.append(state.step)
    if is_chief:
        log.info("resumed from the checkpoint at step %d (resume #%d)", state.step, len(state.resumes))
    return state, best_state, best_head_state


def train_worker(loop_config: dict) -> None:
    """Runs inside each Ray Train worker."""
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    is_chief = rank == 0
    _set_threads(cfg, ctx)

    data_path = loop_config["data_path"]
    n_items = int(read_manifest(data_path)["n_items"])
    # Only the chief evaluates (every worker on the sharded path); valid/test users are a small share of the log.
    evaluates = is_chief or cfg.train.strategy == "sharded"
    valid, test = (read_split(data_path, "valid"), read_split(data_path, "test")) if evaluates else (None, None)
    micro_batch = per_worker_batch(cfg)
    # This worker's GPU under use_gpu (NCCL), else the CPU; batches and negatives follow the model.
    device = ray.train.torch.get_device() if cfg.train.scaling.use_gpu else torch.device("cpu")
    # train.precision=auto: bf16 where every worker's device has it natively, decided once for all of them
    setting = cfg.train.precision
    cfg.train.precision = agreed_precision(setting, device)
    if is_chief:
        log.info("precision: %s (train.precision=%s)", cfg.train.precision, setting)
    model, loss_fn, step_runner, lr, semantics = _build(cfg, loop_config, n_items, micro_batch, device)

    state, best_state, best_head_state = _resume(step_runner, is_chief)
    start_step = state.step if state else 0
    # Each rank (and each resume) draws its own instances and negatives; weights start identical.
    stream_seed = cfg.train.seed * 1_000_003 + rank * 7919 + start_step
    loss_fn.generator = torch.Generator().manual_seed(stream_seed + 1)
    batches, input_stats = shard_batches(cfg, micro_batch, stream_seed, semantics)

    trainer_cls = Trainer if semantics is None else EIMFTrainer  # EIMF: the loop with the auxiliary losses
    trainer = trainer_cls(cfg, step_runner.model, loss_fn, step_runner, batches, valid, test, device=device,
                          is_chief=is_chief)
    trainer.best_state, trainer.best_head_state = best_state, best_head_state
    reporter = CheckpointReporter(trainer, step_runner, is_chief, loop_config.get("mlflow_uri"),
                                  loop_config.get("mlflow_run_id"))

    t0 = time.perf_counter()
    net0 = link_bytes()
    state = trainer.fit(state, reporter)
    # Before the final evaluation (its index copies the table): training's own peak, the worst worker's.
    train_rss = peak_rss_mb()
    placement = [WorkerPlacement.measure(rank, net0, state.step - start_step)]
    if torch.distributed.is_initialized():
        every = [None] * ctx.get_world_size()
        torch.distributed.all_gather_object(every, (train_rss, placement[0]))
        train_rss = max(r for r, _ in every)
        placement = [p for _, p in every]
    gathered = getattr(step_runner.model, "gathered_rows_per_step", None)
    final = trainer.final_metrics()
    final.update(
        {
            "step": state.step,
            "best_step": state.best_step,
            "train_seconds": state.train_seconds,
            "examples_per_s": state.examples / max(state.train_seconds, 1e-9),
            "input_share": state.data_seconds / max(state.train_seconds, 1e-9),
            "peak_rss_mb": peak_rss_mb(),
            "train_peak_rss_mb_max_worker": train_rss,
            **({"gathered_rows_per_step": gathered()} if gathered else {}),
            "worker_wall_seconds": time.perf_counter() - t0,
            "lr": lr,
            "resumes": len(state.resumes),
            "first_resume_step": state.resumes[0] if state.resumes else -1,
            "world_size": ctx.get_world_size(),
            "bf16": float(cfg.train.precision == "bf16"),  # what train.precision=auto resolved to
            **placement_metrics(placement),
            **input_stats,
            # train.compile: the seconds its first steps took to build the graphs (inside train_seconds), and
            # whether it fell back to eager
            **(step_runner.compiled.metrics() if step_runner.compiled is not None else {}),
            "done": 1,
        }
    )
    reporter.final(final, state, placement)
