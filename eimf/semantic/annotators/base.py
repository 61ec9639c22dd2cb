"""One interface for every annotator (metadata, OpenAI-compatible endpoint, Ray Data + vLLM).

``Annotator.annotate(requests) -> results`` takes a *batch* of :class:`AnnotationRequest` and returns one
:class:`AnnotationResult` per request, in the same order. A result is never missing: an answer that does not
validate (:func:`eimf.semantic.prompts.parse_answer`) is asked again, up to ``max_attempts`` tries in all,
and then recorded as ``failed`` with the last raw text and the error.

A backend implements only :meth:`Annotator.generate`: raw completions for a batch of requests. The retry
loop in :meth:`Annotator.annotate` calls it again with just the requests whose answer was invalid, so a
batch backend (``annotators/vllm_ray.py``: one Ray Data pass per round) and a per-request backend (the
OpenAI client over a thread pool) share the validation and retry rules. Transport errors (timeouts, 5xx)
are the backend's business (retry with backoff); when it gives up it returns a :class:`Generation` with
``error`` set, which counts as a failed attempt.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

from eimf.formats.annotations import STATUS_FAILED, STATUS_OK
from eimf.semantic.prompts import PROMPT_VERSION, parse_answer

log = logging.getLogger(__name__)


@dataclass
class AnnotationRequest:
    user: int
    #: Chat messages (:func:`eimf.semantic.prompts.render_messages`).
    messages: List[dict]
    #: :func:`eimf.semantic.prompts.history_hash` of what the prompt shows; part of the cache key.
    history_hash: str
    #: Items listed in the prompt (evidence must be in 1..n_items) and the most interests asked for.
    n_items: int = 0
    max_interests: int = 4
    #: The sanitised item texts as listed (numbered from 1); for annotators that need no LLM.
    item_texts: Optional[List[str]] = None
    item_ids: Optional[List[int]] = None
    prompt_version: str = PROMPT_VERSION
    #: Positions [window_start, window_end) of the training sequence that the prompt lists.
    window_start: Optional[int] = None
    window_end: Optional[int] = None


@dataclass
class AnnotationResult:
    user: int
    #: Validated interests ``[{"name", "description", "evidence"}]``; None when failed.
    interests: Optional[List[dict]]
    #: The last raw answer (kept for failed ones too).
    raw_text: Optional[str]
    status: str
    attempts: int
    tokens_in: int = 0
    tokens_out: int = 0
    error: Optional[str] = None
    history_hash: str = ""
    model: str = ""
    prompt_version: str = PROMPT_VERSION
    latency_s: float = 0.0
    #: True when the result came from the annotation cache (nothing was sent for it in this run).
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


@dataclass
class Generation:
    """One raw completion from a backend."""
    text: Optional[str]
    tokens_in: int = 0
    tokens_out: int = 0
    #: Set when the backend got no answer (transport error after its own retries).
    error: Optional[str] = None
    latency_s: float = 0.0


@dataclass
class _State:
    attempts: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    text: Optional[str] = None
    error: Optional[str] = None
    interests: Optional[list] = None
    errors: list = field(default_factory=list)


class Annotator:
    """Base class: validation and retries of invalid answers around :meth:`generate`."""

    #: Short backend name (``metadata``, ``openai``, ``vllm``).
    kind: str = "base"

    def __init__(self, max_attempts: int = 3):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.max_attempts = int(max_attempts)

    @property
    def model_id(self) -> str:
        """What produced the answers, as it enters the cache key (model name plus anything that changes them)."""
        raise NotImplementedError

    def generate(self, requests: Sequence[AnnotationRequest], attempt: int) -> List[Generation]:
        """Raw completions, one per request, same order. ``attempt`` is 1 for the first round."""
        raise NotImplementedError

    def close(self) -> None:
        """Release engines, pools, connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generate_stream(self, requests: Sequence[AnnotationRequest], attempt: int
                        ) -> Iterator[List[Tuple[int, Generation]]]:
        """Completions as they arrive, in groups of ``(index into requests, generation)``. The default is one
        :meth:`generate` call; a backend that streams (vLLM through one Ray Data pass) yields as it goes."""
        gens = self.generate(requests, attempt)
        if len(gens) != len(requests):
            raise RuntimeError(f"{type(self).__name__}.generate returned {len(gens)} answers "
                               f"for {len(requests)} requests")
        yield list(enumerate(gens))

    def annotate(self, requests: Sequence[AnnotationRequest]) -> List[AnnotationResult]:
        """Every request's result, in the order of ``requests``."""
        requests = list(requests)
        out: List[Optional[AnnotationResult]] = [None] * len(requests)
        for batch in self._stream(requests, max(1, len(requests))):
            for i, r in batch:
                out[i] = r
        return out

    def annotate_stream(self, requests: Sequence[AnnotationRequest], flush_every: int
                        ) -> Iterator[List[AnnotationResult]]:
        """Results in batches of about ``flush_every`` as answers validate, so a caller can store each batch
        (a killed run keeps them). All prompts go through one :meth:`generate_stream` per attempt; a prompt
        whose answer does not validate joins the next attempt; after ``max_attempts`` it is a failed result.
        """
        for batch in self._stream(list(requests), flush_every):
            yield [r for _, r in batch]

    def _stream(self, requests: List[AnnotationRequest], flush_every: int
                ) -> Iterator[List[Tuple[int, AnnotationResult]]]:
        states = [_State() for _ in requests]
        pending = list(range(len(requests)))
        ready: List[Tuple[int, AnnotationResult]] = []
        for attempt in range(1, self.max_attempts + 1):
            if not pending:
                break
            t0 = time.perf_counter()
            still = []
            seen = 0
            for group in self.generate_stream([requests[i] for i in pending], attempt):
                for j, g in group:
                    i = pending[j]
                    seen += 1
                    if self._absorb(states[i], requests[i], g):
                        ready.append((i, self._result(requests[i], states[i])))
                    else:
                        still.append(i)
                while len(ready) >= flush_every:
                    yield ready[:flush_every]
                    ready = ready[flush_every:]
            if seen != len(pending):
                raise RuntimeError(f"{type(self).__name__}: {seen} answers for {len(pending)} requests")
            log.debug("%s attempt %d: %d requests in %.2fs", self.kind, attempt, len(pending),
                      time.perf_counter() - t0)
            pending = sorted(still)
        for i in pending:
            log.warning("user %s: no valid answer after %d attempts (%s)", requests[i].user, states[i].attempts,
                        states[i].error)
            ready.append((i, self._result(requests[i], states[i])))
        for k in range(0, len(ready), flush_every):
            yield ready[k:k + flush_every]

    @staticmethod
    def _absorb(st: "_State", req: AnnotationRequest, g: Generation) -> bool:
        """Count one attempt into ``st``; True when its answer validates."""
        st.attempts += 1
        st.tokens_in += int(g.tokens_in or 0)
        st.tokens_out += int(g.tokens_out or 0)
        st.latency_s += float(g.latency_s or 0.0)
        if g.error is not None:
            st.error = g.error
            st.text = g.text if g.text is not None else st.text
            st.errors.append(g.error)
            return False
        st.text = g.text
        interests, err = parse_answer(g.text, req.max_interests, req.n_items)
        if interests is None:
            st.error = err
            st.errors.append(err)
            return False
        st.interests, st.error = interests, None
        return True

    def _result(self, req: AnnotationRequest, st: "_State") -> AnnotationResult:
        ok = st.interests is not None
        return AnnotationResult(
            user=int(req.user), interests=st.interests, raw_text=st.text,
            status=STATUS_OK if ok else STATUS_FAILED, attempts=st.attempts, tokens_in=st.tokens_in,
            tokens_out=st.tokens_out, error=None if ok else "; ".join(str(e) for e in st.errors)[:2000],
            history_hash=req.history_hash, model=self.model_id, prompt_version=req.prompt_version,
            latency_s=st.latency_s)
