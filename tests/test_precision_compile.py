"""train.precision=bf16 on every strategy (plain torch, DeepSpeed, the sharded table), train.compile with its eager
fallback, and the fused Adam: on a tiny synthetic problem, with the real torch, DeepSpeed and TorchRec (one gloo
process)."""
from __future__ import annotations

import warnings

import pytest
import torch

from eimf.config import ConfigError, load_config

N_ITEMS = 50
TINY = ["model.dim=16", "model.maxlen=8", "train.batch_size=8", "negatives.num_negatives=10", "train.lr=0.01"]


def _cfg(*extra):
    return load_config(None, [*TINY, *extra])


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, N_ITEMS + 1, (8, 8), generator=g)
    lengths = torch.randint(3, 9, (8,), generator=g)
    mask = torch.arange(8)[None, :] < lengths[:, None]
    return hist * mask, mask, torch.randint(1, N_ITEMS + 1, (8,), generator=g)


def _train(runner, loss_fn, steps=30):
    """``steps`` steps on one fixed batch with fixed negatives (one fixed objective: its loss must fall)."""
    losses = []
    for _ in range(steps):
        loss_fn.generator = torch.Generator().manual_seed(0)
        out = runner.forward(*_batch(), loss_fn)
        runner.backward_and_step(out["loss"])
        losses.append(float(out["loss"].detach()))
    return losses


def _assert_trained_in_fp32(losses, model, optimizer):
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for state in optimizer.state.values():
        assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


# ------------------------------------------------------------------------------------------- config
def test_precision_and_compile_are_checked_naming_the_field():
    from eimf.config.train import TrainConfig

    assert (_cfg().train.precision, _cfg().train.compile) == ("auto", False)
    assert _cfg("train.precision=bf16", "train.compile=true").train.compile is True
    with pytest.raises(ConfigError, match="train.precision"):
        _cfg("train.precision=fp16")
    with pytest.raises(ConfigError, match="train.precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="train.compile"):
        _cfg("train.compile=sometimes")


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


def test_auto_precision_is_bf16_where_the_cpu_has_it_natively_and_explicit_settings_stay(monkeypatch):
    from eimf.training import hardware
    from eimf.training.components import build_components

    # The answer from the kernel's own list of CPU features, not from torch's
    native = bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    assert hardware.native_bf16(torch.device("cpu")) is native
    assert hardware.resolve_precision("auto") == ("bf16" if native else "fp32")
    assert build_components(_cfg(), N_ITEMS)[2].precision == ("bf16" if native else "fp32")
    for setting in ("fp32", "bf16"):
        assert hardware.resolve_precision(setting) == setting
        assert build_components(_cfg(f"train.precision={setting}"), N_ITEMS)[2].precision == setting
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    assert hardware.resolve_precision("auto") == "fp32"
    assert build_components(_cfg(), N_ITEMS)[2].precision == "fp32"


def _agree(rank: int, port: int, natives: list, out_dir: str) -> None:
    import torch.distributed as dist

    from eimf.training import hardware

    hardware.native_bf16 = lambda device: natives[rank]  # this rank's device, as told
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with open(f"{out_dir}/{rank}", "w") as f:
            f.write(hardware.agreed_precision("auto", torch.device("cpu")))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("natives, agreed", [([True, True], "bf16"), ([True, False], "fp32")])
def test_auto_precision_is_bf16_only_if_every_worker_has_it(natives, agreed, tmp_path, free_port):
    """Two gloo ranks, one process each: a worker without native bf16 keeps the whole group in fp32."""
    torch.multiprocessing.spawn(_agree, args=(free_port(), natives, str(tmp_path)), nprocs=2)
    assert [(tmp_path / str(r)).read_text() for r in (0, 1)] == [agreed, agreed]


def test_the_old_deepspeed_precision_loads_as_train_precision_and_a_disagreement_stops(tmp_path):
    with pytest.warns(FutureWarning, match="train.precision"):
        assert _cfg("train.deepspeed.precision=bf16").train.precision == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert _cfg("train.precision=bf16", "train.deepspeed.precision=bf16").train.precision == "bf16"
        with pytest.raises(ConfigError, match="train.precision=fp32 and its old name train.deepspeed.precision=bf16"):
            _cfg("train.precision=fp32", "train.deepspeed.precision=bf16")
        f = tmp_path / "c.yaml"
        f.write_text("train:\n  precision: fp32\n  deepspeed:\n    precision: bf16\n")
        with pytest.raises(ConfigError, match="disagree"):
            load_config(f)
        f.write_text("train:\n  deepspeed:\n    zero_stage: 2\n    precision: bf16\n")
        cfg = load_config(f)
    assert (cfg.train.precision, cfg.train.deepspeed.zero_stage) == ("bf16", 2)


def test_deepspeed_config_takes_train_precision_as_its_autocast():
    from eimf.training.deepspeed_step import deepspeed_config

    ds = deepspeed_config(8, 2, "bf16")
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not ds["bf16"]["enabled"]
    assert not deepspeed_config(8, 2, "fp32")["torch_autocast"]["enabled"]
    with pytest.raises(ValueError, match="train.precision"):
        deepspeed_config(8, 0, "fp16")


# ------------------------------------------------------------------------------------------- bf16, plain torch
@pytest.mark.parametrize("backbone", ["comirec_sa", "comirec_dr", "mind", "remi"])
def test_bf16_trains_with_fp32_weights_on_plain_torch(backbone):
    from eimf.training.components import build_components
    from eimf.training.loop import seed_everything

    extra = ["model.reg_lambda=10", "model.beta=0.5"] if backbone == "remi" else []
    losses = {}
    for precision in ("fp32", "bf16"):
        seed_everything(0)
        model, loss_fn, runner, _ = build_components(_cfg(f"model.backbone={backbone}",
                                                          f"train.precision={precision}", *extra), N_ITEMS)
        losses[precision] = _train(runner, loss_fn)
        _assert_trained_in_fp32(losses[precision], model, runner.optimizer)
        interests = runner.forward(*_batch()[:2])
        assert interests.dtype == torch.float32  # what the EIMF head and the metrics read
    # autocast did run (the first losses differ) and stays near fp32
    assert losses["bf16"][0] != losses["fp32"][0]
    first = (losses["bf16"][0], losses["fp32"][0])
    assert abs(first[0] - first[1]) < 0.02 * first[1], first


def test_the_sampled_softmax_is_fp32_under_a_bf16_autocast():
    from eimf.models.negatives import Negatives, build_loss

    cfg = _cfg()
    loss_fn = build_loss(cfg.negatives, N_ITEMS, 8, cfg.model)
    table = torch.nn.Embedding(N_ITEMS + 1, 16)
    g = torch.Generator().manual_seed(3)
    user = torch.randn(8, 16, generator=g) * 3
    target = torch.randint(1, N_ITEMS + 1, (8,), generator=g)
    negs = Negatives(torch.randint(1, N_ITEMS + 1, (10,), generator=g), 10.0)
    plain = loss_fn(user, target, table, negs)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        auto = loss_fn(user, target, table, negs)
        assert (user @ table.weight.t()).dtype == torch.bfloat16  # the autocast is on around the loss
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)


