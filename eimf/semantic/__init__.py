"""ESIM: explicit semantic interests (docs/design.md section 4).

Pipeline: warm-up IBIM -> :func:`typical.user_representations` -> :func:`typical.select_typical_users`
-> :func:`prompts.build_prompt` -> an :class:`annotators.base.Annotator` behind an
:class:`cache.AnnotationCache` -> :class:`encoder.SemanticEncoder` -> ``annotations.parquet``
(:func:`annotate.annotate_users`).

Submodules are imported lazily by their users (faiss, torch, sentence-transformers and openai are heavy).
"""
