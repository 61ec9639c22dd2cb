"""benchmarks/remi_reference.py's adapter of the reference REMI (github.com/Tokkiu/REMI) on a tiny synthetic batch.

Runs only where a checkout of the reference is named by ``EIMF_REMI_REFERENCE_DIR`` (``git clone
https://github.com/Tokkiu/REMI``); skipped otherwise (the reference is not vendored here).
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from eimf.config import load_config
from eimf.data.sampling import TrainSampler
from eimf.models import build_model

REFERENCE_DIR = os.environ.get("EIMF_REMI_REFERENCE_DIR")
pytestmark = pytest.mark.skipif(not REFERENCE_DIR, reason="EIMF_REMI_REFERENCE_DIR (a Tokkiu/REMI checkout) not set")

N_ITEMS = 40


def _bench():
    spec = importlib.util.spec_from_file_location(
        "remi_reference_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "remi_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup():
    bench = _bench()
    cfg = load_config(None, [*bench.DEFAULTS, "model.dim=8", "model.num_interests=2", "model.maxlen=6",
                             "train.batch_size=5", "negatives.num_negatives=7"])
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, N_ITEMS + 1, size=int(n)) for n in rng.integers(5, 15, size=20)]
    batch = TrainSampler(seqs, maxlen=6, batch_size=5, seed=0).sample()
    ref = bench.ReferenceStep(bench.load_reference(REFERENCE_DIR), cfg, N_ITEMS)
    return bench, cfg, batch, ref


def test_reference_step_runs_on_cpu_with_finite_loss():
    _, _, batch, ref = _setup()
    assert torch.Tensor.cuda.__name__ != "<lambda>"  # the no-op .cuda() is undone after set_sampler
    assert ref.num_negatives == 7 and ref.model.sample_loss.noise_ratio == 7
    before = ref.model.embeddings.weight.detach().clone()
    losses = [ref.step(batch) for _ in range(2)]
    assert all(math.isfinite(x) for x in losses)
    assert not torch.equal(before, ref.model.embeddings.weight)  # Adam stepped


def test_same_weights_give_our_interests():
    """With the reference's weights copied into ours (our biases zeroed), both extract the same interests from
    the same batch: the two sides time the same model."""
    _, cfg, batch, ref = _setup()
    ours = build_model(cfg.model, N_ITEMS)
    theirs = ref.model
    with torch.no_grad():
        ours.item_emb.weight.copy_(theirs.embeddings.weight)
        ours.extractor.position.copy_(theirs.position_embedding[0])
        ours.extractor.w1.weight.copy_(theirs.linear1[0].weight)
        ours.extractor.w2.weight.copy_(theirs.linear2.weight)
        ours.extractor.w1.bias.zero_()
        ours.extractor.w2.bias.zero_()
        hist, mask, _ = batch
        want, _ = theirs(torch.as_tensor(hist), None, torch.as_tensor(mask).long(), None, ref.device, train=False)
        got = ours.interests(torch.as_tensor(hist), torch.as_tensor(mask))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
