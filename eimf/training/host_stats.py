"""Where a training worker runs, and the bytes that cross its host's network links while it trains.

The counters are the host's interfaces (loopback left out), so they include whatever else the host sends at the
same time (Ray's heartbeats, another worker on the same host): an upper bound on the training's own traffic.
"""
from __future__ import annotations

import socket
from dataclasses import asdict, dataclass
from typing import Dict, List

import psutil


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
        import ray.util

        now = link_bytes()
        return cls(rank, socket.gethostname(), ray.util.get_node_ip_address(), now["rx"] - since["rx"],
                   now["tx"] - since["tx"], steps)


def placement_tags(workers: List[WorkerPlacement]) -> Dict[str, str]:
    """MLflow tags: ``worker.<rank>.host`` = ``hostname (ip)``."""
    return {f"worker.{w.rank}.host": f"{w.host} ({w.ip})" for w in workers}


def placement_metrics(workers: List[WorkerPlacement]) -> Dict[str, float]:
    """MLflow metrics: each worker's link bytes per training step, received and sent, and the hosts used."""
    out: Dict[str, float] = {"hosts": float(len({w.ip for w in workers}))}
    for w in workers:
        steps = max(w.steps, 1)
        out[f"net/worker{w.rank}_rx_bytes_per_step"] = w.rx_bytes / steps
        out[f"net/worker{w.rank}_tx_bytes_per_step"] = w.tx_bytes / steps
    return out


def as_dicts(workers: List[WorkerPlacement]) -> List[dict]:
    return [asdict(w) for w in workers]
