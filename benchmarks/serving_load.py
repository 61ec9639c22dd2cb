"""A load test of the served model, bounded in time: each server on 127.0.0.1 under 1, 8, 64 and 256 concurrent
clients for ``--duration`` seconds each (Locust, headless, no think time, 1 s pause after a 503;
benchmarks/serving_locustfile.py).

Servers (``--servers``):
- ``ray``: ``eimf serve`` (the Ray Serve app on a Ray of its own; one replica answering on its own HTTP server,
  batches of up to 64, at most 64 requests admitted, 503 past them; ``--serve-args`` changes them);
- ``mlflow``: ``mlflow models serve --workers 1``; ``mlflow2``: ``--workers 2``;
- ``mlflow2-limited``: ``--workers 2`` with ``UVICORN_LIMIT_CONCURRENCY=32`` (uvicorn answers 503 past 32
  connections per worker: MLflow has no option of its own for it).

Per level: requests, req/s, p50 / p99 / p99.9 of all answers and of the accepted (200) ones, 503s, other errors,
and the resident memory of the serving processes at the end (the replica and proxy actors for Ray Serve; the
server's process tree for MLflow). For Ray Serve also the replica's own time of the accepted requests (p50 / p99
from its access log): the part of their latency spent inside the app, batch queue included; the rest is the
socket, the HTTP parsing and the client. Each request is one real test user (the last 50 of their history, k = 50).
The clients run on the same cores as the server unless ``--pin-clients CPU`` gives them a core of their own (the
server's processes then get the others): the figures include their cost, and each row gives the CPU seconds
the clients spent (``client_cpu_s``). ``eimf serve``'s port is its replica's own HTTP server (direct ingress);
``RAY_SERVE_ENABLE_DIRECT_INGRESS=0`` in the environment measures the path through Ray's proxy instead.

    python benchmarks/serving_load.py --model-uri models:/eimf-ml-1m/1 --histories <prepared ml-1m>/test.parquet \\
        --output docs/benchmarks/serving_load.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pandas as pd
import psutil

sys.path.insert(0, os.path.dirname(__file__))

from serving_fuzz import ray_serving_pids, rss_mb  # noqa: E402
from serving_latency import free_port, replica_ms, wait  # noqa: E402

HERE = Path(__file__).resolve().parent
SERVERS = ("ray", "mlflow", "mlflow2", "mlflow2-limited")


def cpus_apart(pin: Optional[int]) -> Tuple[Optional[set], Optional[set]]:
    """(the server's CPUs, the clients' CPUs) for ``--pin-clients``: the clients on core ``pin``, the server on the
    rest; (None, None) when unpinned."""
    if pin is None:
        return None, None
    every = os.sched_getaffinity(0)
    if pin not in every or len(every) < 2:
        raise SystemExit(f"--pin-clients {pin}: this process may run on CPUs {sorted(every)}; need {pin} and another")
    return every - {pin}, {pin}


def start(server: str, model_uri: str, port: int, log: Path, serve_args=(), cpus: Optional[set] = None
          ) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if server == "ray":
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "eimf.cli", "serve", model_uri, "--port", str(port), *serve_args]
    else:
        workers = "1" if server == "mlflow" else "2"
        if server.endswith("-limited"):
            env["UVICORN_LIMIT_CONCURRENCY"] = "32"
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", workers]
    # Affinity is inherited: Ray's processes (raylet, proxy, replica) stay on the server's CPUs.
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=pin)
    if server == "ray":
        wait(f"http://127.0.0.1:{port}/health", ok=200)
    else:
        wait(f"http://127.0.0.1:{port}/ping")
    return proc


def serving_rss_mb(server: str, proc: subprocess.Popen) -> Dict[str, float]:
    """Resident memory (MB) of the processes that serve, by role: Ray Serve's ``replica`` and ``proxy`` actors
    (serving_fuzz finds them among the command's descendants); MLflow's whole tree as ``server``."""
    if server == "ray":
        return {"proxy" if name == "ProxyActor" else "replica": rss_mb([pid])
                for name, pid in ray_serving_pids(root=proc.pid).items()}
    return {"server": rss_mb([proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)])}


def run_locust(url: str, clients: int, duration: int, bodies: Path, path: str, out: Path,
               cpus: Optional[set] = None) -> dict:
    prefix = out / f"c{clients}"
    env = {**os.environ, "EIMF_LOAD_BODIES": str(bodies), "EIMF_LOAD_PATH": path}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "locust", "-f", str(HERE / "serving_locustfile.py"), "--headless",
                    "-u", str(clients), "-r", str(clients), "-t", f"{duration}s", "--host", url,
                    "--csv", str(prefix), "--only-summary", "--stop-timeout", "10", "--loglevel", "ERROR"],
                   env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=duration + 120,
                   preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # Locust is the only child waited for in between
    client_cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(open(f"{prefix}_stats.csv"))}
    every = rows[("POST", "recommend")]
    ok = rows.get(("STATUS", "200"))
    n = int(every["Request Count"])
    shed = int(rows[("STATUS", "503")]["Request Count"]) if ("STATUS", "503") in rows else 0
    accepted = int(ok["Request Count"]) if ok else 0
    return {"clients": clients, "requests": n, "rps": float(every["Requests/s"]),
            "p50_ms": float(every["50%"]), "p99_ms": float(every["99%"]), "p999_ms": float(every["99.9%"]),
            "ok": accepted, "ok_p50_ms": float(ok["50%"]) if ok else float("nan"),
            "ok_p99_ms": float(ok["99%"]) if ok else float("nan"),
            "ok_p999_ms": float(ok["99.9%"]) if ok else float("nan"),
            "shed_503": shed, "errors": n - accepted - shed, "client_cpu_s": client_cpu_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", required=True, help="models:/name/version (MLFLOW_TRACKING_URI set) or a folder")
    p.add_argument("--histories", required=True, help="a prepared test.parquet (internal ids) of the same dataset")
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 64, 256])
    p.add_argument("--duration", type=int, default=60, help="seconds per level")
    p.add_argument("--serve-args", default="", help='more arguments to eimf serve, e.g. --serve-args="--max-queued 1"')
    p.add_argument("--pin-clients", type=int, default=None, metavar="CPU",
                   help="run the clients on this CPU and the server on the others (default: both on every CPU)")
    p.add_argument("--output")
    args = p.parse_args()
    server_cpus, client_cpus = cpus_apart(args.pin_clients)
    test = pd.read_parquet(args.histories)
    items = pd.read_parquet(Path(args.histories).with_name("items.parquet"))
    raw = items.sort_values("item")["raw_id"].astype(str).to_numpy()
    bodies = [{"history": raw[np.asarray(h)[-50:] - 1].tolist(), "k": 50} for h in test["history"]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="eimf-load-") as tmp:
        tmp = Path(tmp)
        for server in args.servers:
            path = "/recommend" if server == "ray" else "/invocations"
            wrapped = bodies if server == "ray" else [{"dataframe_records": [b]} for b in bodies]
            body_file = tmp / f"{server}.json"
            body_file.write_text(json.dumps(wrapped))
            port = free_port()
            proc = start(server, args.model_uri, port, tmp / f"{server}.log", shlex.split(args.serve_args),
                         server_cpus)
            try:
                rss_at_start = serving_rss_mb(server, proc)
                # eimf serve's own Ray is the newest session (nothing else may run Ray beside this benchmark)
                session = Path("/tmp/ray/session_latest").resolve() if server == "ray" else None
                run_locust(f"http://127.0.0.1:{port}", 4, 5, body_file, path, tmp, client_cpus)  # warm-up, not reported
                for clients in args.clients:
                    seen = len(replica_ms(session)) if session else 0
                    row = {"server": server, **run_locust(f"http://127.0.0.1:{port}", clients, args.duration,
                                                          body_file, path, tmp, client_cpus),
                           "rss_start_mb": sum(rss_at_start.values()), "rss_start_mb_by_process": rss_at_start}
                    rss = serving_rss_mb(server, proc)
                    row.update(rss_end_mb=sum(rss.values()), rss_end_mb_by_process=rss)
                    if session:
                        time.sleep(2)  # the access log is written in buffered batches
                        own = np.asarray(replica_ms(session)[seen:])
                        if len(own):
                            row.update(replica_ok_p50_ms=float(np.percentile(own, 50)),
                                       replica_ok_p99_ms=float(np.percentile(own, 99)), replica_ok=len(own))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                if server == "ray":
                    proc.send_signal(signal.SIGINT)  # eimf serve stops its own Ray
                else:
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    print("| server | clients | requests | req/s | p50 ms | p99 ms | p99.9 ms | accepted p99 ms | in the replica: "
          "accepted p50 / p99 ms | 503 | other errors | clients' CPU (cores) | RSS MB start / end |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|")
    for r in rows:
        inside = f"{r['replica_ok_p50_ms']:.0f} / {r['replica_ok_p99_ms']:.0f}" if "replica_ok_p99_ms" in r else "-"
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['rps']:.0f} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['p999_ms']:.0f} | {r['ok_p99_ms']:.0f} | {inside} | {r['shed_503']} | "
              f"{r['errors']} | {r['client_cpu_s'] / args.duration:.2f} | "
              f"{r['rss_start_mb']:.0f} / {r['rss_end_mb']:.0f} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "date": time.strftime("%Y-%m-%d"),
                                                 "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
