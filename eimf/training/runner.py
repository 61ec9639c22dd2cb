"""The distributed layer: Ray Train's ``TorchTrainer`` around the single-process loop.

The driver prepares the dataset (Ray Data ingest + preprocessing, cached by fingerprint), then starts
``num_workers`` training workers. Each worker builds the model, resumes from Ray Train's latest
checkpoint when there is one, runs ``Trainer.fit`` and reports a checkpoint at every evaluation. The
last report carries the best model and its valid/test metrics; the driver exports it to a plain folder
that ``eimf evaluate`` loads without Ray.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import OmegaConf

from eimf import fs, tracking
from eimf.config import Config, eimf_home, to_dict
from eimf.ray_init import init_ray
from eimf.training.host_stats import WorkerPlacement, as_dicts, link_bytes, placement_metrics, placement_tags
from eimf.training.loop import BEST_HEAD_FILE

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_name: str
    metrics: Dict[str, float]
    export_dir: str
    storage_path: str
    #: The MLflow run (None with tracking off).
    mlflow_run_id: Optional[str] = None
    #: The logged pyfunc model (``models:/eimf-<dataset>/<version>`` when registered), or None.
    model_uri: Optional[str] = None


def config_from_dict(d: dict) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_components(cfg: Config, n_items: int, micro_batch: Optional[int] = None):
    """Model, loss and plain-torch step runner: the single-device pieces every runner shares."""
    from eimf.models import build_model
    from eimf.models.negatives import build_loss
    from eimf.training.loop import StepRunner

    model = build_model(cfg.model, n_items)
    loss_fn = build_loss(cfg.negatives, n_items, micro_batch or cfg.train.batch_size, cfg.model)
    lr = cfg.train.lr if cfg.train.lr is not None else model.default_lr
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    return model, loss_fn, StepRunner(model, optimizer), lr


STRATEGIES = ("auto", "torch", "deepspeed", "sharded")


def build_sharded_components(cfg: Config, n_items: int, micro_batch: int, device: torch.device):
    """The sharded path's model, loss and step runner (call inside the workers' process group)."""
    from eimf.models.negatives import build_loss
    from eimf.training.sharded import (ShardedItemModel, ShardedStepRunner, default_sparse_lr,
                                       sparse_optimizer_params)

    model = ShardedItemModel(cfg.model, n_items)
    lr = cfg.train.lr if cfg.train.lr is not None else model.backbone.default_lr
    t = cfg.train
    sparse_lr = t.sparse_lr if t.sparse_lr is not None else default_sparse_lr(t.sparse_optimizer, lr, t.use_gpu)
    sparse = sparse_optimizer_params(t.sparse_optimizer, sparse_lr, t.use_gpu)
    runner = ShardedStepRunner(model, lr, t.weight_decay, sparse, device, init_seed=t.seed)
    loss_fn = build_loss(cfg.negatives, n_items, micro_batch, cfg.model)
    return runner.model, loss_fn, runner, lr


def use_deepspeed(cfg: Config) -> bool:
    if cfg.train.strategy not in STRATEGIES:
        raise ValueError(f"train.strategy must be one of {', '.join(STRATEGIES)}, got {cfg.train.strategy!r}")
    if cfg.train.strategy == "sharded":
        return False
    if cfg.train.strategy == "auto":
        return cfg.train.num_workers > 1 or cfg.train.zero_stage > 0
    return cfg.train.strategy == "deepspeed"


def per_worker_batch(cfg: Config) -> int:
    """``train.batch_size`` is the global batch: N workers each take an equal share."""
    n = cfg.train.num_workers
    if cfg.train.batch_size % n:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide by train.num_workers={n}")
    return cfg.train.batch_size // n


def _shard_batches(cfg: Config, micro_batch: int, seed: int, semantics=None):
    """``(batches, stats)``: this worker's training batches, from its Ray Data shard of the training users (EIMF
    batches, with their typical users' semantic vectors, when ``semantics`` is given), and numbers about them
    for the run's final metrics (EIMF: ``window_overlap_share``, the mean share of a typical row's history
    inside the window its prompt showed)."""
    import numpy as np
    import ray.train

    from eimf.data.sampling import TrainSampler

    shard = ray.train.get_dataset_shard("train")
    if cfg.train.input == "memory":
        # Hold only this shard's users; draw users with replacement as ComiRec does.
        frames = list(shard.iter_batches(batch_format="pandas"))
        sequences = [np.asarray(s) for b in frames for s in b["items"]]
        log.info("worker shard: %d training users", len(sequences))
        if semantics is not None:
            from eimf.training.multitask import eimf_batches

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


def _cut_dataset(data_path: str, cfg: Config):
    """Ray Dataset of training users with one random cut per user per epoch (docs/design.md section 3)."""
    import ray
    import numpy as np

    from eimf import fs
    from eimf.data.sampling import cut_examples

    maxlen, min_cut = cfg.model.maxlen, cfg.train.min_cut
    filesystem, path = fs.resolve(fs.join(data_path, "train.parquet"))
    users = ray.data.read_parquet(path, filesystem=filesystem)
    if cfg.train.input == "memory":
        return users

    def cut(batch):
        # A fresh generator per call: every epoch re-cuts every user differently.
        return cut_examples(batch["items"], maxlen, min_cut, np.random.default_rng())

    return users.map_batches(cut, batch_format="numpy")


#: How long the end of training waits for metrics held back by a tracking-server outage.
METRICS_DRAIN_S = 300.0
#: How long a checkpoint waits for the metrics logged before it (a reachable server takes milliseconds).
METRICS_BEFORE_CHECKPOINT_S = 10.0


def _train_worker(loop_config: dict) -> None:
    """Runs inside each Ray Train worker."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from eimf.data.preprocess import read_manifest, read_split
    from eimf.evaluation import set_faiss_threads
    from eimf.training.loop import (Trainer, load_best_head, load_training_state, save_training_state,
                                    seed_everything)

    # Our step/eval lines at INFO; Ray's own per-report INFO lines would drown them.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("eimf").setLevel(logging.INFO)
    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    is_chief = rank == 0
    # Torch threads: the configured CPUs, else this node's cores shared by the workers on it.
    threads = cfg.train.cpus_per_worker or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size())
    torch.set_num_threads(threads)
    set_faiss_threads(threads)

    data_path = loop_config["data_path"]
    n_items = int(read_manifest(data_path)["n_items"])
    sharded = cfg.train.strategy == "sharded"
    # Only the chief evaluates (every worker on the sharded path); valid/test users are a small share of the log.
    evaluates = is_chief or sharded
    valid, test = (read_split(data_path, "valid"), read_split(data_path, "test")) if evaluates else (None, None)
    micro_batch = per_worker_batch(cfg)

    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    # This worker's GPU under use_gpu (NCCL), else the CPU; batches and negatives follow the model.
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    if sharded:
        model, loss_fn, step_runner, lr = build_sharded_components(cfg, n_items, micro_batch, device)
    else:
        model, loss_fn, step_runner, lr = build_components(cfg, n_items, micro_batch)
    if loop_config.get("item_init") is not None:  # model.item_init=text; a resume overwrites it from the checkpoint
        load_item_init(step_runner.model, ray.get(loop_config["item_init"]))
    if not sharded:
        model.to(device)
    loss_fn.to(device)
    if use_deepspeed(cfg):
        from eimf.training.deepspeed_step import DeepSpeedStepRunner, deepspeed_config

        step_runner = DeepSpeedStepRunner(
            model, step_runner.optimizer, deepspeed_config(micro_batch, cfg.train.zero_stage, cfg.train.precision)
        )

    semantics = None
    if cfg.eimf.enabled:
        from eimf.training.multitask import build_eimf

        # Before the checkpoint load: the head's parameters are in the optimizer state restored there.
        semantics = build_eimf(cfg, step_runner)
        if loop_config.get("item_text") is not None:  # eimf.lambda_item > 0
            step_runner.head.set_item_text(ray.get(loop_config["item_text"]))

    state, best_state, best_head_state = None, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state, best_state = load_training_state(Path(folder), step_runner)
            best_head_state = load_best_head(Path(folder))
        state.resumes.append(state.step)
        if is_chief:
            log.info("resumed from the checkpoint at step %d (resume #%d)", state.step, len(state.resumes))
    start_step = state.step if state else 0
    # Each rank (and each resume) draws its own instances and negatives; weights start identical.
    stream_seed = cfg.train.seed * 1_000_003 + rank * 7919 + start_step
    loss_fn.generator = torch.Generator().manual_seed(stream_seed + 1)
    batches, input_stats = _shard_batches(cfg, micro_batch, stream_seed, semantics)

    trainer_cls = Trainer
    if semantics is not None:
        from eimf.training.multitask import EIMFTrainer as trainer_cls  # the loop with the EIMF step
    trainer = trainer_cls(cfg, step_runner.model, loss_fn, step_runner, batches, valid, test, device=device,
                      is_chief=is_chief)
    trainer.best_state, trainer.best_head_state = best_state, best_head_state
    run_id, uri = loop_config.get("mlflow_run_id"), loop_config.get("mlflow_uri")
    # off the training thread: an unreachable tracking server delays the metrics, not the steps
    metrics_out = tracking.MetricSender(uri, run_id if is_chief else None)

    def report(metrics, loop_state, is_eval):
        metrics_out.log(metrics, step=loop_state.step)
        if not is_eval:
            return
        # a resume starts after this checkpoint: what was logged up to it must reach the server first, unless the
        # server is away (then training goes on and the batches follow when it returns)
        metrics_out.flush(timeout=METRICS_BEFORE_CHECKPOINT_S)
        with tempfile.TemporaryDirectory() as tmp:
            save_training_state(Path(tmp), step_runner, loop_state, trainer.best_state, is_chief,
                                trainer.best_head_state)
            ray.train.report(
                {**metrics, "step": loop_state.step, "best_metric": loop_state.best_metric},
                checkpoint=Checkpoint.from_directory(tmp),
            )

    t0 = time.perf_counter()
    net0 = link_bytes()
    state = trainer.fit(state, report)
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
            **placement_metrics(placement),
            **input_stats,
            "done": 1,
        }
    )
    sent = metrics_out.close(timeout=METRICS_DRAIN_S)
    final.update({f"tracking/metric_batches_{k}": v for k, v in sent.items()})
    if is_chief:
        if sent["dropped"]:
            log.warning("%d metric batches could not reach the tracking server and were dropped", sent["dropped"])
        tracking.log_metrics(uri, run_id, final, step=state.step)
        tracking.set_tags(uri, run_id, placement_tags(placement))
        log.info("final: %s", json.dumps({k: round(v, 4) for k, v in final.items()}))
        log.info("workers: %s", json.dumps(as_dicts(placement)))
    with tempfile.TemporaryDirectory() as tmp:
        # with g of the best model beside it: it labels that model's interests (eimf.explain)
        save_training_state(Path(tmp), step_runner, state, trainer.best_state, is_chief, trainer.best_head_state)
        if is_chief:
            (Path(tmp) / "metrics.json").write_text(json.dumps(final, indent=2))
        ray.train.report(final, checkpoint=Checkpoint.from_directory(tmp))


