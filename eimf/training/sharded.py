"""The row-sharded item table (``train.strategy=sharded``): TorchRec's ``EmbeddingCollection`` split by rows
across the Ray Train workers, with fbgemm's fused sparse optimizer, and the backbone's dense weights under DDP.

Each worker holds about ``(N + 1) / W`` rows and their optimizer state. A step gathers only the distinct ids
the batch needs (history, targets, the shared negatives) through TorchRec's all-to-all, runs the unchanged
backbone on those rows (:class:`BatchRows` stands in for its ``nn.Embedding``), and the backward sends the
rows' gradients back to their owners, where the fused optimizer applies them inside the backward. Rows that no
batch touched are never read or written: the step's cost follows the batch, not the catalogue.

Why DDP and not DeepSpeed for the dense part: TorchRec's ``DistributedModelParallel`` wraps the non-sharded
parameters in DDP itself (it must know which parameters it owns); DeepSpeed's engine would have to wrap the
same module and would see the sharded table's parameters as its own. The dense part is ~0.1 M parameters, so
ZeRO would save nothing there.

Optimizers: the fused kernels on CPU offer SGD, Adagrad and row-wise Adagrad only (no Adam), GPUs add Adam.
``train.sharded.optimizer=auto`` takes row-wise Adagrad on CPU (one state float per row) and Adam on GPU. The
table's gradient is the average over workers, as DDP's is: the step computes the dense path's gradients exactly
(tests/test_sharded.py), only the table's optimizer differs.

Evaluation is collective: every worker computes the same users' interests (the lookups are collective), searches
its own rows with faiss (:class:`ShardedItemIndex`), and the per-shard top lists are merged, which equals a
search over the whole table for an exact index. Checkpoints and the best model are one row block per worker
(``table.<rank>-of-<W>.pt``: its rows, their optimizer state and their global offset) beside the dense weights; a
resume at any number of workers reads each worker's row range out of the blocks that overlap it.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType

from eimf.evaluation.retrieval import ItemIndex, ivf_cells, resolve_index
from eimf.formats import checkpoints as ckpt
from eimf.formats.checkpoints import BEST_TABLE_PREFIX, TABLE_PREFIX, shard_file, shard_files
from eimf.models import build_model
from eimf.training.hardware import adam
from eimf.training.loop import StepRunner, check_precision
from eimf.training.replicated_head import ReplicatedHead, broadcast_object

log = logging.getLogger(__name__)

#: Not ``items``: TorchRec registers each table name as a module attribute, which clashes with ``Module.items``.
TABLE = "item_table"
FEATURE = "item_id"
#: Rows are initialised in blocks of this many ids, each from its own seed: the same table for any worker count.
INIT_BLOCK = 1 << 16
SPARSE_OPTIMIZERS = ("auto", "rowwise_adagrad", "adagrad", "sgd", "adam")




class BatchRows(nn.Module):
    """The current batch's rows of the sharded table, looked up by global id: the backbone's ``item_emb``."""

    def __init__(self):
        super().__init__()
        self.ids: Optional[torch.Tensor] = None
        self.rows: Optional[torch.Tensor] = None

    def set(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """``ids`` sorted and distinct, ``rows`` [len(ids), d] (with autograd back to the sharded table)."""
        self.ids, self.rows = ids, rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            raise RuntimeError("BatchRows: no rows gathered for this batch (call through ShardedItemModel)")
        return self.rows[torch.searchsorted(self.ids, ids)]

    @property
    def weight(self):
        raise AttributeError("the item table is row-sharded across workers: there is no whole table in this "
                             "process (use ShardedItemModel.local_rows, or the exported model folder)")


class ShardedItemModel(nn.Module):
    """A backbone whose item table is a TorchRec ``EmbeddingCollection`` (sharded once wrapped in DMP)."""

    def __init__(self, model_cfg, n_items: int):
        super().__init__()

        self.n_items = n_items
        # On the meta device: DMP allocates only this worker's rows.
        self.embeddings = EmbeddingCollection(
            tables=[EmbeddingConfig(name=TABLE, embedding_dim=model_cfg.dim, num_embeddings=n_items + 1,
                                    feature_names=[FEATURE])],
            device=torch.device("meta"),
        )
        self.rows = BatchRows()
        self.lookups = self.rows_gathered = 0  # training steps: the all-to-all moves rows x d x 4 bytes each way
        self.backbone = build_model(model_cfg, n_items, item_table=self.rows)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of distinct ``ids`` [U] -> [U, d]; collective: every worker calls it once per step."""
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[FEATURE], values=ids,
                                                  lengths=torch.tensor([ids.numel()], device=ids.device))
        return self.embeddings(kjt)[FEATURE].values()

    def gather(self, *id_tensors: torch.Tensor) -> None:
        # id 0 always: a batch with no rows still joins the collective lookup
        pad = torch.zeros(1, dtype=torch.int64, device=id_tensors[0].device)
        ids = torch.unique(torch.cat([pad] + [t.reshape(-1) for t in id_tensors]))
        self.rows.set(ids, self.lookup(ids))

    def gathered_rows_per_step(self) -> float:
        """Mean distinct rows this worker fetched per training step so far (history, targets, negatives)."""
        return self.rows_gathered / max(1, self.lookups)

    def interests(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.gather(hist)
        if hist.shape[0] == 0:
            rows = self.rows.rows
            # + 0 * rows: keeps the lookup in the graph, so this rank still joins the backward all-to-all
            return rows.new_zeros((0, self.backbone.num_interests, rows.shape[1])) + 0 * rows.sum()
        return self.backbone.interests(hist, mask)

    def forward(self, hist, mask, target=None, loss_fn=None, return_interests=False, negatives=None):
        if target is None:
            return self.interests(hist, mask)
        if negatives is None:  # drawn here: the lookup must include them
            negatives = loss_fn.sample()
        self.gather(hist, target, negatives.ids.to(target.device))
        self.lookups += 1
        self.rows_gathered += self.rows.ids.numel()
        return self.backbone.loss(hist, mask, target, loss_fn, return_interests, negatives)

    # -- this worker's rows -------------------------------------------------------------------
    def local_rows(self) -> Tuple[torch.Tensor, int]:
        """(this worker's rows [n, d], the global id of its first row); the tensor is the table's own storage."""
        shards = self.embeddings.state_dict()[f"embeddings.{TABLE}.weight"].local_shards()
        if len(shards) != 1:
            raise RuntimeError(f"expected one row shard of {TABLE} per worker, got {len(shards)}")
        return shards[0].tensor, int(shards[0].metadata.shard_offsets[0])

    def init_rows(self, seed: int) -> None:
        """ComiRec's Glorot-uniform range for an [N + 1, d] table, row 0 (padding) zero, drawn per id block from
        ``seed``: the same values whatever the number of workers."""
        rows, offset = self.local_rows()
        n, d = rows.shape
        bound = math.sqrt(6.0 / (self.n_items + 1 + d))
        with torch.no_grad():
            for block in range(offset // INIT_BLOCK, (offset + n - 1) // INIT_BLOCK + 1):
                lo, hi = block * INIT_BLOCK, min((block + 1) * INIT_BLOCK, self.n_items + 1)
                g = torch.Generator().manual_seed(seed * 1_000_003 + block)
                values = (torch.rand(hi - lo, d, generator=g) * 2 - 1) * bound
                a, b = max(lo, offset), min(hi, offset + n)
                rows[a - offset:b - offset].copy_(values[a - lo:b - lo])
            if offset == 0:
                rows[0].zero_()

    def load_rows(self, table: torch.Tensor) -> None:
        """Copy this worker's rows out of a whole ``[N + 1, d]`` table (tests; loading a dense model)."""
        rows, offset = self.local_rows()
        with torch.no_grad():
            rows.copy_(table[offset:offset + rows.shape[0]])


def resolve_sparse_optimizer(name: str, use_gpu: bool) -> str:
    """``auto``: Adam on GPUs, row-wise Adagrad on CPU (fbgemm's CPU kernels have no Adam)."""
    if name not in SPARSE_OPTIMIZERS:
        raise ValueError(f"train.sharded.optimizer must be one of {SPARSE_OPTIMIZERS}, got {name!r}")
    return ("adam" if use_gpu else "rowwise_adagrad") if name == "auto" else name


def sparse_optimizer_params(name: str, lr: float, use_gpu: bool) -> dict:
    """fbgemm's fused-optimizer settings for ``train.sharded.optimizer``."""
    name = resolve_sparse_optimizer(name, use_gpu)
    if name == "adam" and not use_gpu:
        raise ValueError("train.sharded.optimizer=adam needs GPUs: fbgemm's CPU kernels offer sgd, adagrad and "
                         "rowwise_adagrad only")
    kind = {"rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
            "sgd": EmbOptimType.EXACT_SGD, "adam": EmbOptimType.ADAM}[name]
    params = {"optimizer": kind, "learning_rate": lr}
    if name != "sgd":
        params["eps"] = 1e-8
    return params


def default_sparse_lr(name: str, dense_lr: float, use_gpu: bool) -> float:
    """Row-wise Adagrad wants a much larger step than Adam (its denominator only grows); Adam and SGD keep the
    dense learning rate."""
    name = resolve_sparse_optimizer(name, use_gpu)
    return 0.2 if name in ("rowwise_adagrad", "adagrad") else dense_lr  # best of 0.02-0.5 on Beauty valid


class ShardedStepRunner(ReplicatedHead, StepRunner):
    """Steps a :class:`ShardedItemModel` wrapped in TorchRec's ``DistributedModelParallel``: the table's rows
    update in the backward (fused), the dense weights with Adam after DDP's all-reduce."""

    #: Every worker evaluates (the lookups and the shard searches are collective).
    collective_eval = True

    def __init__(self, model: ShardedItemModel, dense_lr: float, weight_decay: float, sparse: dict,
                 device: torch.device, init_seed: int, precision: str = "fp32"):
        if not dist.is_initialized():
            raise RuntimeError("train.strategy=sharded needs torch.distributed (it runs inside Ray Train workers)")
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        compute = "cuda" if device.type == "cuda" else "cpu"
        sharders = [EmbeddingCollectionSharder(fused_params=sparse)]
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=self.world, compute_device=compute),
            constraints={TABLE: ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value])},
        )
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        self.dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
        self.model = self.dmp.module
        self.model.init_rows(init_seed)
        self.optimizer = adam(self.model.backbone.parameters(), lr=dense_lr, weight_decay=weight_decay)
        self._optimizer_factory = (torch.optim.Adam, dict(self.optimizer.defaults))
        # bf16: the backbone under autocast; the table's rows stay fp32 (fbgemm's CPU lookup has no bf16 rows)
        self.precision = check_precision(precision)

    def _forward(self, *args):
        return self.dmp(*args)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the table's rows are updated here, by fbgemm
        if self.head is not None:
            self._head_step()
        self.optimizer.step()

    def broadcast(self, obj):
        return broadcast_object(obj)

    def batch_item_rows(self, ids: torch.Tensor) -> torch.Tensor:
        gathered = self.model.rows.ids
        if gathered is None or not bool(torch.isin(ids, gathered).all()):
            raise RuntimeError("batch_item_rows: some ids were not gathered by this step's training forward")
        return self.model.rows(ids)

    def item_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` from their owners (collective: every worker calls it, with its own ids)."""
        flat = torch.cat([torch.zeros(1, dtype=torch.int64, device=ids.device), ids.reshape(-1)])
        uniq, inverse = torch.unique(flat, return_inverse=True)
        with torch.no_grad():
            rows = self.model.lookup(uniq)
        return rows[inverse[1:]].reshape(*ids.shape, rows.shape[-1])

    # -- evaluation -----------------------------------------------------------------------------
    def item_index(self, retrieval) -> "ShardedItemIndex":
        rows, offset = self.model.local_rows()
        return ShardedItemIndex(rows.detach().float().cpu().numpy(), offset, self.model.n_items, retrieval)

    # -- snapshots, checkpoints -----------------------------------------------------------------
    def snapshot(self) -> dict:
        """This worker's copy of the weights: the dense backbone and its own rows."""
        rows, offset = self.model.local_rows()
        return {"dense": {k: v.detach().clone() for k, v in self.model.backbone.state_dict().items()},
                "rows": rows.detach().clone(), "offset": offset}

    def restore(self, snap: dict) -> None:
        rows, offset = self.model.local_rows()
        if offset != snap["offset"] or rows.shape != snap["rows"].shape:
            raise RuntimeError(f"table shard mismatch: this worker holds rows {offset}+{tuple(rows.shape)}, the "
                               f"snapshot {snap['offset']}+{tuple(snap['rows'].shape)} (a snapshot of another "
                               f"worker layout)")
        with torch.no_grad():
            rows.copy_(snap["rows"])
        self.model.backbone.load_state_dict(snap["dense"])

    def _optimizer_states(self) -> Dict[str, torch.Tensor]:
        state = self.dmp.fused_optimizer.state_dict()["state"]
        out = {}
        for param, states in state.items():
            for name, value in states.items():
                if hasattr(value, "local_shards"):
                    out[f"{param}/{name}"] = value.local_shards()[0].tensor
        return out

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        rows, offset = self.model.local_rows()
        torch.save({"rows": rows.detach().clone(), "offset": offset, "n_items": self.model.n_items,
                    "optimizer": {k: v.detach().clone() for k, v in self._optimizer_states().items()}},
                   folder / shard_file(TABLE_PREFIX, self.rank, self.world))
        if self.rank == 0:  # the dense part is identical on every worker
            torch.save(self.model.backbone.state_dict(), folder / ckpt.MODEL)
            torch.save(self.optimizer.state_dict(), folder / ckpt.OPTIMIZER)
            if self.head is not None:
                torch.save({"head": self.head.state_dict(), "optimizer": self.head_optimizer.state_dict()},
                           folder / ckpt.HEAD)

    def _read_row_blocks(self, folder: Path, prefix: str, optimizer: bool) -> Optional[dict]:
        """This worker's rows (and their optimizer state) out of a checkpoint's row blocks, whatever number of
        workers wrote them: each block holds its global offset, and the blocks that overlap this worker's range are
        read one at a time, memory-mapped, so no worker ever holds the whole table. None: no blocks there."""
        paths = shard_files(folder, prefix)
        if not paths:
            return None
        rows, offset = self.model.local_rows()
        n = rows.shape[0]
        out = {"rows": torch.empty_like(rows), "offset": offset}
        states = {k: torch.empty_like(v) for k, v in self._optimizer_states().items()} if optimizer else {}
        covered = 0
        for path in paths:
            saved = torch.load(path, map_location="cpu", mmap=True)
            lo = int(saved["offset"])
            a, z = max(lo, offset), min(lo + saved["rows"].shape[0], offset + n)
            if a >= z:
                continue
            out["rows"][a - offset:z - offset].copy_(saved["rows"][a - lo:z - lo])
            for key, value in states.items():
                value[a - offset:z - offset].copy_(saved["optimizer"][key][a - lo:z - lo])
            covered += z - a
        if covered != n:
            raise RuntimeError(f"{folder}: the {prefix} blocks ({[p.name for p in paths]}) cover {covered} of the "
                               f"{n} rows from {offset} that worker {self.rank} of {self.world} holds")
        out["optimizer"] = states
        return out

    def load(self, folder: Path) -> None:
        """Resume from a checkpoint written by any number of workers (the table is re-cut to this world size)."""
        folder = Path(folder)
        saved = self._read_row_blocks(folder, TABLE_PREFIX, optimizer=True)
        if saved is None:
            raise FileNotFoundError(f"{folder}: no item-table blocks ({TABLE_PREFIX}.*) in the checkpoint")
        self.restore({"rows": saved["rows"], "offset": saved["offset"],
                      "dense": torch.load(folder / ckpt.MODEL, map_location="cpu")})
        live = self._optimizer_states()
        with torch.no_grad():
            for key, value in saved["optimizer"].items():
                live[key].copy_(value)
        self.optimizer.load_state_dict(torch.load(folder / ckpt.OPTIMIZER, map_location="cpu"))
        if self.head is not None:
            state = torch.load(folder / ckpt.HEAD, map_location="cpu")
            self.head.load_state_dict(state["head"])
            self.head_optimizer.load_state_dict(state["optimizer"])

    def save_best(self, folder: Path, snap: Optional[dict], is_chief: bool) -> None:
        if snap is None:
            return
        torch.save({"rows": snap["rows"], "offset": snap["offset"], "n_items": self.model.n_items},
                   Path(folder) / shard_file(BEST_TABLE_PREFIX, self.rank, self.world))
        if is_chief:
            torch.save(snap["dense"], Path(folder) / ckpt.BEST_MODEL)

    def load_best(self, folder: Path) -> Optional[dict]:
        folder = Path(folder)
        saved = self._read_row_blocks(folder, BEST_TABLE_PREFIX, optimizer=False)
        if saved is None:
            return None
        return {"rows": saved["rows"], "offset": saved["offset"],
                "dense": torch.load(folder / ckpt.BEST_MODEL, map_location="cpu")}


class ShardedItemIndex(ItemIndex):
    """This worker's rows in a faiss index; ``search`` merges every worker's top lists (collective), so it
    answers as an index over the whole table would. The index kind is chosen for the whole catalogue."""

    def __init__(self, local_rows: np.ndarray, offset: int, n_items: int, retrieval, threads=None):
        # ItemIndex skips its first row (the padding row): give it a dummy one unless this shard has id 0.
        rows = local_rows if offset == 0 else np.vstack([np.zeros((1, local_rows.shape[1]), np.float32),
                                                         local_rows])
        spec = resolve_index(retrieval.index, n_items)
        cells = ivf_cells(spec)  # also inside a MIPS-lifted spec
        if cells and len(rows) - 1 < 40 * cells:
            # a shard too small for the catalogue's cell count
            spec = resolve_index("auto", len(rows) - 1)
        # ``auto`` is resolved here, so the guard (eimf.evaluation.retrieval.auto_index) never runs per shard: a
        # shard's build has no check queries (the interests are computed collectively by the evaluation that
        # searches this index), and a candidate checked on one shard's rows says nothing of the merged top list.
        # The safe IVF,Flat of auto_index it is, recorded as unverified.
        super().__init__(rows, index=spec, nprobe=retrieval.nprobe, ef_search=retrieval.ef_search,
                         refine_k=retrieval.refine_k, threads=threads)
        if retrieval.index == "auto" and not self.exact:
            self.auto_check = {"candidate": None, "candidate_recall_of_exact": None, "check_users": 0,
                               "check_vectors": 0, "kept": False,
                               "reason": "row-sharded evaluation index: built per shard, no check queries"}
        self.first_id = max(offset, 1)  # global id of this index's first row (local id 1)
        self.total_items = n_items

    def search(self, queries: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
        ids, scores = super().search(queries, n)
        k = max(1, min(int(n), self.total_items))
        # pad to k columns: every worker must send equal shapes
        pad = k - ids.shape[1]
        if pad > 0:
            ids = np.pad(ids, ((0, 0), (0, pad)))
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.where(ids > 0, ids - 1 + self.first_id, 0)
        world = dist.get_world_size()
        all_ids = [torch.empty(ids.shape, dtype=torch.int64) for _ in range(world)]
        all_scores = [torch.empty(scores.shape, dtype=torch.float32) for _ in range(world)]
        dist.all_gather(all_ids, torch.from_numpy(np.ascontiguousarray(ids)))
        dist.all_gather(all_scores, torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)))
        return merge_shard_results(torch.cat(all_ids, 1).numpy(), torch.cat(all_scores, 1).numpy(), k)


def merge_shard_results(ids: np.ndarray, scores: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of the concatenated per-shard lists ``[Q, W*k]`` by score (ties: the smaller id); shards hold
    disjoint ids, so no id repeats."""
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