# ------------------------------------------------------------------------------------------- bf16, DeepSpeed and sharded
@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_trains_with_fp32_weights_under_deepspeed(gloo_group, stage):
    from eimf.training.components import build_components, deepspeed_runner
    from eimf.training.loop import seed_everything

    cfg = _cfg("train.precision=bf16", f"train.deepspeed.zero_stage={stage}")
    seed_everything(0)
    model, loss_fn, plain, _ = build_components(cfg, N_ITEMS)
    runner = deepspeed_runner(cfg, plain, 8)
    assert runner.engine.torch_autocast_enabled() and runner.precision == "bf16"
    losses = _train(runner, loss_fn)
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    assert all(p.dtype == torch.float32 for p in runner.model.parameters())
    # the optimizer's own copies (ZeRO's flat partitions under stage 2) and its moments
    inner = runner.optimizer.optimizer if hasattr(runner.optimizer, "optimizer") else runner.optimizer
    assert all(p.dtype == torch.float32 for group in inner.param_groups for p in group["params"])
    for state in inner.state.values():
        assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def test_bf16_trains_on_the_sharded_table(gloo_group):
    from eimf.training.components import build_sharded_components
    from eimf.training.loop import seed_everything

    cfg = _cfg("train.precision=bf16", "train.strategy=sharded", "train.sharded.optimizer=sgd",
               "train.sharded.lr=0.5")
    seed_everything(0)
    model, loss_fn, runner, _ = build_sharded_components(cfg, N_ITEMS, 8, torch.device("cpu"))
    assert runner.precision == "bf16"
    rows_before = model.local_rows()[0].detach().clone()
    losses = _train(runner, loss_fn)
    _assert_trained_in_fp32(losses, model.backbone, runner.optimizer)
    rows, _ = model.local_rows()
    assert rows.dtype == torch.float32 and not torch.equal(rows, rows_before)  # the table trained, in fp32


# ------------------------------------------------------------------------------------------- compile
def _trainer(cfg):
    from eimf.training.components import build_components
    from eimf.training.loop import Trainer, seed_everything

    seed_everything(0)
    model, loss_fn, runner, _ = build_components(cfg, N_ITEMS)
    loss_fn.generator = torch.Generator().manual_seed(5)
    return Trainer(cfg, model, loss_fn, runner, iter(()), None, None)


def _steps(trainer, n):
    return [trainer.train_step(tuple(t.numpy() for t in _batch(seed=s)))["loss"] for s in range(n)]


