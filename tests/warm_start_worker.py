"""Worker bodies for tests/test_warm_start.py, run in spawned gloo processes (importable by multiprocessing)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def fill_sharded(rank: int, world: int, port: int, out: str) -> None:
    """Build the row-sharded table for the plan's catalogue and apply the warm start: this worker's rows, what it
    fetched, and whether the extractor is the source's."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from eimf.training.sharded import ShardedItemModel, ShardedStepRunner, sparse_optimizer_params
    from eimf.training.warm_start import apply_warm_start

    saved = torch.load(f"{out}/plan.pt", weights_only=False)
    plan = saved["plan"]
    runner = ShardedStepRunner(ShardedItemModel(saved["cfg"], saved["n_items"]), 1e-3, 0.0,
                               sparse_optimizer_params("sgd", 0.1, False), torch.device("cpu"), init_seed=1)
    rows, offset = runner.model.local_rows()
    init = rows.detach().clone()
    blocks = {id(b) for _, _, b in plan.old_blocks}
    fetched = []

    def fetch(value):
        if id(value) in blocks:
            fetched.append(id(value))
        return value

    written = apply_warm_start(runner.model, plan, fetch=fetch)
    dense = runner.model.backbone.state_dict()
    dense_ok = set(dense) == set(plan.dense) and all(torch.equal(dense[k], plan.dense[k]) for k in dense)
    rows, _ = runner.model.local_rows()
    torch.save({"rows": rows.detach().clone().numpy(), "offset": offset, "init": init.numpy(), "written": written,
                "blocks_fetched": len(fetched), "dense_ok": dense_ok}, f"{out}/rows.{rank}.pt")
    dist.destroy_process_group()
