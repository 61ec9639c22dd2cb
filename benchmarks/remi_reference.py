"""Our REMI training step against the reference implementation's (github.com/Tokkiu/REMI), side by side in one
process on the same batches and settings (issue 31).

Get the reference once (this script downloads nothing):

    git clone https://github.com/Tokkiu/REMI /tmp/REMI

Then, alone on the machine (any other load skews the two sides differently and makes the ratio meaningless):

    EIMF_DATA_DIR=/work/shared/data python benchmarks/remi_reference.py --reference-dir /tmp/REMI \\
        --dataset ml-1m --threads 2 --steps 300 --warmup 30 --rounds 3 [--precision fp32 bf16 --compile off on] [--json]

Trailing ``key=value`` arguments are config overrides for both sides (``model.dim=...``, ``train.batch_size=...``,
``model.beta=1`` / ``model.reg_lambda=100`` for IHN / RR: with beta > 0 the reference's loss drops into pdb when
its reweighting overflows, so run it with stdin closed); ``--precision``/``--compile`` only change our rows
(``train.precision``/``train.compile``, a row per combination); the reference row is always its fp32 eager step.

What it measures: every side first runs ``--warmup`` steps, then ``--steps`` timed steps split into ``--rounds``
rounds; in each round every side runs its share back to back, the order of the sides reversed every other round,
so slow drift of the machine falls on all sides alike. A step is: batch tensors -> forward -> sampled softmax ->
backward -> Adam. ``examples/s`` and ``ms/step`` count those steps only, on pre-drawn batches; the sampler's own
cost (the same for both, since both take the same batches) is timed apart and ``examples/s with input`` adds it to
each side. ``ours/ref`` is ours' examples/s over the reference's. Threads: ``--threads`` (default 2), set once
for both by eimf.training.hardware.set_threads.

Identical on both sides:
- the data: the project's prepared split (``prepare``/``load_prepared``) and the very same batches, drawn once from
  ``TrainSampler`` (seed 0): uniform user, uniform cut in [4, len), target ``seq[k]``, history ``seq[:k][-50:]``
  left-aligned and right-padded with 0, which is also the reference DataIterator's layout;
- maxlen 50, batch 128, d 64, K 4, one 4d tanh hidden layer and K attention heads, position embedding on the keys,
  interests = attention x plain item embeddings, hard readout by the target (argmax), the item table as output
  layer, 1,280 negatives shared by the batch (``negatives.num_negatives``), drawn uniformly (``negatives.sampler``,
  mapped to the reference's ``--sample_prob`` 0; log_uniform maps to 1), log-Q subtracted from all logits
  (a constant under uniform), cross-entropy on the positive, mean over the batch;
- Adam, lr 1e-3, no weight decay; IHN beta (``model.beta``) and RR lambda (``model.reg_lambda``), 0 by default.

What differs (each side is left as its code has it):
- the reference draws its 1,280 negatives with replacement from ids 0..N (padding included) with its alias sampler
  and keeps accidental hits; ours, by the project defaults, draws 1,280 *distinct* ids from 1..N (rejection,
  ``negatives.unique=true``) and masks accidental hits (``negatives.remove_accidental_hits=true``). Add
  ``negatives.unique=false negatives.remove_accidental_hits=false`` to the command to take both out of ours;
- the reference's linear layers have no bias, ours do; weights are initialised differently (kaiming-normal for all
  of its parameters; glorot-uniform for ours) -- the same shapes and the same work otherwise;
- the reference's Adam is ``torch.optim.Adam`` with its defaults (the per-parameter loop on CPU); ours is the
  fused CPU kernel (eimf.training.hardware.adam);
- the reference always computes its routing regulariser and adds it times ``rlambda`` (0 by default), as its
  training loop does for REMI; ours skips it at ``model.reg_lambda=0``;
- several of our rows with ``--compile on`` share one process, so torch.compile's caches carry over between them
  (a later row's warm-up can be short); the reference row is never compiled;
- batch tensors: ours ``torch.as_tensor`` of the numpy arrays (mask bool); the reference its ``to_tensor``
  (``torch.Tensor(x).long()``; mask int64) of the same arrays. Its DataIterator (Python lists, plus the time and
  adjacency matrices it computes for every example but REMI's forward never reads) is not used: its forward gets
  ``times=None``. Its loss is read with ``float(loss)`` as ours is (its loop keeps a graph-holding sum instead).

How the reference runs on CPU without editing the checkout: ``src/BasicModel.py`` and ``src/REMI.py`` are imported
by path (nothing else of it: ``utils``/``evalution`` pull in faiss-gpu and the data files); its noise
distribution is built with ``.cuda()`` (``build_uniform_noise``), which is made a no-op (``torch.Tensor.cuda``
returns the tensor) only while ``set_sampler`` runs; its device is ``cpu``. tests/test_remi_reference.py (run with
``EIMF_REMI_REFERENCE_DIR=<checkout>``; skipped without one) checks that this adapter takes one of our batches to a
finite loss and that, given the reference's weights (our biases zeroed), our REMI extracts the same interests from the
same batch.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from eimf.config import load_config
from eimf.data.preprocess import prepare
from eimf.data.sampling import TrainSampler
from eimf.formats.prepared import load_prepared
from eimf.training.components import build_components, peak_rss_mb
from eimf.training.hardware import set_threads
from eimf.training.loop import Trainer, seed_everything

#: Config overrides that put our side on the reference's settings (the command's own overrides come after them).
DEFAULTS = ["model.backbone=remi", "negatives.sampler=uniform", "negatives.num_negatives=1280"]
#: Our negatives.sampler -> the reference's ``--sample_prob`` (src/utils.py: 0 uniform, 1 log).
SAMPLE_PROB = {"uniform": 0, "log_uniform": 1}


def load_reference(reference_dir) -> types.ModuleType:
    """The reference's ``src/REMI.py`` imported by path (with the ``src/BasicModel.py`` it imports)."""
    src = Path(reference_dir) / "src"
    missing = [n for n in ("BasicModel.py", "REMI.py") if not (src / n).is_file()]
    if missing:
        raise SystemExit(f"--reference-dir {reference_dir}: no {', '.join('src/' + n for n in missing)} "
                         "(get one with: git clone https://github.com/Tokkiu/REMI)")

    def load(name: str, alias: str) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(alias, src / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    basic = load("BasicModel", "remi_reference_BasicModel")
    # REMI.py does ``from BasicModel import BasicModel``: give it that name only while it is imported.
    saved = sys.modules.get("BasicModel")
    sys.modules["BasicModel"] = basic
    try:
        return load("REMI", "remi_reference_REMI")
    finally:
        if saved is None:
            sys.modules.pop("BasicModel", None)
        else:
            sys.modules["BasicModel"] = saved


@contextlib.contextmanager
def cuda_is_a_no_op():
    """``tensor.cuda()`` returns the tensor: the reference builds its noise distribution with it."""
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


def to_tensor(x) -> torch.Tensor:
    """The reference's ``utils.to_tensor`` on the CPU."""
    return torch.Tensor(x).long()


class ReferenceStep:
    """The reference's REMI, its sampled loss and its Adam, on the CPU; :meth:`step` is one iteration of its
    training loop (src/evalution.py ``train``) on one of our ``(hist, mask, target)`` batches."""

    def __init__(self, module: types.ModuleType, cfg, n_items: int, seed: int = 0):
        m, neg = cfg.model, cfg.negatives
        if neg.sampler not in SAMPLE_PROB:
            raise SystemExit(f"negatives.sampler={neg.sampler}: the reference has uniform and log_uniform only")
        seed_everything(seed)
        self.device = torch.device("cpu")
        # item_num = ids 0..N as its train.py sets item_count (max id + 1); padding_idx 0
        self.model = module.REMI(n_items + 1, m.dim, cfg.train.batch_size, interest_num=m.num_interests,
                                 seq_len=m.maxlen, add_pos=True, beta=m.beta, device=self.device)
        self.model.set_device(self.device)
        args = argparse.Namespace(sampled_n=neg.num_negatives or neg.negatives_per_example * cfg.train.batch_size,
                                  sampled_loss="sampled", sample_prob=SAMPLE_PROB[neg.sampler])
        with cuda_is_a_no_op():
            self.model.set_sampler(args, device=self.device)
        self.num_negatives = args.sampled_n
        self.rlambda = m.reg_lambda
        lr = cfg.train.lr if cfg.train.lr is not None else 1e-3  # its --learning_rate default
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)

    def step(self, batch) -> float:
        hist, mask, target = batch[:3]
        model = self.model
        model.train()
        self.optimizer.zero_grad()
        pos_items = to_tensor(target)
        interests, scores, atten, readout, selection = model(to_tensor(hist), pos_items, to_tensor(mask), None,
                                                             self.device)
        loss = model.calculate_sampled_loss(readout, pos_items, selection, interests)
        loss += self.rlambda * model.calculate_atten_loss(atten)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


