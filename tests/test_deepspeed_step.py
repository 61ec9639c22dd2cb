"""The DeepSpeed step runner on one process (gloo group of 1): every ZeRO stage and precision trains, ZeRO-3
gathers the full item table for evaluation, and a checkpoint restores the exact weights."""
import pytest
import torch

from eimf.config import load_config


@pytest.fixture(scope="module")
def gloo_group(free_port):
    import os

    import torch.distributed as dist

    # What a launcher (Ray Train, torchrun) sets for each rank; DeepSpeed checks it.
    for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _runner(stage: int, precision: str, n_items: int = 50):
    from eimf.training.deepspeed_step import DeepSpeedStepRunner, deepspeed_config
    from eimf.training.loop import seed_everything
    from eimf.training.runner import build_components

    cfg = load_config(None, ["model.dim=16", "model.maxlen=8", "train.batch_size=8", "negatives.num_negatives=10",
                             "train.lr=0.01"])
    seed_everything(0)
    model, loss_fn, plain, _ = build_components(cfg, n_items)
    return DeepSpeedStepRunner(model, plain.optimizer, deepspeed_config(8, stage, precision)), loss_fn, cfg


def _batch(n_items=50):
    g = torch.Generator().manual_seed(1)
    hist = torch.randint(1, n_items + 1, (8, 8), generator=g)
    return hist, torch.ones(8, 8), torch.randint(1, n_items + 1, (8,), generator=g)


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")])
def test_every_stage_and_precision_trains(gloo_group, stage, precision):
    runner, loss_fn, _ = _runner(stage, precision)
    losses = []
    for _ in range(30):
        loss_fn.generator = torch.Generator().manual_seed(0)  # same negatives: one fixed objective
        out = runner.forward(*_batch(), loss_fn)
        runner.backward_and_step(out["loss"])
        losses.append(float(out["loss"].detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])  # one fixed batch: the loss must fall
    with runner.full_params():
        table = runner.model.item_embeddings()
        assert table.shape == (51, 16)  # under ZeRO-3 the gathered, full table


def test_zero3_partitions_the_item_table_outside_full_params(gloo_group):
    runner, _, _ = _runner(3, "fp32")
    # Outside the gather, ZeRO-3 parameters are placeholders; their data lives in the partition.
    assert all(p.numel() == 0 for p in runner.model.parameters())
    with runner.full_params():
        assert all(p.numel() > 0 for p in runner.model.parameters())


def test_checkpoint_restores_weights(gloo_group, tmp_path):
    runner, loss_fn, _ = _runner(2, "fp32")
    for _ in range(3):
        runner.backward_and_step(runner.forward(*_batch(), loss_fn)["loss"])
    runner.save(tmp_path)
    other, _, _ = _runner(2, "fp32")
    other.load(tmp_path)
    for (name, a), b in zip(runner.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError):
        _runner(2, "fp32")[0].load(tmp_path / "missing")


def test_config_rejects_bad_stage_and_precision():
    from eimf.training.deepspeed_step import deepspeed_config

    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(8, 4, "fp32")
    with pytest.raises(ValueError, match="fp16"):
        deepspeed_config(8, 0, "fp16")
