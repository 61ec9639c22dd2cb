"""Single-process training: the step, the evaluation schedule, early stopping and the best model.

Nothing here knows about Ray: the distributed runner (``runner.py``) hands in a ``report`` callback
(metrics plus an optional checkpoint folder) and a state to resume from. The same loop therefore runs
in a unit test, in one Ray Train worker, or in N DeepSpeed ranks.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

import numpy as np
import torch

from eimf.config import Config
from eimf.evaluation import evaluate
from eimf.evaluation.retrieval import ItemIndex
from eimf.formats import checkpoints as ckpt
from eimf.models import build_model
from eimf.progress import progress

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Everything besides weights needed to resume exactly where training stopped."""

    step: int = 0
    examples: int = 0
    best_metric: float = -math.inf
    best_step: int = 0
    bad_evals: int = 0
    train_seconds: float = 0.0
    data_seconds: float = 0.0
    history: list = field(default_factory=list)
    stopped_early: bool = False
    #: The step of every resume from a checkpoint (a replaced worker, or the same run name run again).
    resumes: list = field(default_factory=list)

    @classmethod
    def from_json(cls, text: str) -> "LoopState":
        return cls(**json.loads(text))




def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StepRunner:
    """forward/backward/optimizer step on one process. ``DeepSpeedStepRunner`` overrides these for N ranks;
    ``full_params`` and ``broadcast`` are the collectives that evaluation needs (no-ops here)."""

    #: EIMF's P and g (:class:`eimf.modules.alignment.EIMFHead`) once attached: trained by this optimizer and
    #: checkpointed beside the model, but not part of it, so never exported.
    head: Optional[torch.nn.Module] = None
    #: ``train.precision``: ``bf16`` runs :meth:`forward` under a bf16 autocast (parameters stay fp32).
    precision: str = "fp32"
    #: ``train.compile``: the compiled parts of the model and loss (eimf.training.compiled), else None.
    compiled = None

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: str = "fp32"):
        self.model = model
        self.optimizer = optimizer
        self.precision = check_precision(precision)

    def forward(self, *args):
        """The model's forward (the loss dict, or the interests) under ``precision``; its floating outputs are fp32
        either way, so what uses them outside (EIMF's head, the metrics) needs no autocast of its own."""
        with self.autocast(args[0].device.type):
            out = self._forward(*args)
        return as_fp32(out) if self.precision != "fp32" else out

    def _forward(self, *args):
        # Through forward(), so DDP/DeepSpeed wrappers see the computation.
        return self.model(*args)

    def autocast(self, device_type: str):
        if self.precision == "bf16":
            return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def attach_head(self, head: torch.nn.Module) -> None:
        """Train ``head`` with the model (same optimizer and settings); call before loading a checkpoint."""
        if self.head is not None:
            raise RuntimeError("a head is already attached")
        self.head = head
        self.optimizer.add_param_group({"params": list(head.parameters())})

    #: True when the parameters are partitioned across ranks (ZeRO-3): evaluation then uses a plain copy.
    partitioned = False

    #: True when every rank must take part in evaluation (the row-sharded table: lookups and searches are
    #: collective); otherwise the chief evaluates alone.
    collective_eval = False

    def full_params(self):
        return contextlib.nullcontext()

    def item_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The item table's rows of ``ids`` (any shape) -> ``[*ids.shape, d]``, outside the loss's graph."""
        with torch.no_grad():
            return self.model.item_emb(ids)

    def batch_item_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` inside the graph (their gradient trains the table); on the sharded path only ids of the
        step's last training forward are there."""
        return self.model.item_emb(ids)

    def broadcast(self, obj):
        return obj

    def snapshot(self) -> dict:
        """A copy of the weights (the best model so far)."""
        return _copy_state(self.model)

    def save_best(self, folder: Path, snap: Optional[dict], is_chief: bool) -> None:
        if snap is not None and is_chief:
            torch.save(snap, folder / ckpt.BEST_MODEL)

    def load_best(self, folder: Path) -> Optional[dict]:
        best = folder / ckpt.BEST_MODEL
        return torch.load(best, map_location="cpu") if best.exists() else None

    def save(self, folder: Path) -> None:
        torch.save(self.model.state_dict(), folder / ckpt.MODEL)
        torch.save(self.optimizer.state_dict(), folder / ckpt.OPTIMIZER)
        if self.head is not None:
            torch.save(self.head.state_dict(), folder / ckpt.HEAD)

    def load(self, folder: Path) -> None:
        self.model.load_state_dict(torch.load(folder / ckpt.MODEL, map_location="cpu"))
        if self.head is not None:
            self.head.load_state_dict(torch.load(folder / ckpt.HEAD, map_location="cpu"))
        self.optimizer.load_state_dict(torch.load(folder / ckpt.OPTIMIZER, map_location="cpu"))


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def as_fp32(out):
    """A forward's output (a tensor, or a dict of them) with its floating tensors in fp32."""
    if isinstance(out, dict):
        return {k: as_fp32(v) for k, v in out.items()}
    if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != torch.float32:
        return out.float()
    return out


