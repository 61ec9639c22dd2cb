"""The DeepSpeed step runner on one process (gloo group of 1): every ZeRO stage and precision trains, ZeRO-3
gathers the full item table for evaluation, and a checkpoint restores the exact weights."""
import pytest
import torch

from eimf.config import load_config


def _runner(stage: int, precision: str, n_items: int = 50):
    from eimf.training.deepspeed_step import DeepSpeedStepRunner, deepspeed_config
    from eimf.training.loop import seed_everything
    from eimf.training.components import build_components

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


# ------------------------------------------------------------------------------------------- EIMF head
def _semantic_batch(seed=2, rows=4, M=3, D=12):
    g = torch.Generator().manual_seed(seed)
    sem = torch.nn.functional.normalize(torch.randn(rows, M, D, generator=g), dim=-1)
    return torch.arange(rows), sem, torch.ones(rows, M, dtype=torch.bool)


def _eimf_step(runner, loss_fn, batch_seed=1, typical=True):
    """What Trainer._eimf_step does: rec loss through the engine, auxiliary loss through the head (not at all for
    a batch without typical rows, as on a worker whose shard has no typical user)."""
    hist, mask, target = _batch()
    out = runner.forward(hist, mask, target, loss_fn, True)
    if not typical:
        runner.backward_and_step(out["loss"])
        return 0.0
    rows, sem, sem_mask = _semantic_batch(batch_seed)
    aux = runner.head(out["interests"][rows], sem, sem_mask)
    runner.backward_and_step(out["loss"] + aux["loss"])
    return float(aux["semantic_prediction"].detach())


def _head(dim=16):
    from eimf.modules.alignment import EIMFHead

    torch.manual_seed(3)
    return EIMFHead(dim, semantic_dim=12, predictor_hidden=8, lambda_sp=1.0, lambda_ma=0.1)


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")])
def test_eimf_head_trains_beside_every_stage(gloo_group, stage, precision):
    runner, loss_fn, _ = _runner(stage, precision)
    runner.attach_head(_head())
    before = [p.detach().clone() for p in runner.head.parameters()]
    sp = []
    for _ in range(25):
        loss_fn.generator = torch.Generator().manual_seed(0)
        sp.append(_eimf_step(runner, loss_fn))
    assert all(not torch.equal(a, p) for a, p in zip(before, runner.head.parameters()))  # its optimizer steps
    assert sum(sp[-5:]) < sum(sp[:5])  # g learns the fixed targets
    with pytest.raises(RuntimeError, match="already attached"):
        runner.attach_head(_head())


def test_eimf_head_and_its_optimizer_are_checkpointed(gloo_group, tmp_path):
    runner, loss_fn, _ = _runner(2, "fp32")
    runner.attach_head(_head())
    for _ in range(3):
        _eimf_step(runner, loss_fn)
    runner.save(tmp_path)
    other, _, _ = _runner(2, "fp32")
    other.attach_head(_head())
    other.load(tmp_path)
    for (name, a), b in zip(runner.head.state_dict().items(), other.head.state_dict().values()):
        assert torch.equal(a, b), name
    assert other.head_optimizer.state_dict()["state"][0]["step"] == 3
    # the next step is the same on both: weights, moments and step count were all restored
    loss_fn.generator = torch.Generator().manual_seed(5)
    _eimf_step(runner, loss_fn)
    loss_fn.generator = torch.Generator().manual_seed(5)
    _eimf_step(other, loss_fn)
    for a, b in zip(runner.head.parameters(), other.head.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    no_head, _, _ = _runner(2, "fp32")
    no_head.save(tmp_path / "plain")
    fresh, _, _ = _runner(2, "fp32")
    fresh.attach_head(_head())
    with pytest.raises(FileNotFoundError, match="no EIMF head"):
        fresh.load(tmp_path / "plain")


def _two_rank_worker(rank, port, out_dir):
    import os

    import torch.distributed as dist

    os.environ.update({"LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    runner, loss_fn, _ = _runner(2, "fp32")
    torch.manual_seed(100 + rank)  # each rank's own head init: attach_head must make them equal
    from eimf.modules.alignment import EIMFHead

    runner.attach_head(EIMFHead(16, semantic_dim=12, predictor_hidden=8, lambda_sp=1.0, lambda_ma=0.1))
    for step in range(5):
        loss_fn.generator = torch.Generator().manual_seed(rank * 10 + step)
        # different data per rank; from step 3 rank 1's batches have no typical row (the head is not in its
        # graph): it must still join the gradient average, or rank 0 waits forever
        _eimf_step(runner, loss_fn, batch_seed=rank * 10 + step, typical=rank == 0 or step < 3)
    torch.save({k: v.detach().clone() for k, v in runner.head.state_dict().items()}, f"{out_dir}/head{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_eimf_head_replicas_stay_identical_across_two_ranks(tmp_path, free_port):
    """Two gloo ranks under ZeRO-2 with different batches and different head inits, rank 1 without typical rows
    in its last steps: after 5 steps the two heads are equal (rank 0's init broadcast, gradients averaged) and
    moved from that init."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    h0, h1 = torch.load(tmp_path / "head0.pt"), torch.load(tmp_path / "head1.pt")
    for k in h0:
        assert torch.equal(h0[k], h1[k]), k
    torch.manual_seed(100)
    from eimf.modules.alignment import EIMFHead

    init = EIMFHead(16, semantic_dim=12, predictor_hidden=8).state_dict()
    assert not torch.equal(init["projection.weight"], h0["projection.weight"])