def restart_attempts(timeout_s: float) -> int:
    """Ray Train retries a worker group that cannot get its resources every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    (60 s by default), without limit: the retries after the first try that together spend about ``timeout_s``."""
    import math

    every = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0))
    return max(0, math.ceil(timeout_s / every) - 1)


def _alive_nodes() -> Dict[str, str]:
    """Node id -> ``hostname (ip)`` of the cluster's live nodes."""
    import ray

    return {n["NodeID"]: f"{n['NodeManagerHostname']} ({n['NodeManagerAddress']})" for n in ray.nodes() if n["Alive"]}


def load_item_init(model, table) -> None:
    """Copy the ``model.item_init=text`` table ``[N + 1, d]`` into the model: the whole table, or this worker's
    rows."""
    import numpy as np

    with torch.no_grad():
        if hasattr(model, "local_rows"):  # the row-sharded table: only this worker's slice is read
            rows, offset = model.local_rows()
            rows.copy_(torch.from_numpy(np.ascontiguousarray(table[offset:offset + rows.shape[0]])))
        else:
            weight = model.item_emb.weight
            if tuple(weight.shape) != table.shape:
                raise ValueError(f"model.item_init: a {table.shape} table for a {tuple(weight.shape)} item table")
            weight.copy_(torch.from_numpy(np.ascontiguousarray(table)))


