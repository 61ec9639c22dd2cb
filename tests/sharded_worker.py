"""Worker bodies for tests/test_sharded.py, run in spawned gloo processes (importable by multiprocessing)."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from eimf.config import Config


def init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def tiny_cfg(backbone: str = "comirec_sa") -> Config:
    cfg = Config()
    cfg.model.backbone, cfg.model.dim, cfg.model.num_interests, cfg.model.maxlen = backbone, 8, 2, 6
    cfg.negatives.num_negatives = 12
    return cfg


def batch(rank: int, n_items: int, b: int = 5, t: int = 6):
    g = torch.Generator().manual_seed(100 + rank)
    hist = torch.randint(1, n_items + 1, (b, t), generator=g)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    hist = hist * mask
    target = torch.randint(1, n_items + 1, (b,), generator=g)
    return hist, mask, target


def parity(rank: int, world: int, port: int, backbone: str, n_items: int, out: str) -> None:
    """One step of the sharded runner against a dense reference built from the same weights and batches."""
    init(rank, world, port)
    from eimf.models import build_model
    from eimf.models.negatives import Negatives, build_loss
    from eimf.training.sharded import ShardedItemModel, ShardedStepRunner, sparse_optimizer_params

    cfg = tiny_cfg(backbone)
    torch.manual_seed(0)
    dense = build_model(cfg.model, n_items)
    loss_fn = build_loss(cfg.negatives, n_items, 5, cfg.model)
    runner = ShardedStepRunner(ShardedItemModel(cfg.model, n_items), 1e-3, 0.0,
                               sparse_optimizer_params("sgd", 0.5, False), torch.device("cpu"), init_seed=1)
    model = runner.model
    table = dense.item_emb.weight.detach().clone()
    model.load_rows(table)
    model.backbone.load_state_dict({k: v for k, v in dense.state_dict().items() if k != "item_emb.weight"})

    ids = torch.arange(0, n_items + 1)
    with torch.no_grad():
        looked = model.lookup(ids)
    lookup_ok = torch.equal(looked, table)

    negs = [Negatives(torch.randint(1, n_items + 1, (12,), generator=torch.Generator().manual_seed(7 + r)), 12.0)
            for r in range(world)]
    hist, mask, target = batch(rank, n_items)
    res = runner.forward(hist, mask, target, loss_fn, False, negs[rank])
    rows, offset = model.local_rows()
    before_rows = rows.clone()
    res["loss"].backward()
    after_rows, _ = model.local_rows()
    sparse_delta = (after_rows - before_rows).clone()
    dense_grads = {n: p.grad.clone() for n, p in model.backbone.named_parameters()}

    # reference: DDP's semantics, every gradient (table and dense) the average of the workers' mean losses'
    ref_table_grad = torch.zeros_like(table)
    ref_dense = {n: torch.zeros_like(p) for n, p in dense.named_parameters() if n != "item_emb.weight"}
    for r in range(world):
        dense.zero_grad()
        h, m, tg = batch(r, n_items)
        dense(h, m, tg, loss_fn, False, negs[r])["loss"].backward()
        ref_table_grad += dense.item_emb.weight.grad / world
        for n in ref_dense:
            ref_dense[n] += dense.get_parameter(n).grad / world
    rows = sparse_delta.shape[0]
    expected_delta = -0.5 * ref_table_grad[offset:offset + rows]
    result = {
        "lookup_ok": bool(lookup_ok),
        "table_err": float((sparse_delta - expected_delta).abs().max()),
        "table_change": float(expected_delta.abs().max()),
        "dense_err": max(float((dense_grads[n] - ref_dense[n]).abs().max()) for n in ref_dense),
        "rows": rows, "offset": offset,
    }
    torch.save(result, f"{out}/parity.{rank}.pt")
    dist.destroy_process_group()


def merged_search(rank: int, world: int, port: int, n_items: int, out: str) -> None:
    """ShardedItemIndex over each worker's rows against an exact search of the whole table."""
    init(rank, world, port)
    from eimf.config import RetrievalConfig
    from eimf.training.sharded import ShardedItemIndex

    table = np.random.default_rng(3).standard_normal((n_items + 1, 8)).astype(np.float32)
    table[0] = 0
    block = -(-(n_items + 1) // world)
    lo, hi = rank * block, min((rank + 1) * block, n_items + 1)
    index = ShardedItemIndex(table[lo:hi], lo, n_items, RetrievalConfig(index="Flat"))
    interests = np.random.default_rng(4).standard_normal((9, 3, 8)).astype(np.float32)
    exclude = [list(range(1, 1 + i)) for i in range(9)]
    ids, scores = index.search_multi(interests, 10, exclude=exclude)
    torch.save({"ids": ids, "scores": scores, "table": table, "interests": interests, "exclude": exclude},
               f"{out}/search.{rank}.pt")
    dist.destroy_process_group()


def _runner(n_items: int, seed: int):
    from eimf.training.sharded import ShardedItemModel, ShardedStepRunner, sparse_optimizer_params

    cfg = tiny_cfg()
    torch.manual_seed(seed)
    return cfg, ShardedStepRunner(ShardedItemModel(cfg.model, n_items), 1e-3, 0.0,
                                  sparse_optimizer_params("rowwise_adagrad", 0.1, False), torch.device("cpu"),
                                  init_seed=seed)


def _state(runner) -> dict:
    rows, offset = runner.model.local_rows()
    return {"rows": rows.detach().clone(), "offset": offset,
            "optimizer": {k: v.detach().clone() for k, v in runner._optimizer_states().items()}}


def reshard_save(rank: int, world: int, port: int, n_items: int, out: str) -> None:
    """One step (so the row-wise optimizer state is not all zero), then a checkpoint and a best snapshot."""
    init(rank, world, port)
    from pathlib import Path

    from eimf.models.negatives import Negatives, build_loss

    cfg, runner = _runner(n_items, seed=1)
    loss_fn = build_loss(cfg.negatives, n_items, 5, cfg.model)
    hist, mask, target = batch(rank, n_items)
    negs = Negatives(torch.randint(1, n_items + 1, (12,), generator=torch.Generator().manual_seed(7)), 12.0)
    runner.forward(hist, mask, target, loss_fn, False, negs)["loss"].backward()
    folder = Path(out) / "ckpt"
    folder.mkdir(exist_ok=True)
    runner.save(folder)
    runner.save_best(folder, runner.snapshot(), rank == 0)
    torch.save(_state(runner), f"{out}/saved.{rank}.pt")
    dist.destroy_process_group()


def reshard_load(rank: int, world: int, port: int, n_items: int, out: str) -> None:
    """A fresh runner (other initial rows) at this world size loads the checkpoint of another one."""
    init(rank, world, port)
    from pathlib import Path

    _, runner = _runner(n_items, seed=2)
    runner.load(Path(out) / "ckpt")
    best = runner.load_best(Path(out) / "ckpt")
    torch.save({**_state(runner), "best_rows": best["rows"], "best_offset": best["offset"]},
               f"{out}/loaded.{rank}.pt")
    dist.destroy_process_group()
