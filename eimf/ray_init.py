"""The one way this project starts or joins Ray."""
from __future__ import annotations

import os


def init_ray(log_to_driver: bool = True) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start Ray on this machine; a
    no-op when Ray is already up. The first call decides ``log_to_driver``: training wants its workers' lines on
    the driver, data preparation's per-file tasks would only add noise."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=log_to_driver, ignore_reinit_error=True)