def default_cpus_per_worker(n_workers: int) -> float:
    """One logical CPU per worker, but always leave one free: Ray Data's read and cut tasks run beside the
    workers, and on a 2-core laptop 2 workers holding both CPUs would starve them (the run would hang)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    if total >= n_workers + 1:
        return 1.0
    # Logical CPUs only (torch threads are set separately): a fraction keeps one whole CPU for Ray Data.
    return max(0.01, int(100 * (total - 1) / n_workers) / 100)


def export_model(checkpoint_dir: Path, export_dir: str, cfg: Config, data_path: str) -> str:
    """The model folder (:mod:`eimf.serving.folder`) of a checkpoint's best model: weights, config, the raw-id
    map and item texts, the retrieval index, and the EIMF head with its phrase table. ``export_dir`` is local or
    ``s3://``. It serves without Ray, an LLM, or the prepared data."""
    from eimf.serving.folder import from_checkpoint

    return from_checkpoint(Path(checkpoint_dir), cfg, data_path, head_file=BEST_HEAD_FILE).write(str(export_dir))


def registered_model_name(cfg: Config) -> Optional[str]:
    """``tracking.registered_model``, default ``eimf-<dataset>``; None for "" (log the model, do not register it)."""
    name = cfg.tracking.registered_model
    return f"eimf-{cfg.data.dataset}" if name is None else (name or None)