def to_tensors(batch, device) -> tuple:
    hist, mask, target = batch
    return (
        torch.as_tensor(hist, device=device),
        torch.as_tensor(mask, device=device),
        torch.as_tensor(target, device=device),
    )


class Trainer:
    """Trains one backbone; evaluates on valid users every ``eval_every`` steps; keeps the best weights."""

    def __init__(
        self,
        cfg: Config,
        model: torch.nn.Module,
        loss_fn: torch.nn.Module,
        step_runner: StepRunner,
        batches: Iterator,
        valid_df,
        test_df,
        device: str | torch.device = "cpu",
        is_chief: bool = True,
    ):
        self.cfg = cfg
        self.model = model
        self.loss_fn = loss_fn
        self.runner = step_runner
        self.batches = batches
        self.valid_df = valid_df
        self.test_df = test_df
        self.device = torch.device(device)
        self.is_chief = is_chief
        self.best_state: Optional[dict] = None
        #: The EIMF head's weights at the best evaluation (they label that model's interests).
        self.best_head_state: Optional[dict] = None

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, split_df, max_users: Optional[int] = None, model=None) -> Dict[str, float]:
        """Metrics of ``model`` (default: the model being trained) on a split, by faiss full ranking."""
        if max_users is not None and len(split_df) > max_users:
            split_df = split_df.iloc[:max_users]
        e = self.cfg.eval
        collective = model is None and self.runner.collective_eval  # every rank, each searching its own rows
        model = self.model if model is None else model
        device = next(model.parameters()).device

        @torch.no_grad()
        def interest_fn(hist, mask):
            was_training = model.training
            model.eval()
            out = model.interests(torch.as_tensor(hist, device=device), torch.as_tensor(mask, device=device))
            model.train(was_training)
            return out.float().cpu().numpy()

        if collective:
            item_table, index = None, self.runner.item_index(self.cfg.retrieval)
        else:
            item_table = model.item_embeddings().detach().float().cpu().numpy()
            index = ItemIndex.from_config(item_table, self.cfg.retrieval)
        return evaluate(interest_fn, item_table, split_df, topk=tuple(e.topk), batch_size=e.batch_size,
                        maxlen=self.cfg.model.maxlen, exclude_history=e.exclude_history, index=index)

    # -- training -----------------------------------------------------------------------------
    def train_step(self, batch) -> Dict[str, float]:
        """One step (:meth:`step`); with ``train.compile``, a step that fails while building a compiled graph (its
        forward or its backward) falls back to eager and runs again, with a warning (eimf.training.compiled)."""
        compiled = self.runner.compiled
        if compiled is None or compiled.fell_back:
            return self.step(batch)
        graphs, t0 = compiled.graphs, time.perf_counter()
        try:
            out = self.step(batch)
        except Exception as e:  # noqa: BLE001 - the compiler's failure, not the step's (checked just below)
            if compiled.verified and compiled.graphs == graphs:
                raise  # no graph was new in this step: not the compiler's doing
            compiled.fall_back(f"the first step with a new compiled graph failed: {e!r}")
            return self.step(batch)
        compiled.record_step(time.perf_counter() - t0, built=compiled.graphs != graphs)
        return out

    def step(self, batch) -> Dict[str, float]:
        hist, mask, target = to_tensors(batch[:3], self.device)
        out = self.runner.forward(hist, mask, target, self.loss_fn)
        self.runner.backward_and_step(out["loss"])
        return {k: float(v.detach()) for k, v in out.items()}

    def examples_in(self, batch) -> int:
        """The batch's training examples of the recommender (what examples/s counts)."""
        return len(batch[2])

    def fit(
        self,
        state: Optional[LoopState] = None,
        report: Optional[Callable[[Dict[str, float], LoopState, bool], None]] = None,
    ) -> LoopState:
        """Run until ``max_steps`` or early stopping. ``report(metrics, state, is_eval)`` is called at
        every log line and every evaluation (where the runner checkpoints)."""
        cfg = self.cfg
        state = state or LoopState()
        metric_name = cfg.eval.early_stop_metric
        self.model.train()
        window = {"loss": 0.0, "n": 0, "examples": 0, "t0": time.perf_counter(), "data": 0.0}
        bar = progress(cfg.train.max_steps, "train", "step", initial=state.step, enabled=self.is_chief)
        try:
            return self._fit_loop(state, report, metric_name, window, bar)
        finally:
            bar.close()

    def _fit_loop(self, state: LoopState, report, metric_name: str, window: dict, bar) -> LoopState:
        cfg = self.cfg
        # A resumed run that had already stopped early (or finished) does no more steps.
        while state.step < cfg.train.max_steps and not state.stopped_early:
            t_data = time.perf_counter()
            batch = next(self.batches)
            t_model = time.perf_counter()
            losses = self.train_step(batch)
            t_end = time.perf_counter()
            n = self.examples_in(batch)
            state.step += 1
            bar.update(1)
            state.examples += n
            state.data_seconds += t_model - t_data
            state.train_seconds += t_end - t_data
            window["loss"] += losses["loss"]
            for k in losses:
                if k.startswith("loss/"):  # EIMF's parts of the loss
                    window[k] = window.get(k, 0.0) + losses[k]
            window["n"] += 1
            window["examples"] += n
            window["data"] += t_model - t_data
            if not math.isfinite(losses["loss"]):
                raise FloatingPointError(f"loss is {losses['loss']} at step {state.step}")

            if state.step % cfg.train.log_every == 0 and window["n"]:
                elapsed = time.perf_counter() - window["t0"]
                metrics = {
                    "train/loss": window["loss"] / window["n"],
                    "train/examples_per_s": window["examples"] / max(elapsed, 1e-9),
                    "train/input_share": window["data"] / max(elapsed, 1e-9),
                }
                metrics.update({f"train/{k}": v / window["n"] for k, v in window.items() if k.startswith("loss/")})
                if self.is_chief:
                    log.info(
                        "step %d  loss %.4f  %.0f ex/s  input %.1f%% of step time",
                        state.step, metrics["train/loss"], metrics["train/examples_per_s"],
                        100 * metrics["train/input_share"],
                    )
                bar.set_postfix_str(f"loss {metrics['train/loss']:.3f}, best {metric_name} "
                                    f"{max(state.best_metric, 0.0):.4f}")
                if report:
                    report(metrics, state, False)
                window = {"loss": 0.0, "n": 0, "examples": 0, "t0": time.perf_counter(), "data": 0.0}

            if state.step % cfg.train.eval_every == 0:
                if self._evaluate_and_maybe_stop(state, metric_name, report):
                    state.stopped_early = True
                    break
        return state

    def _evaluate_and_maybe_stop(self, state: LoopState, metric_name: str, report) -> bool:
        # Every rank enters full_params (ZeRO-3 gathers parameters collectively); the chief evaluates and
        # every rank gets its verdict.
        snapshot, eval_model = None, None  # None: the model being trained
        if self.runner.partitioned:
            # ZeRO-3's module hooks run collectives that every rank must issue in step: a forward on the chief
            # alone desynchronises them (training hangs a few steps later). Evaluate a plain copy instead.
            with self.runner.full_params():
                snapshot = _copy_state(self.model) if self.is_chief else None
            eval_model = self._plain_model(snapshot) if self.is_chief else None
        collective = self.runner.collective_eval
        valid = (self.evaluate(self.valid_df, self.cfg.eval.max_valid_users, eval_model)
                 if self.is_chief or collective else None)
        valid = self.runner.broadcast(valid)
        value = valid[metric_name]
        improved = value > state.best_metric
        if improved and (self.is_chief or collective):
            self.best_state = snapshot if snapshot is not None else self.runner.snapshot()
            if self.runner.head is not None:
                self.best_head_state = _copy_state(self.runner.head)
        if improved:
            state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
        else:
            state.bad_evals += 1
        entry = {"step": state.step, **{f"valid/{k}": v for k, v in valid.items()}}
        state.history.append(entry)
        if self.is_chief:
            log.info(
                "eval step %d  %s %.4f  (best %.4f at step %d)%s",
                state.step, metric_name, value, state.best_metric, state.best_step,
                "" if improved else f"  no gain x{state.bad_evals}",
            )
        if report:
            report({k: v for k, v in entry.items() if k != "step"}, state, True)
        return state.bad_evals >= self.cfg.train.patience

    def _plain_model(self, state: dict) -> torch.nn.Module:
        model = build_model(self.cfg.model, self.model.n_items)
        model.load_state_dict(state)
        return model.eval()

    def best_model(self) -> torch.nn.Module:
        """A plain single-process copy of the model with the best evaluation's weights."""
        if self.runner.collective_eval:
            raise RuntimeError("the sharded table has no single-process copy: export it (serving.folder)")
        if self.best_state is None:  # no evaluation ran: the current weights (a collective under ZeRO-3)
            with self.runner.full_params():
                self.best_state = _copy_state(self.model)
        return self._plain_model(self.best_state)

    def final_metrics(self) -> Dict[str, float]:
        """Valid and (``eval.score_test``) test metrics of the best weights, on all users (chief only; others get
        {}). Named ``best_valid/*`` so they do not mix with the ``valid/*`` curve logged during training."""
        if self.runner.collective_eval:
            # The best weights go back into the live (sharded) model, and every rank evaluates its rows.
            if self.best_state is None:  # no evaluation ran: the current weights are the model to export
                self.best_state = self.runner.snapshot()
            else:
                self.runner.restore(self.best_state)
            out = {f"best_valid/{k}": v for k, v in self.evaluate(self.valid_df).items()}
            if self.cfg.eval.score_test:
                out.update({f"test/{k}": v for k, v in self.evaluate(self.test_df).items()})
            return out if self.is_chief else {}
        if self.best_state is None:
            self.best_model()  # every rank gathers
        if not self.is_chief:
            return {}
        model = self.best_model()
        out = {f"best_valid/{k}": v for k, v in self.evaluate(self.valid_df, model=model).items()}
        if self.cfg.eval.score_test:
            out.update({f"test/{k}": v for k, v in self.evaluate(self.test_df, model=model).items()})
        return out


def _copy_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def save_training_state(folder: Path, runner: StepRunner, state: LoopState, best_state, is_chief=True,
                        best_head_state: Optional[dict] = None) -> None:
    """Weights and optimizer (per rank under DeepSpeed), plus, from the chief, loop state, best weights and the
    EIMF head of the best evaluation (so a resumed run that never beats it still exports the matching head)."""
    folder.mkdir(parents=True, exist_ok=True)
    runner.save(folder)
    runner.save_best(folder, best_state, is_chief)
    if is_chief:
        if best_head_state is not None:
            torch.save(best_head_state, folder / ckpt.BEST_HEAD)
        (folder / ckpt.STATE).write_text(json.dumps(asdict(state)))


def load_best_head(folder: Path) -> Optional[dict]:
    """The best evaluation's EIMF head from a checkpoint, or None (no EIMF, or no evaluation yet)."""
    f = Path(folder) / ckpt.BEST_HEAD
    return torch.load(f, map_location="cpu") if f.exists() else None


def load_training_state(folder: Path, runner: StepRunner):
    runner.load(folder)
    best_state = runner.load_best(folder)
    state = LoopState.from_json((folder / ckpt.STATE).read_text())
    return state, best_state
