"""The sections of a training run: ``model``, ``negatives``, ``train`` (with ``train.scaling``,
``train.failure``, ``train.deepspeed``, ``train.sharded``, as Ray Train splits ScalingConfig, FailureConfig and
RunConfig), ``eval`` and ``retrieval``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Literal, Optional

from eimf.config.base import ConfigError, Section, check_positive, choice_message, operational

#: ``model.backbone``: the keys of eimf.models.MODELS (a new backbone adds its name here; tests/test_config.py
#: checks that the two agree). Checked when the whole config loads (eimf.config.load.Config), so that a
#: ModelConfig built in code still reaches the registry's own check.
BACKBONES = ("comirec_sa", "comirec_dr", "mind", "remi")
#: ``eval.early_stop_metric`` is ``<metric>@<k>`` with k one of ``eval.topk`` (eimf.evaluation.metrics.METRICS).
EVAL_METRICS = ("recall", "ndcg", "hitrate")


@dataclass
class ModelConfig(Section):
    PATH: ClassVar[str] = "model"
    MINIMUMS: ClassVar[dict] = {"dim": 1, "num_interests": 1, "maxlen": 1, "routing_iters": 1, "hidden_factor": 1,
                                "beta": 0, "reg_lambda": 0}
    #: One of :data:`BACKBONES`.
    backbone: str = "comirec_sa"
    dim: int = 64
    num_interests: int = 4
    maxlen: int = 50
    #: Dynamic-routing iterations (ComiRec-DR, MIND).
    routing_iters: int = 3
    #: ComiRec-SA attention hidden size as a multiple of ``dim``.
    hidden_factor: int = 4
    #: REMI interest-aware hard negatives: temperature-like weight on negative scores (0 = off).
    beta: float = 0.0
    #: REMI routing regularisation weight (0 = off).
    reg_lambda: float = 0.0
    #: The item table's initial rows: ``random`` (Glorot uniform) | ``text`` (the item texts through
    #: ``semantic.encoder``, PCA to ``dim``, scaled to the random init's spread; eimf.models.text_init).
    #: Why ``random`` is the default: docs/results.md, "Settings chosen on valid".
    item_init: Literal["random", "text"] = "random"


@dataclass
class NegativesConfig(Section):
    PATH: ClassVar[str] = "negatives"
    MINIMUMS: ClassVar[dict] = {"negatives_per_example": 1, "num_negatives": 1}
    #: log_uniform (popularity-shaped over frequency-sorted ids) | uniform
    sampler: Literal["log_uniform", "uniform"] = "log_uniform"
    #: Negatives shared by the batch = negatives_per_example * batch_size (ComiRec: 10).
    negatives_per_example: int = 10
    #: Fixed number of shared negatives; overrides negatives_per_example when set (REMI: 1280).
    num_negatives: Optional[int] = None
    #: Distinct negatives (rejection of repeats, expected count 1-(1-p)^tries), as TF's sampled_softmax_loss
    #: that ComiRec calls; False: independent draws, log-Q = log(num_negatives * p).
    unique: bool = True
    logq_correction: bool = True
    remove_accidental_hits: bool = True


@dataclass
class ScalingConfig(Section):
    """``train.scaling``: how many workers, on what (Ray Train's ScalingConfig)."""

    PATH: ClassVar[str] = "train.scaling"
    MINIMUMS: ClassVar[dict] = {"num_workers": 1, "cpus_per_worker": 1}
    #: Training workers; ``train.batch_size`` is split equally among them, so it must divide by this.
    num_workers: int = 1
    use_gpu: bool = False
    #: CPUs each worker reserves (and torch threads it uses); together they must leave one CPU of the cluster free
    #: for Ray Data's tasks. None: a share that leaves one free, and the node's cores / its workers as threads.
    cpus_per_worker: Optional[int] = None
    #: How Ray places the workers on nodes: PACK (fewest nodes: fast collectives within a node) | SPREAD |
    #: STRICT_SPREAD (one worker per node: a lost node costs one worker) | STRICT_PACK (all on one node).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = operational("PACK")


@dataclass
class FailureConfig(Section):
    """``train.failure``: what a failed run does (Ray Train's FailureConfig)."""

    PATH: ClassVar[str] = "train.failure"
    MINIMUMS: ClassVar[dict] = {"max_failures": 0, "restart_timeout_s": 1}
    #: How many times Ray Train replaces failed workers and resumes from the checkpoint. A setting or data error
    #: raised in a worker is not retried: it would fail the same way.
    max_failures: int = operational(2)
    #: How long a restart after a failure waits for its workers' resources (a lost host replaced, say) before the
    #: run fails, naming the hosts it lost. Ray Train alone would wait forever.
    restart_timeout_s: float = operational(600.0)


@dataclass
class DeepSpeedConfig(Section):
    """``train.deepspeed``: the DeepSpeed path (``train.strategy`` deepspeed, or auto with several workers)."""

    PATH: ClassVar[str] = "train.deepspeed"
    #: ZeRO stage 0-3 (3 partitions the item table across workers). Its precision is ``train.precision`` (the old
    #: ``train.deepspeed.precision`` loads as that key, eimf.config.load.RENAMED).
    zero_stage: Literal[0, 1, 2, 3] = 0


@dataclass
class ShardedConfig(Section):
    """``train.sharded``: the row-sharded item table (``train.strategy=sharded``, TorchRec)."""

    PATH: ClassVar[str] = "train.sharded"
    #: The table's fused optimizer: ``auto`` (row-wise Adagrad on CPU, Adam on GPU) | rowwise_adagrad | adagrad |
    #: sgd | adam (GPU only).
    optimizer: Literal["auto", "rowwise_adagrad", "adagrad", "sgd", "adam"] = "auto"
    #: The table's learning rate; None: 0.2 for the Adagrads (how it was chosen: docs/distributed.md, Parity),
    #: else ``train.lr``.
    lr: Optional[float] = None
    # The table's rows stay fp32 under train.precision=bf16: fbgemm-gpu-cpu 1.8.0 has no BFloat16 CPU lookup
    # ("split_embedding_nobag_cpu_forward_2" not implemented for 'BFloat16'), so bf16 rows are not offered.

    def __post_init__(self):
        super().__post_init__()
        check_positive("train.sharded.lr", self.lr)


@dataclass
class TrainConfig(Section):
    PATH: ClassVar[str] = "train"
    MINIMUMS: ClassVar[dict] = {"batch_size": 1, "max_steps": 1, "eval_every": 1, "patience": 1, "min_cut": 1,
                                "log_every": 1}
    #: The global batch: each of ``scaling.num_workers`` workers takes an equal share.
    batch_size: int = 128
    #: None: the backbone's default (1e-3; ComiRec-DR 5e-3).
    lr: Optional[float] = None
    weight_decay: float = 0.0
    max_steps: int = 100_000
    eval_every: int = 1000
    #: Evaluations without improvement of ``eval.early_stop_metric`` before stopping.
    patience: int = 10
    seed: int = 2026
    min_cut: int = 4
    log_every: int = operational(200)
    #: ``auto`` (DeepSpeed when num_workers > 1 or zero_stage > 0, else plain torch) | torch (several workers: data
    #: parallel, whole replicas, gradients averaged each step) | deepspeed |
    #: ``sharded`` (the item table split by rows across workers with TorchRec; docs/scaling.md says when it wins)
    strategy: Literal["auto", "torch", "deepspeed", "sharded"] = "auto"
    #: ``ray_data``: each worker streams its shard of training users from the Parquet through Ray Data and
    #: the random cut happens in that pipeline; ``memory``: each worker samples from its shard in memory
    #: (users drawn with replacement, as ComiRec does).
    input: Literal["memory", "ray_data"] = "memory"
    #: ``auto`` | ``fp32`` | ``bf16``: bf16 runs the forward and the loss under ``torch.autocast`` while parameters
    #: and optimizer state stay fp32, and the sampled-softmax logits, log-Q and log-softmax are computed in fp32.
    #: Every strategy (DeepSpeed: its ``torch_autocast`` section; the sharded table's rows stay fp32). ``auto``: bf16
    #: where every worker's device has native bf16 (AVX-512 BF16 or AMX; CUDA 8.0+), else fp32
    #: (eimf.training.hardware); the run's ``bf16`` metric says which. Evaluation always runs in fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: ``torch.compile`` (inductor, static shapes) of the backbone's extractor and of the sampled softmax; a
    #: failure to compile falls back to eager with a warning. Off by default: beside bf16 its gain on this
    #: project's CPU hosts is within their run-to-run spread, for 3-26 s of compiling at each worker start (less
    #: from inductor's cache); its accuracy matches fp32 eager on ML-1M and Beauty (docs/results.md).
    compile: bool = False
    #: Where runs and checkpoints go (local or ``s3://``); None: <EIMF_HOME>/runs.
    storage_path: Optional[str] = operational()
    #: Same name again resumes the run instead of starting over; None: generated.
    run_name: Optional[str] = operational()
    #: ``auto``: the export fits the text map (new items from their text, ``eimf items add``) when the items have
    #: text and ``semantic.encoder`` is installed; ``never``: no map. Operational: it adds a file beside the trained
    #: weights and changes neither them nor the metrics, so trained stages stay valid.
    text_map: Literal["auto", "never"] = operational("auto")
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    sharded: ShardedConfig = field(default_factory=ShardedConfig)

    def __post_init__(self):
        super().__post_init__()
        check_positive("train.lr", self.lr)
        n = self.scaling.num_workers
        if self.batch_size % n:
            low, high = self.batch_size // n * n, (self.batch_size // n + 1) * n
            raise ConfigError(f"train.batch_size={self.batch_size} must divide by train.scaling.num_workers={n} "
                              f"(each worker takes an equal share), e.g. {low or high} or {high}")
        if self.strategy == "sharded" and self.sharded.optimizer == "adam" and not self.scaling.use_gpu:
            raise ConfigError("train.sharded.optimizer=adam needs train.scaling.use_gpu=true: fbgemm's CPU kernels "
                              "offer sgd, adagrad and rowwise_adagrad")


@dataclass
class EvalConfig(Section):
    PATH: ClassVar[str] = "eval"
    MINIMUMS: ClassVar[dict] = {"batch_size": 1, "max_valid_users": 1}
    topk: List[int] = field(default_factory=lambda: [20, 50])
    batch_size: int = 1024
    #: ``<metric>@<k>``: metric recall | ndcg | hitrate, k one of ``topk``.
    early_stop_metric: str = "recall@50"
    #: Drop the user's history items from the recommendations (ComiRec protocol: no).
    exclude_history: bool = False
    #: Evaluate at most this many valid users during training (None: all); test always uses all.
    max_valid_users: Optional[int] = None
    #: Score the final model on the test split too. False while settings are being chosen: valid only, so the
    #: test split is read once, by the configuration that won on valid (the model itself is the same).
    score_test: bool = operational(True)

    def __post_init__(self):
        super().__post_init__()
        if not self.topk or min(self.topk) < 1:
            raise ConfigError(f"eval.topk must be a non-empty list of positive cut-offs, got {list(self.topk)}")
        choices = [f"{name}@{k}" for k in self.topk for name in EVAL_METRICS]
        if self.early_stop_metric not in choices:
            raise ConfigError(choice_message("eval.early_stop_metric", self.early_stop_metric, choices))


@dataclass
class RetrievalConfig(Section):
    """The item index that evaluation and serving search (one setting for both, logged as MLflow params)."""

    PATH: ClassVar[str] = "retrieval"
    MINIMUMS: ClassVar[dict] = {"nprobe": 1, "ef_search": 1, "refine_k": 1}
    #: A faiss ``index_factory`` string over inner product (``Flat``, ``HNSW32``, ``IVF4096,Flat``,
    #: ``IVF16384,PQ32x4fs,RFlat``, ...), ``MIPS,<string>`` for the same over items lifted to L2, or ``auto``:
    #: exact ``Flat`` for small catalogues, ANN above (``eimf.evaluation.retrieval.auto_index``; docs/serving.md
    #: measures the choice on trained tables).
    index: str = "auto"
    #: IVF cells probed per query (IVF indexes only); None: a fixed share of the cells
    #: (``eimf.evaluation.retrieval.default_nprobe``). docs/serving.md measures recall against it.
    nprobe: Optional[int] = None
    #: HNSW search beam (HNSW indexes only).
    ef_search: int = 128
    #: An ``RFlat`` stage re-scores this many candidates per result exactly; None: 8
    #: (``eimf.evaluation.retrieval.DEFAULT_REFINE_K``, measured in docs/serving.md).
    refine_k: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        if not str(self.index).strip():
            raise ConfigError("retrieval.index must be a faiss index_factory string or 'auto'")