def log_run_artifacts(uri: str, run_id: Optional[str], export_dir: str, data_path: str, result,
                      cfg: Optional[Config] = None) -> Optional[str]:
    """Dataset manifest, item embeddings, the learning curve and the model folder to MLflow, and the model as a
    pyfunc model (registered as :func:`registered_model_name`). ``export_dir`` and ``data_path`` may be local or
    ``s3://``. Returns the logged model's URI (None with tracking or model logging off)."""
    if not run_id:
        return None
    import numpy as np

    from eimf.plots import learning_curve
    from eimf.serving.folder import ModelFolder

    with tempfile.TemporaryDirectory() as tmp, fs.local_dir(str(export_dir)) as local_export:
        tmp = Path(tmp)
        if "item_table" not in ModelFolder.read_manifest(local_export):  # sharded: the row blocks are in model/
            folder = ModelFolder.load(local_export, index=False)
            np.save(tmp / "item_embeddings.npy", folder.model.item_embeddings().detach().numpy())
        manifest = fs.join(str(data_path), "manifest.json")
        if fs.exists(manifest):
            (tmp / "dataset_manifest.json").write_bytes(fs.read_bytes(manifest))
        history = tracking.client(uri).get_metric_history(run_id, tracking.metric_key("valid/recall@50"))
        if history:
            learning_curve(
                [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)],
                tmp / "learning_curve.png", ylabel="valid Recall@50",
            )
        tracking.log_artifacts(uri, run_id, str(tmp))
        tracking.log_artifacts(uri, run_id, local_export, "model")
        if cfg is None or not cfg.tracking.log_model:
            return None
        from eimf.serving.pyfunc import log_recommender

        model_uri = log_recommender(local_export, uri, run_id, registered_model_name(cfg))
        tracking.client(uri).set_tag(run_id, "model_uri", model_uri)
        log.info("MLflow model: %s", model_uri)
        return model_uri


