"""Label behaviour interests with annotated interest phrases, no LLM (docs/design.md section 5, last point).

Each behaviour interest v is mapped by the trained predictor g into the text-encoder space and named by the
annotated phrase whose vector is nearest (cosine). The phrase table is every distinct annotated interest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import pandas as pd
import torch


@dataclass
class PhraseTable:
    names: List[str]
    descriptions: List[str]
    #: [P, D] unit vectors, the encoder's embedding of "name: description".
    vectors: np.ndarray

    @classmethod
    def from_annotations(cls, annotations: pd.DataFrame) -> "PhraseTable":
        """Distinct (name, description) of the ``ok`` rows of ``annotations.parquet``."""
        ok = annotations[annotations["status"] == "ok"].drop_duplicates(["name", "description"])
        if ok.empty:
            raise ValueError("no annotated interest to label with")
        vecs = np.stack([np.asarray(v, dtype=np.float32) for v in ok["vector"]])
        return cls(list(ok["name"]), list(ok["description"].fillna("")), vecs)


def label_interests(head, interests: torch.Tensor, table: PhraseTable,
                    topk: int = 1) -> List[List[List[Tuple[str, float]]]]:
    """interests [B, K, d] (or [K, d]) -> per user, per interest, the ``topk`` nearest phrases as (name, cosine)."""
    single = interests.dim() == 2
    if single:
        interests = interests.unsqueeze(0)
    pred = head.predict_semantic(interests)  # [B, K, D], unit
    vecs = torch.as_tensor(table.vectors, dtype=pred.dtype, device=pred.device)
    vecs = torch.nn.functional.normalize(vecs, dim=-1)
    score, idx = (pred @ vecs.t()).topk(min(topk, len(table.names)), dim=-1)
    out = [[[(table.names[j], float(s)) for j, s in zip(ij.tolist(), sj.tolist())]
            for ij, sj in zip(iu, su)] for iu, su in zip(idx, score)]
    return out[0] if single else out
