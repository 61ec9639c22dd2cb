"""The variants of an EIMF grid (docs/design.md section 5's ablations): each a set of annotation settings and
training overrides on top of the grid's config (``jobs/experiments.py --variants``)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from eimf.config import Config, apply_overrides


@dataclass(frozen=True)
class Variant:
    """One line of an EIMF comparison: the backbone alone, or EIMF with its annotation settings and loss
    weights. ``annotation`` holds the ``semantic.*`` overrides of the annotation step (None: no annotation,
    EIMF off); ``train`` any further overrides of the EIMF training (e.g. ``eimf.lambda_sp=0``)."""

    name: str
    description: str
    annotation: Optional[Tuple[str, ...]] = None
    train: Tuple[str, ...] = ()
    #: A second annotation set whose answered users replace theirs in the first (``coverage``: metadata for
    #: everyone, the LLM's for the typical users); None: one set.
    overlay: Optional[Tuple[str, ...]] = None

    @property
    def eimf(self) -> bool:
        return self.annotation is not None


_META = ("semantic.annotator=metadata",)
#: The named variants of ``jobs/experiments.py --variants`` (docs/design.md section 5's ablations).
VARIANTS: Dict[str, Variant] = {v.name: v for v in [
    Variant("backbone", "IBIM alone (also the warm-up model that picks the typical users)"),
    Variant("eimf", "EIMF, metadata annotator, typical users", _META),
    Variant("eimf-llm", "EIMF, LLM annotator (vLLM, semantic.vllm.model), typical users", ("semantic.annotator=vllm",)),
    # An LLM on CPU annotates ~0.2 prompts/s: this pairs with budget-5% where 20 % would take too long.
    Variant("llm-5%", "EIMF, LLM annotator, 5 % of training users (pair with budget-5%)",
            ("semantic.annotator=vllm", "semantic.budget=0.05")),
    Variant("llm-1%", "EIMF, LLM annotator, 1 % of training users (pair with budget-1%)",
            ("semantic.annotator=vllm", "semantic.budget=0.01")),
    Variant("no-sp", "EIMF without semantic prediction (lambda_sp = 0)", _META, ("eimf.lambda_sp=0",)),
    Variant("no-ma", "EIMF without modality alignment (lambda_ma = 0)", _META, ("eimf.lambda_ma=0",)),
    Variant("no-aux", "EIMF batches, both auxiliary weights 0 (isolates the sampling)", _META,
            ("eimf.lambda_sp=0", "eimf.lambda_ma=0")),
    Variant("random", "EIMF with random instead of typical users", _META + ("semantic.selection=random",)),
    Variant("extra", "EIMF, typical rows added for the auxiliary losses only (eimf.typical_sampling=extra)",
            _META, ("eimf.typical_sampling=extra",)),
    Variant("extra-1%", "as extra, 1 % of training users annotated (pair with budget-1%)",
            _META + ("semantic.budget=0.01",), ("eimf.typical_sampling=extra",)),
    *[Variant(f"budget-{p}%", f"EIMF, metadata, {p} % of training users annotated",
              _META + (f"semantic.budget={p / 100:g}",)) for p in (1, 5, 20, 100)],
    # round 2: each change alone, then together (eimf-r2); text-init is the no-EIMF way to use the same text
    Variant("eimf-proj", "EIMF, alignment through a behaviour projection h(v)", _META,
            ("eimf.experimental.ma_projection=mlp",)),
    Variant("eimf-mask", "EIMF, own interests and near-duplicates (cos > 0.9) are not negatives", _META,
            ("eimf.experimental.mask_own_interests=true", "eimf.duplicate_cos=0.9")),
    Variant("eimf-ground", "EIMF, matching against the cited items' embeddings", _META,
            ("eimf.experimental.matching_space=evidence",)),
    Variant("eimf-window", "EIMF, typical cuts with >= 50 % of the history in the prompted window", _META,
            ("eimf.experimental.window_overlap=0.5",)),
    Variant("eimf-r2", "EIMF with all four round-2 changes", _META,
            ("eimf.experimental.ma_projection=mlp", "eimf.experimental.mask_own_interests=true",
             "eimf.duplicate_cos=0.9", "eimf.experimental.matching_space=evidence", "eimf.experimental.window_overlap=0.5")),
    Variant("text-init", "the backbone, item table initialised from the item texts (no EIMF)",
            train=("model.item_init=text",)),
    Variant("eimf-text", "EIMF on the text-initialised item table (does EIMF add to text-init?)", _META,
            ("model.item_init=text",)),
    Variant("coverage", "every training user's metadata interests, the LLM's for the typical users",
            _META + ("semantic.budget=1.0",), overlay=("semantic.annotator=vllm",)),
    Variant("item-align", "item-level alignment only (item rows <-> MLP of their text), the backbone's batches",
            _META, ("eimf.lambda_sp=0", "eimf.lambda_ma=0", "eimf.experimental.lambda_item=0.1",
                    "eimf.typical_sampling=extra")),
]}


def resolve_variant(spec: str) -> Variant:
    """A named variant, or ``name[key=value,...]``: that variant with more settings, e.g.
    ``eimf[eimf.lambda_ma=0.03,eimf.temperature=0.2]`` to choose weights on valid. ``semantic.*`` keys change the
    annotation set, every other key the training."""
    name, _, rest = spec.partition("[")
    if name not in VARIANTS:
        raise ValueError(f"unknown variants [{spec!r}]; known: {sorted(VARIANTS)} (or name[key=value,...])")
    if not rest:
        return VARIANTS[name]
    if not rest.endswith("]") or not rest[:-1].strip():
        raise ValueError(f"variant {spec!r}: expected name[key=value,...]")
    extra = [kv.strip() for kv in rest[:-1].split(",")]
    bad = [kv for kv in extra if "=" not in kv or not kv.split("=", 1)[0].strip()]
    if bad:
        raise ValueError(f"variant {spec!r}: {bad} are not key=value")
    base = VARIANTS[name]
    annotation = [kv for kv in extra if kv.startswith("semantic.")]
    if annotation and not base.eimf:
        raise ValueError(f"variant {spec!r}: {name} trains without annotations, so {annotation} would do nothing")
    train = tuple(kv for kv in extra if not kv.startswith("semantic."))
    return Variant(spec, f"{base.description}; {', '.join(extra)}",
                   None if base.annotation is None else base.annotation + tuple(annotation),
                   base.train + train, base.overlay)


def is_eimf(name: str) -> bool:
    try:
        return resolve_variant(name).eimf
    except ValueError:  # a row of a variant this version no longer defines
        return False


def variant_order(name: str) -> Tuple[int, str]:
    """Table order: the order of :data:`VARIANTS`, a ``name[...]`` spec after its base variant."""
    base = name.partition("[")[0]
    order = list(VARIANTS)
    return (order.index(base) if base in order else len(order), name)


def with_overrides(cfg: Config, overrides: Optional[Sequence[str]]) -> Config:
    """A copy of ``cfg`` with a variant's ``key=value`` overrides, checked as :func:`eimf.config.load_config`
    checks them (old keys renamed with a warning); ``cfg`` itself is never changed."""
    return apply_overrides(cfg, list(overrides)) if overrides else copy.deepcopy(cfg)
