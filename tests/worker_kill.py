"""SIGKILL one Ray Train worker of this test session once the run's first checkpoint is registered (shared by the
fault-tolerance tests of the DeepSpeed and the sharded paths)."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import List, Tuple


def train_worker_pids() -> List[int]:
    """Ray Train workers of this test session's Ray only (its raylet is our child), never another job's."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in p.cmdline()):
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def kill_a_worker_after_first_checkpoint(run_dir: Path, timeout_s: float = 600) -> Tuple[threading.Thread, list]:
    """Starts a thread that kills the last worker found once ``run_dir`` has a registered checkpoint; returns it
    and the list that receives the killed pid."""
    killed: list = []

    def killer():
        deadline = time.time() + timeout_s
        while time.time() < deadline and not killed:
            # The snapshot is written once a checkpoint is registered (every rank reported), not while
            # its files are still being uploaded.
            if (Path(run_dir) / "checkpoint_manager_snapshot.json").exists():
                pids = train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread, killed