class Side:
    def __init__(self, name: str, precision: str, compile_: str, step, compiled=None):
        self.name, self.precision, self.compile, self.step, self.compiled = name, precision, compile_, step, compiled
        self.seconds, self.steps, self.warmup_s, self.last_loss = 0.0, 0, 0.0, math.nan

    def run(self, batches) -> None:
        t0 = time.perf_counter()
        for b in batches:
            self.last_loss = self.step(b)
        self.seconds += time.perf_counter() - t0
        self.steps += len(batches)


def our_side(cfg, data, precision: str, compile_: str) -> Side:
    cfg.train.precision, cfg.train.compile = precision, compile_ == "on"
    seed_everything(0)
    model, loss_fn, runner, _ = build_components(cfg, data.n_items)
    trainer = Trainer(cfg, model, loss_fn, runner, iter(()), data.valid, data.test)
    return Side("ours", precision, compile_, lambda b: trainer.train_step(b)["loss"], runner.compiled)


def bench(sides, batches, warmup: int, steps: int, rounds: int) -> None:
    for side in sides:
        t0 = time.perf_counter()
        side.run(batches[:warmup])
        side.warmup_s = time.perf_counter() - t0
        side.seconds, side.steps = 0.0, 0
    timed = batches[warmup:warmup + steps]
    bounds = np.linspace(0, steps, rounds + 1).astype(int)
    for r in range(rounds):
        chunk = timed[bounds[r]:bounds[r + 1]]
        for side in (sides if r % 2 == 0 else sides[::-1]):
            side.run(chunk)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-dir", required=True, help="a checkout of github.com/Tokkiu/REMI")
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3, help="the timed steps are split into this many alternating rounds")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="train.precision of our rows (the reference: fp32)")
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                   help="train.compile of our rows (the reference: eager)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, for both sides")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0 or not 1 <= args.rounds <= args.steps:
        p.error("need --steps >= 1, --warmup >= 0 and 1 <= --rounds <= --steps")
    threads = set_threads(args.threads)
    reference = load_reference(args.reference_dir)
    cfg = load_config(None, [f"data.dataset={args.dataset}", *DEFAULTS, *args.overrides])
    if cfg.model.backbone != "remi" or cfg.model.hidden_factor != 4:
        p.error("model.backbone must stay remi, model.hidden_factor 4 (the reference's hidden layer is fixed at 4d)")
    data = load_prepared(prepare(cfg.data).path)

    sampler = TrainSampler(list(data.train["items"]), maxlen=cfg.model.maxlen, batch_size=cfg.train.batch_size,
                           min_cut=cfg.train.min_cut, seed=0)
    it = iter(sampler)
    t0 = time.perf_counter()
    batches = [next(it) for _ in range(args.warmup + args.steps)]
    sampler_s_per_batch = (time.perf_counter() - t0) / len(batches)

    sides = [our_side(cfg, data, pr, co) for pr in args.precision for co in args.compile]
    ref = ReferenceStep(reference, cfg, data.n_items)
    sides.append(Side("reference", "fp32", "off", ref.step))
    bench(sides, batches, args.warmup, args.steps, args.rounds)

    B = cfg.train.batch_size
    ref_eps = B * sides[-1].steps / sides[-1].seconds
    ref_eps_in = B / (sides[-1].seconds / sides[-1].steps + sampler_s_per_batch)
    rows = []
    for s in sides:
        step_s = s.seconds / s.steps
        compiled = s.compiled
        rows.append({
            "side": s.name, "precision": s.precision,
            "compile": s.compile if compiled is None else ("fell back" if compiled.fell_back else "on"),
            "examples_per_s": B / step_s, "ms_per_step": 1000 * step_s,
            "examples_per_s_with_input": B / (step_s + sampler_s_per_batch),
            "ratio_vs_reference": (B / step_s) / ref_eps,
            "ratio_vs_reference_with_input": (B / (step_s + sampler_s_per_batch)) / ref_eps_in,
            "warmup_s": s.warmup_s, "last_loss": s.last_loss,
        })
    setting = {"dataset": args.dataset, "threads": threads, "steps": args.steps, "warmup": args.warmup,
               "rounds": args.rounds, "batch": B, "maxlen": cfg.model.maxlen, "dim": cfg.model.dim,
               "K": cfg.model.num_interests, "n_items": data.n_items, "negatives": ref.num_negatives,
               "sampler": cfg.negatives.sampler, "ours_unique": cfg.negatives.unique,
               "ours_remove_accidental_hits": cfg.negatives.remove_accidental_hits, "beta": cfg.model.beta,
               "reg_lambda": cfg.model.reg_lambda, "sampler_ms_per_batch": 1000 * sampler_s_per_batch,
               "torch": torch.__version__, "peak_rss_mb": peak_rss_mb()}
    if args.json:
        print(json.dumps({"setting": setting, "rows": rows}))
        return
    print("| side | precision | compile | examples/s | ms/step | ours/ref | examples/s with input | "
          "ours/ref with input | warm-up s | last loss |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['precision']} | {r['compile']} | {r['examples_per_s']:.0f} | "
              f"{r['ms_per_step']:.1f} | {r['ratio_vs_reference']:.2f} | {r['examples_per_s_with_input']:.0f} | "
              f"{r['ratio_vs_reference_with_input']:.2f} | {r['warmup_s']:.1f} | {r['last_loss']:.3f} |")
    print("\n" + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()))


if __name__ == "__main__":
    main()