@pytest.mark.e2e  # inductor builds 4 graphs (2 forward, 2 backward): about a minute on 2 busy cores
def test_compiled_steps_match_eager_steps():
    eager = _steps(_trainer(_cfg("model.backbone=remi", "model.reg_lambda=10")), 4)
    trainer = _trainer(_cfg("model.backbone=remi", "model.reg_lambda=10", "train.compile=true"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        compiled = _steps(trainer, 4)
    c = trainer.runner.compiled
    assert not c.fell_back and c.graphs == 2 and c.compile_seconds > 0
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


def test_compile_counts_graphs_and_keeps_evaluation_and_new_shapes_eager(monkeypatch):
    from eimf.training import compiled as compiled_mod

    calls = []

    def fake_compile(fn, **kwargs):  # a "compiled" function that records its calls and runs the eager one
        assert kwargs["dynamic"] is False

        def run(*args):
            calls.append(fn)
            return fn(*args)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(compiled_mod, "MAX_SHAPES", 1)
    trainer = _trainer(_cfg("train.compile=true"))
    c = trainer.runner.compiled
    eager = _steps(_trainer(_cfg()), 3)
    assert _steps(trainer, 3) == pytest.approx(eager, rel=1e-6)
    assert c.graphs == 2 and len(calls) == 6 and c.verified and c.compile_seconds > 0  # extractor + loss, 3 steps
    seconds = c.compile_seconds
    hist, mask, target = _batch()
    with torch.no_grad():
        trainer.runner.forward(hist, mask)  # evaluation: eager
    trainer.runner.forward(hist[:3], mask[:3])  # a new shape past MAX_SHAPES: eager
    assert len(calls) == 6 and c.compile_seconds == seconds
    assert set(c.metrics()) == {"compile_seconds", "compile_fell_back", "compile_graphs"}


def test_an_error_in_torch_compile_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    eager = _steps(_trainer(_cfg()), 3)
    trainer = _trainer(_cfg("train.compile=true"))
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        losses = _steps(trainer, 3)
    assert trainer.runner.compiled.fell_back and losses == pytest.approx(eager, rel=1e-6)
    assert "forward" not in vars(trainer.model.extractor)  # the class's own forward again


def test_a_compiled_call_that_fails_falls_back_to_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda *a: 1 / 0))
    eager = _steps(_trainer(_cfg()), 2)
    trainer = _trainer(_cfg("train.compile=true"))
    with pytest.warns(RuntimeWarning, match="ZeroDivisionError"):
        losses = _steps(trainer, 2)
    assert trainer.runner.compiled.fell_back and losses == pytest.approx(eager, rel=1e-6)


def test_a_compiled_backward_that_fails_reruns_the_step_eager(monkeypatch):
    class FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("backward kernel failed")

    def compile_with_broken_backward(fn, **kwargs):
        def run(*args):
            out = fn(*args)
            return FailingBackward.apply(out) if isinstance(out, torch.Tensor) else out
        return run

    monkeypatch.setattr(torch, "compile", compile_with_broken_backward)
    eager_trainer = _trainer(_cfg())
    trainer = _trainer(_cfg("train.compile=true"))
    with pytest.warns(RuntimeWarning, match="backward kernel failed"):
        trainer.train_step(tuple(t.numpy() for t in _batch()))
    assert trainer.runner.compiled.fell_back
    # the failed step left nothing behind: the weights are those of one eager step from the same start, with the
    # negatives of the rerun (the second draw)
    eager_trainer.loss_fn.sample()
    eager_trainer.train_step(tuple(t.numpy() for t in _batch()))
    for a, b in zip(trainer.model.parameters(), eager_trainer.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------------------------------- fused Adam
def test_fused_adam_matches_plain_adam():
    from eimf.models import build_model
    from eimf.models.negatives import build_loss
    from eimf.training.hardware import adam

    cfg = _cfg()
    torch.manual_seed(0)
    a = build_model(cfg.model, N_ITEMS)
    b = build_model(cfg.model, N_ITEMS)
    b.load_state_dict(a.state_dict())
    fused = adam(a.parameters(), lr=0.01, weight_decay=1e-4)
    plain = torch.optim.Adam(b.parameters(), lr=0.01, weight_decay=1e-4, foreach=False, fused=False)
    assert fused.defaults["fused"] is True  # torch 2.13 has the fused kernel on CPU
    loss_fn = build_loss(cfg.negatives, N_ITEMS, 8, cfg.model)
    for step in range(5):
        # the same gradients for both (from a): w2's bias, which the softmax over positions ignores, gets a gradient
        # of rounding noise that Adam scales up to full steps, so gradients of two models would part ways there
        loss_fn.generator = torch.Generator().manual_seed(step)
        fused.zero_grad()
        plain.zero_grad()
        a(*_batch(seed=step), loss_fn)["loss"].backward()
        for p, q in zip(a.parameters(), b.parameters()):
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    assert not torch.equal(a.item_emb.weight, build_model(cfg.model, N_ITEMS).item_emb.weight)
