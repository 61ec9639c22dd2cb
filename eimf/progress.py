"""Progress bars with a total and an ETA for training steps and annotation prompts.

Inside a Ray worker (Ray Train, Ray Data) a plain tqdm would write carriage returns into a forwarded log, so
there the bar is Ray's ``tqdm_ray``: the worker sends its state and the driver draws the bar. Elsewhere it is
``tqdm``. ``EIMF_PROGRESS=0`` turns bars off (log lines stay).
"""
from __future__ import annotations

import os
from typing import Optional

from tqdm.auto import tqdm


class _Off:
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: Optional[int], desc: str, unit: str = "it", initial: int = 0, enabled: bool = True):
    """A bar with ``update(n)``, ``set_postfix_str(s)`` and ``close()``."""
    if not enabled or os.environ.get("EIMF_PROGRESS", "1") == "0":
        return _Off()
    try:
        import ray  # heavy; only asked whether this process is a Ray worker when a bar is made

        in_worker = ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001 - no Ray or no runtime context: a local bar
        in_worker = False
    if in_worker:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        bar = ray_tqdm(total=total, desc=desc, unit=unit, flush_interval_s=5.0)
        bar.n = initial
        bar.set_postfix_str = lambda s: bar.set_description(f"{desc} {s}")  # tqdm_ray has no postfix
        return bar

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, mininterval=5.0, dynamic_ncols=True)
