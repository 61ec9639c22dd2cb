"""train.strategy=torch over several workers: two real gloo ranks, one process each, against one process."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from eimf.training.loop import StepRunner
from eimf.training.hardware import adam

STEPS = 3


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Flatten(), torch.nn.Linear(24, 1))


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 20, (8, 3), generator=g), torch.randn(8, 1, generator=g)


def _loss(model, x, y, head=None):
    loss = torch.nn.functional.mse_loss(model(x), y)
    if head is not None:  # a term of its own, as EIMF's: the model's gradient stays the plain loss's
        loss = loss + head(torch.ones(1, 1)).pow(2).mean()
    return loss


def _replica(rank: int, port: int, out_dir: str) -> None:
    from eimf.training.data_parallel import DataParallelStepRunner

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = _model(seed=rank)  # each rank starts elsewhere: the runner must make them one
        runner = DataParallelStepRunner(StepRunner(model, adam(model.parameters(), lr=0.05)))
        torch.manual_seed(rank)
        head = torch.nn.Linear(1, 1)
        runner.attach_head(head)
        for step in range(STEPS):
            x, y = _batch(step)
            half = slice(4 * rank, 4 * rank + 4)  # each rank its half of the global batch
            # the head in rank 0's graph only: rank 1 must still join the average, with zeros
            runner.backward_and_step(_loss(model, x[half], y[half], head if rank == 0 else None))
        runner.save(Path(out_dir) / f"ckpt{rank}")
        dist.barrier()
        runner.load(Path(out_dir) / "ckpt0")  # a resume: every rank reads the chief's copy, then trains on
        x, y = _batch(STEPS)
        half = slice(4 * rank, 4 * rank + 4)
        runner.backward_and_step(_loss(model, x[half], y[half]))
        torch.save({"model": model.state_dict(), "head": head.state_dict()}, f"{out_dir}/rank{rank}.pt")
        assert runner.broadcast({"rank": rank}) == {"rank": 0}
    finally:
        dist.destroy_process_group()


def test_replicas_take_the_one_process_step_on_the_global_batch(tmp_path, free_port):
    for r in (0, 1):
        (tmp_path / f"ckpt{r}").mkdir()
    torch.multiprocessing.spawn(_replica, args=(free_port(), str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for k, v in got[0]["model"].items():
        assert torch.equal(v, got[1]["model"][k]), k  # identical replicas, bit for bit
    assert all(torch.equal(v, got[1]["head"][k]) for k, v in got[0]["head"].items())
    # One process, rank 0's start, the whole batch: the mean of the halves' gradients is the whole batch's gradient.
    # The head's gradient is rank 0's over 2 (rank 1 adds zeros), so it is left out of this comparison.
    model = _model(seed=0)
    runner = StepRunner(model, adam(model.parameters(), lr=0.05))
    for step in range(STEPS + 1):
        runner.backward_and_step(_loss(model, *_batch(step)))
    for k, v in model.state_dict().items():
        assert torch.allclose(v, got[0]["model"][k], atol=1e-6), k
    assert sorted(p.name for p in (tmp_path / "ckpt0").iterdir())  # the chief writes the checkpoint
    assert not list((tmp_path / "ckpt1").iterdir())  # the other replica writes nothing: it holds the same
