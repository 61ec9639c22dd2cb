"""``train.compile``: ``torch.compile`` (inductor) of the training step's fixed-shape tensor work, with eager as the
fallback for anything it cannot do.

What is compiled: the backbone's extractor (the self-attentive extractor of ComiRec-SA and REMI, the capsule routing
of ComiRec-DR and MIND: the tanh chain, softmaxes and small matmuls that docs/benchmarks/step_profile.md finds
dominant) and the sampled softmax's tensor part (``SampledSoftmaxLoss._core``). What stays eager: the negative
sampling (data-dependent loops), log-Q (a float number of draws that changes every step: a compiled graph would be
specialised on it and recompiled every step) and the item lookups (on the sharded path a different number of
distinct rows every step). Those are the only inputs whose shapes vary, so the compiled parts take static shapes
(``dynamic=False``): training batches all have ``train.batch_size`` rows (the samplers draw with replacement; the
Ray Data input drops the last partial batch). A call with other shapes (EIMF's extra rows) compiles one more graph,
up to :data:`MAX_SHAPES`, then runs eager; calls without autograd (evaluation) always run eager.

Failures never stop training: an exception from ``torch.compile`` or from a compiled call puts every wrapped part
back to eager with a warning (:meth:`CompiledStep.fall_back`), and the trainer runs a step that failed while a graph
was new again in eager (``eimf.training.loop.Trainer.train_step``), so an error in the compiled backward is caught
too.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, List, Optional

import torch

log = logging.getLogger(__name__)

#: Distinct input signatures each part compiles a graph for; more run eager (each graph costs seconds to build).
MAX_SHAPES = 2
#: The backbone's extractor, by the attribute the backbones give it (eimf/models).
EXTRACTORS = ("extractor", "routing")


def _signature(args) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) if isinstance(a, torch.Tensor) else type(a)
                 for a in args)


class CompiledCall:
    """Stands in for one eager callable: the compiled version for autograd calls of up to :data:`MAX_SHAPES`
    signatures, the eager one for everything else and after a fallback."""

    def __init__(self, name: str, eager: Callable, step: "CompiledStep"):
        self.name, self.eager, self.step = name, eager, step
        self.compiled: Optional[Callable] = None
        self.signatures: set = set()

    def __call__(self, *args):
        step = self.step
        if step.fell_back or not torch.is_grad_enabled():
            return self.eager(*args)
        key = _signature(args)
        if key not in self.signatures:
            if len(self.signatures) >= MAX_SHAPES:
                return self.eager(*args)
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.eager, backend=step.backend, dynamic=False)
            except Exception as e:  # noqa: BLE001 - any failure of the compiler means eager, never a crash
                step.fall_back(f"torch.compile of {self.name} failed: {e!r}")
                return self.eager(*args)
            self.signatures.add(key)
            step.graphs += 1
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001
            step.fall_back(f"the compiled {self.name} failed: {e!r}")
            return self.eager(*args)


class CompiledStep:
    """The compiled parts of one model and loss; ``compile_seconds`` adds up the wall time of the training steps in
    which a graph was built (compiling them and running them once)."""

    def __init__(self, backend: str = "inductor"):
        self.backend = backend
        self.parts: List[tuple] = []  # (object, attribute, CompiledCall)
        self.graphs = 0
        self.fell_back = False
        self.compile_seconds = 0.0
        #: A training step with the compiled parts has completed.
        self.verified = False

    def wrap(self, owner, attribute: str, name: str) -> None:
        call = CompiledCall(name, getattr(owner, attribute), self)
        setattr(owner, attribute, call)  # an instance attribute: shadows the class's method for this object only
        self.parts.append((owner, attribute, call))

    def fall_back(self, reason: str) -> None:
        """Every part eager again, for the rest of the run."""
        if self.fell_back:
            return
        self.fell_back = True
        for owner, attribute, _ in self.parts:
            owner.__dict__.pop(attribute, None)  # the class's method again
        msg = f"train.compile: {reason}; training continues eager"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def record_step(self, seconds: float, built: bool) -> None:
        """After a step that completed: its time counts as compile time when it built a graph."""
        if built:
            self.compile_seconds += seconds
            log.info("train.compile: %d graph(s) built, %.1f s of compiling so far", self.graphs,
                     self.compile_seconds)
        self.verified = True

    def metrics(self) -> dict:
        return {"compile_seconds": self.compile_seconds, "compile_fell_back": float(self.fell_back),
                "compile_graphs": float(self.graphs)}


def compile_step(model: torch.nn.Module, loss_fn, backend: str = "inductor") -> CompiledStep:
    """Wrap ``model``'s extractor and ``loss_fn``'s tensor part (see the module doc); ``model`` is a backbone, or a
    module holding one as ``.backbone`` (the sharded path's ShardedItemModel)."""
    step = CompiledStep(backend)
    backbone = getattr(model, "backbone", model)
    extractor = next((getattr(backbone, n) for n in EXTRACTORS if isinstance(getattr(backbone, n, None),
                                                                             torch.nn.Module)), None)
    if extractor is None:
        msg = f"train.compile: {type(backbone).__name__} has no extractor ({' or '.join(EXTRACTORS)}): it runs eager"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    else:
        step.wrap(extractor, "forward", f"{type(backbone).__name__} extractor")
    step.wrap(loss_fn, "_core", "sampled softmax")
    return step
