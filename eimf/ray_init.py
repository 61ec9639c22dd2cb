"""The one way this project starts or joins Ray."""
from __future__ import annotations

import os

import ray


def init_ray(log_to_driver: bool = True, own: bool = False) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start Ray on this machine; a
    no-op when Ray is already up. The first call decides ``log_to_driver``: training wants its workers' lines on
    the driver, data preparation's per-file tasks would only add noise. ``own``: without ``RAY_ADDRESS``, start a
    Ray of this process's own even where another runs on the machine (``eimf serve`` shuts it down at the end)."""

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            # One machine: Ray Train's controller checks its workers every 0.5 s instead of 2 s, so a short run
            # does not wait seconds for a poll to see it start and end (a cluster keeps Ray's default).
            os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        address = os.environ.get("RAY_ADDRESS") or ("local" if own else None)
        ray.init(address=address, log_to_driver=log_to_driver, ignore_reinit_error=True)
