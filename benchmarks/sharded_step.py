"""Step time of the sharded table (2 gloo workers, 1 thread each) against the dense path (1 process, 2 threads), on
synthetic ids: ComiRec-SA, d=64, batch 128 per worker, 50-item histories, 1,280 shared negatives, 30 timed steps
after 5 warm-up steps (dense: 10 after 5). No Ray, no data: it isolates the step from the input pipeline.

    python benchmarks/sharded_step.py 10000 1000000          # both paths
    NO_DENSE=1 python benchmarks/sharded_step.py 10000000    # sharded only

Prints (path, items, ms per step, examples/s over all workers, peak RSS MB of rank 0 / the dense process).
"""
import os, sys, time, resource, torch, torch.distributed as dist, torch.multiprocessing as mp
from eimf.config import Config
def cfg_():
    c = Config(); c.negatives.num_negatives = 1280; return c
def batch(n, g, b=128, t=50):
    hist = torch.randint(1, n + 1, (b, t), generator=g); mask = torch.ones(b, t, dtype=torch.bool)
    return hist, mask, torch.randint(1, n + 1, (b,), generator=g)
def sharded(rank, world, n, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29655")); torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from eimf.models.negatives import build_loss
    from eimf.training.sharded import ShardedItemModel, ShardedStepRunner, sparse_optimizer_params
    c = cfg_(); r = ShardedStepRunner(ShardedItemModel(c.model, n), 1e-3, 0.0, sparse_optimizer_params("auto", 0.05, False), torch.device("cpu"), 1)
    loss = build_loss(c.negatives, n, 128, c.model); g = torch.Generator().manual_seed(rank)
    for i in range(35):
        if i == 5: t = time.perf_counter()
        h, m, y = batch(n, g); out = r.forward(h, m, y, loss); r.backward_and_step(out["loss"])
    dt = (time.perf_counter() - t) / 30
    if rank == 0: q.put(("sharded-2w", n, dt * 1000, 2 * 128 / dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
def dense(n):
    torch.set_num_threads(2)
    from eimf.training.components import build_components
    c = cfg_(); model, loss, r, _ = build_components(c, n, 128); g = torch.Generator().manual_seed(0)
    for i in range(15):
        if i == 5: t = time.perf_counter()
        h, m, y = batch(n, g); out = r.forward(h, m, y, loss); r.backward_and_step(out["loss"])
    dt = (time.perf_counter() - t) / 10
    print(("dense-1w", n, round(dt * 1000, 1), round(128 / dt), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), flush=True)
if __name__ == "__main__":
    for n in [int(x) for x in sys.argv[1:]]:
        q = mp.get_context("spawn").SimpleQueue()
        mp.spawn(sharded, args=(2, n, q), nprocs=2)
        r = q.get(); print((r[0], r[1], round(r[2], 1), round(r[3]), round(r[4])), flush=True)
        if os.environ.get("NO_DENSE") != "1":
            p = mp.get_context("spawn").Process(target=dense, args=(n,)); p.start(); p.join()
