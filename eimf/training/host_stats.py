"""Where a training worker runs, and the bytes that cross its host's network links while it trains.

The counters are the host's interfaces (loopback left out), so they include whatever else the host sends at the
same time (Ray's heartbeats, another worker on the same host): an upper bound on the training's own traffic.
"""
from __future__ import annotations

import socket
from dataclasses import asdict, dataclass
from typing import Dict, List

import psutil
import ray.util


def link_bytes() -> Dict[str, int]:
    """Bytes received and sent so far over every non-loopback interface of this host (its network namespace)."""
    rx = tx = 0
    for name, c in psutil.net_io_counters(pernic=True).items():
        if name != "lo":
            rx, tx = rx + c.bytes_recv, tx + c.bytes_sent
    return {"rx": rx, "tx": tx}


@dataclass
class WorkerPlacement:
    rank: int
    host: str
    ip: str
    rx_bytes: int
    tx_bytes: int
    steps: int

    @classmethod
    def measure(cls, rank: int, since: Dict[str, int], steps: int) -> "WorkerPlacement":
        now = link_bytes()
        return cls(rank, socket.gethostname(), ray.util.get_node_ip_address(), now["rx"] - since["rx"],
                   now["tx"] - since["tx"], steps)


def placement_tags(workers: List[WorkerPlacement]) -> Dict[str, str]:
    """MLflow tags, one per worker: ``worker.<rank>.host`` = ``hostname (ip)`` and ``worker.<rank>.link`` = its
    bytes per step received and sent (tags, since metric names must not depend on the number of workers)."""
    tags = {}
    for w in workers:
        steps = max(w.steps, 1)
        tags[f"worker.{w.rank}.host"] = f"{w.host} ({w.ip})"
        tags[f"worker.{w.rank}.link"] = f"rx {w.rx_bytes / steps:.0f} B/step, tx {w.tx_bytes / steps:.0f} B/step"
    return tags


def placement_metrics(workers: List[WorkerPlacement]) -> Dict[str, float]:
    """MLflow metrics, the same names at any number of workers: the hosts used, and the bytes per training step
    that crossed a worker's links, received and sent, the mean and the busiest worker's."""
    rx = [w.rx_bytes / max(w.steps, 1) for w in workers]
    tx = [w.tx_bytes / max(w.steps, 1) for w in workers]
    return {"hosts": float(len({w.ip for w in workers})),
            "net/rx_bytes_per_step_mean": sum(rx) / len(rx), "net/rx_bytes_per_step_max": max(rx),
            "net/tx_bytes_per_step_mean": sum(tx) / len(tx), "net/tx_bytes_per_step_max": max(tx)}


def as_dicts(workers: List[WorkerPlacement]) -> List[dict]:
    return [asdict(w) for w in workers]
