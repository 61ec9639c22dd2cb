"""Annotators behind one interface (:class:`base.Annotator`): ``metadata``, ``openai``, ``vllm``."""
from __future__ import annotations

from eimf.semantic.annotators.base import (STATUS_FAILED, STATUS_OK, AnnotationRequest, AnnotationResult,
                                           Annotator, Generation)

__all__ = ["Annotator", "AnnotationRequest", "AnnotationResult", "Generation", "STATUS_OK", "STATUS_FAILED",
           "build_annotator"]


def build_annotator(cfg, **kwargs) -> Annotator:
    """The annotator named by ``cfg.annotator`` (a :class:`eimf.config.SemanticConfig`).

    ``kwargs`` go to the constructor (e.g. ``embed=`` for ``metadata``). ``vllm`` is provided by
    ``annotators/vllm_ray.py`` (``VLLMRayAnnotator.from_config``) when it is installed.
    """
    name = cfg.annotator
    # each annotator's dependencies (an encoder, openai, vLLM) load only when it is the one chosen
    if name == "metadata":
        from eimf.semantic.annotators.metadata import MetadataAnnotator

        return MetadataAnnotator(encoder_name=kwargs.pop("encoder_name", cfg.encoder), **kwargs)
    if name == "openai":
        from eimf.semantic.annotators.openai_compat import OpenAICompatAnnotator

        return OpenAICompatAnnotator.from_config(cfg)
    if name == "vllm":
        try:
            from eimf.semantic.annotators.vllm_ray import VLLMRayAnnotator
        except ImportError as e:
            raise RuntimeError("the vllm annotator (eimf/semantic/annotators/vllm_ray.py) is not available: "
                               f"{e}") from e
        return VLLMRayAnnotator.from_config(cfg, **kwargs)
    raise ValueError(f"unknown annotator {name!r} (metadata | openai | vllm)")
