"""The training checkpoint: the names of the files in one Ray Train checkpoint folder.

=========================  =====================================================================================
``model.pt``               the latest weights (dense part only on the sharded path)
``optimizer.pt``           the optimizer's state (per rank under DeepSpeed, beside its own files)
``eimf_head.pt``           EIMF runs: the head (P, g) of the latest step
``best_model.pt``          the best evaluation's weights (dense part only on the sharded path)
``best_eimf_head.pt``      EIMF runs: the head at the best evaluation, which labels that model's interests
``state.json``             the loop state (step, best metric, history, resumes), from the chief
``metrics.json``           the final report only: the run's final metrics
``table.R-of-W.pt``        the sharded path: worker R of W's rows of the latest table, with their global offset
``best_table.R-of-W.pt``   the same for the best evaluation's table
=========================  =====================================================================================

Training writes them (eimf.training); export reads them (eimf.steps.export). Both take the names from here.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

MODEL = "model.pt"
OPTIMIZER = "optimizer.pt"
HEAD = "eimf_head.pt"
BEST_MODEL = "best_model.pt"
BEST_HEAD = "best_eimf_head.pt"
STATE = "state.json"
METRICS = "metrics.json"
#: File prefixes of a worker's table shard in a checkpoint (latest) and of the best model's.
TABLE_PREFIX, BEST_TABLE_PREFIX = "table", "best_table"


def shard_file(prefix: str, rank: int, world: int) -> str:
    return f"{prefix}.{rank:05d}-of-{world:05d}.pt"


def shard_files(folder: Path, prefix: str) -> List[Path]:
    """The table shards with ``prefix`` in a checkpoint folder, in rank order."""
    return sorted(Path(folder).glob(f"{prefix}.*-of-*.pt"))
