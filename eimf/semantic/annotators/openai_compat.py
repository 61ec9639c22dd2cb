"""Annotator over any OpenAI-compatible ``/v1/chat/completions`` endpoint (a ``vllm serve`` process, a hosted model).

* **Structured output** (``structured_output``): ``json_schema`` sends
  ``response_format={"type": "json_schema", "json_schema": {"name", "schema", "strict": true}}`` (OpenAI and
  vLLM both accept it); ``vllm`` sends vLLM's own ``extra_body={"structured_outputs": {"json": schema}}``;
  ``json_object`` asks only for some JSON; ``none`` sends nothing (the answer is still validated).
* **Concurrency**: at most ``max_concurrency`` requests in flight (a thread pool of that size).
* **Transport errors** (timeout, connection refused, 429, 5xx) are retried with exponential backoff
  (``tenacity``), ``request_retries`` times; then the attempt counts as failed with the error recorded. Other
  HTTP errors (400, 401, 404) are not retried: they will not go away.
* **Invalid answers** are retried by :class:`~eimf.semantic.annotators.base.Annotator` (``max_attempts``).
* **Usage**: ``prompt_tokens`` / ``completion_tokens`` of every response (failed attempts included) are summed.

The API key comes from the environment variable named by ``api_key_env``; a local server needs none (a
placeholder is sent).
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

from eimf.semantic.annotators.base import AnnotationRequest, Annotator, Generation
from eimf.semantic.prompts import interest_schema

log = logging.getLogger(__name__)

STRUCTURED_MODES = ("json_schema", "vllm", "json_object", "none")


class OpenAICompatAnnotator(Annotator):
    kind = "openai"

    def __init__(self, base_url: str, model: str, api_key_env: Optional[str] = "OPENAI_API_KEY",
                 structured_output: str = "json_schema", timeout_s: float = 120.0, max_concurrency: int = 4,
                 request_retries: int = 3, backoff_initial_s: float = 1.0, backoff_max_s: float = 30.0,
                 temperature: float = 0.0, max_tokens: int = 512, max_attempts: int = 3,
                 extra_body: Optional[dict] = None, sampling_tag: Optional[str] = None):
        super().__init__(max_attempts=max_attempts)
        if structured_output not in STRUCTURED_MODES:
            raise ValueError(f"structured_output must be one of {STRUCTURED_MODES}, got {structured_output!r}")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.base_url, self.model = base_url, model
        self.structured_output = structured_output
        self.timeout_s, self.max_concurrency = float(timeout_s), int(max_concurrency)
        self.request_retries = int(request_retries)
        self.backoff_initial_s, self.backoff_max_s = float(backoff_initial_s), float(backoff_max_s)
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.extra_body = dict(extra_body or {})
        self.sampling_tag = sampling_tag
        api_key = os.environ.get(api_key_env) if api_key_env else None
        from openai import OpenAI  # the [llm] extra: only this annotator needs it

        # The client's own retries are off: tenacity below owns retries and backoff.
        self.client = OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=self.timeout_s, max_retries=0)
        self._pool: Optional[ThreadPoolExecutor] = None

    @classmethod
    def from_config(cls, cfg) -> "OpenAICompatAnnotator":
        """From a :class:`eimf.config.SemanticConfig`."""
        o = cfg.openai
        return cls(base_url=o.base_url, model=o.model, api_key_env=o.api_key_env,
                   structured_output=o.structured_output, timeout_s=o.request_timeout_s,
                   max_concurrency=o.max_concurrency, request_retries=o.request_retries,
                   backoff_initial_s=o.backoff_initial_s, backoff_max_s=o.backoff_max_s,
                   temperature=cfg.temperature, max_tokens=cfg.max_tokens, max_attempts=cfg.max_attempts)

    @property
    def model_id(self) -> str:
        tag = self.sampling_tag or f"t{self.temperature:g}"
        return f"openai:{self.model}:{tag}"

    # ------------------------------------------------------------------------------------- one call
    def _request_kwargs(self, req: AnnotationRequest) -> dict:
        kw = dict(model=self.model, messages=req.messages, temperature=self.temperature, max_tokens=self.max_tokens)
        schema = interest_schema(req.max_interests)
        extra = dict(self.extra_body)
        if self.structured_output == "json_schema":
            kw["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "interests", "schema": schema, "strict": True}}
        elif self.structured_output == "vllm":
            extra["structured_outputs"] = {"json": schema}
        elif self.structured_output == "json_object":
            kw["response_format"] = {"type": "json_object"}
        if extra:
            kw["extra_body"] = extra
        return kw

    def _retryable(self, exc: BaseException) -> bool:
        import openai  # the [llm] extra

        if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                            openai.InternalServerError)):
            return True
        return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500

    def _call(self, req: AnnotationRequest) -> Generation:
        from tenacity import (RetryError, Retrying, retry_if_exception,  # the [llm] extra
                              stop_after_attempt, wait_exponential_jitter)

        t0 = time.perf_counter()
        kwargs = self._request_kwargs(req)
        retrying = Retrying(
            stop=stop_after_attempt(self.request_retries + 1),
            wait=wait_exponential_jitter(initial=self.backoff_initial_s, max=self.backoff_max_s,
                                         jitter=self.backoff_initial_s / 2),
            retry=retry_if_exception(self._retryable), reraise=True)
        try:
            resp = retrying(self.client.chat.completions.create, **kwargs)
        except RetryError as e:  # pragma: no cover - reraise=True re-raises the last error instead
            return Generation(text=None, error=f"transport: {e}", latency_s=time.perf_counter() - t0)
        except Exception as e:  # the attempt failed; the base class records it
            log.warning("user %s: request failed: %s: %s", req.user, type(e).__name__, e)
            return Generation(text=None, error=f"transport: {type(e).__name__}: {e}"[:500],
                              latency_s=time.perf_counter() - t0)
        usage = getattr(resp, "usage", None)
        choice = resp.choices[0] if resp.choices else None
        text = choice.message.content if choice is not None and choice.message is not None else None
        return Generation(text=text, tokens_in=int(getattr(usage, "prompt_tokens", 0) or 0),
                          tokens_out=int(getattr(usage, "completion_tokens", 0) or 0),
                          latency_s=time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------ interface
    def generate(self, requests: Sequence[AnnotationRequest], attempt: int) -> List[Generation]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="eimf-openai")
        return list(self._pool.map(self._call, requests))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        try:
            self.client.close()
        except Exception:  # pragma: no cover
            pass