def train(cfg: Config, data_path: Optional[str] = None, tags: Optional[Dict[str, str]] = None) -> TrainResult:
    """Prepare the data (unless given), train with Ray Train, export the best model. ``tags``: extra MLflow
    run tags (a pipeline passes its parent run as ``mlflow.parentRunId``)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from eimf.data.preprocess import prepare

    init_ray()
    if data_path is None:
        data_path = str(prepare(cfg.data).path)
    storage = cfg.train.storage_path or os.path.abspath(os.path.join(eimf_home(), "runs"))
    # s3:// works on AWS as is; with AWS_ENDPOINT_URL(_S3) (MinIO, moto) Ray needs the file system.
    storage_path, storage_filesystem = fs.ray_storage(storage)
    run_name = cfg.train.run_name or (
        f"{cfg.data.dataset}-{cfg.model.backbone}-s{cfg.train.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    from eimf.data.preprocess import read_manifest

    fingerprint = str(read_manifest(data_path).get("fingerprint", "unknown"))
    run_tags = {"eimf": "on" if cfg.eimf.enabled else "off", "dataset_fingerprint": fingerprint, **(tags or {})}
    run_id = tracking.start_run(cfg, run_name, tags=run_tags)
    uri = tracking.tracking_uri(cfg)
    n_workers = cfg.train.num_workers
    cpus_per_worker = cfg.train.cpus_per_worker or default_cpus_per_worker(n_workers)
    item_init = None
    if cfg.model.item_init == "text":
        import numpy as np

        from eimf.models.text_init import text_init_table

        # through the object store: workers on other nodes cannot read this machine's cache
        item_init = ray.put(np.load(text_init_table(data_path, cfg.model.dim, cfg.semantic.encoder)))
    elif cfg.model.item_init != "random":
        raise ValueError(f"model.item_init must be random or text, got {cfg.model.item_init!r}")
    item_text = None
    if cfg.eimf.enabled and cfg.eimf.lambda_item > 0:
        import numpy as np

        from eimf.models.text_init import item_text_embeddings

        item_text = ray.put(np.load(item_text_embeddings(data_path, cfg.semantic.encoder)))
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "config": to_dict(cfg), "data_path": data_path,
            "mlflow_run_id": run_id, "mlflow_uri": uri, "item_init": item_init, "item_text": item_text,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        datasets={"train": _cut_dataset(data_path, cfg)},
        scaling_config=ScalingConfig(
            num_workers=n_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker}, placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures,
                                         controller_failure_limit=restart_attempts(cfg.train.restart_timeout_s)),
        ),
    )
    nodes_before = _alive_nodes()
    try:
        result = trainer.fit()
    except Exception as e:
        tracking.end_run(uri, run_id, status="FAILED")
        lost = sorted(set(nodes_before) - set(_alive_nodes()))
        if lost:
            raise RuntimeError(f"training failed after losing host(s) {', '.join(nodes_before[n] for n in lost)}: "
                               f"{type(e).__name__}: {str(e)[:2000]}") from e
        raise
    export_dir = fs.join(storage, run_name, "export")
    with result.checkpoint.as_directory() as folder:
        export_model(Path(folder), export_dir, cfg, data_path)
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    model_uri = log_run_artifacts(uri, run_id, export_dir, data_path, result, cfg)
    tracking.end_run(uri, run_id)
    return TrainResult(run_name=run_name, metrics=metrics, export_dir=export_dir, storage_path=storage,
                       mlflow_run_id=run_id, model_uri=model_uri)
