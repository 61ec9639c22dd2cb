"""Latency and throughput of a served model: `mlflow models serve` and the Ray Serve deployment, on 127.0.0.1.

For each server (and the Recommender in process, for the cost without HTTP): ``--single`` sequential single-user requests (p50 / p99 / mean latency, after ``--warmup``), then
``--clients`` concurrent clients sending ``--requests`` requests in all (throughput, p50 / p99 under load). Each
request is one real test user's history (raw ids) with k=50; the loop is bounded in count and time.

    python benchmarks/serving_latency.py --model-uri models:/eimf-ml-1m/1 --histories <prepared>/test.parquet

The load generator (asyncio + aiohttp) runs on the same 2 cores as the server: the throughput figures include its
cost. Markdown to stdout, rows as JSON with ``--output``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, timeout: float = 600, ok: int = 0) -> None:
    """Until ``url`` answers below 500 (or exactly ``ok``: Ray Serve's proxy answers 404 until it routes)."""
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            status = requests.get(url, timeout=2).status_code
            if status == ok or (not ok and status < 500):
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


async def _load(url: str, bodies: list, clients: int, wrap) -> tuple:
    import aiohttp

    lat, errors = [], 0
    queue = list(bodies)

    async def client(session):
        nonlocal errors
        while queue:
            body = queue.pop()
            t = time.perf_counter()
            async with session.post(url, data=json.dumps(wrap(body)),
                                    headers={"Content-Type": "application/json"}) as r:
                await r.read()
                errors += r.status != 200
            lat.append(time.perf_counter() - t)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        t = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - t
    return np.asarray(lat) * 1000, wall, errors


def measure(name: str, url: str, bodies: list, wrap, args) -> dict:
    lat, _, err = asyncio.run(_load(url, bodies[: args.warmup], 1, wrap))
    lat, _, err = asyncio.run(_load(url, bodies[: args.single], 1, wrap))
    row = {"server": name, "single_p50_ms": float(np.percentile(lat, 50)), "single_p99_ms": float(np.percentile(lat, 99)),
           "single_mean_ms": float(lat.mean()), "single_errors": err}
    many = (bodies * (args.requests // len(bodies) + 1))[: args.requests]
    lat, wall, err = asyncio.run(_load(url, many, args.clients, wrap))
    row.update({"clients": args.clients, "requests": len(many), "throughput_rps": len(many) / wall,
                "load_p50_ms": float(np.percentile(lat, 50)), "load_p99_ms": float(np.percentile(lat, 99)),
                "load_errors": err})
    print(f"  {name}: {row}", flush=True)
    return row


def mlflow_serve(args, bodies) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", args.model_uri, "--env-manager",
                             "local", "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    try:
        wait(f"http://127.0.0.1:{port}/ping")
        return measure(f"mlflow models serve ({args.workers} worker)", f"http://127.0.0.1:{port}/invocations", bodies,
                       lambda b: {"dataframe_records": [b]}, args)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def ray_serve(args, bodies) -> dict:
    import ray
    from ray import serve

    from eimf.serving.ray_serve import app, direct_ingress_on, give_the_replica_the_port

    port = free_port()
    for pair in args.ray_env:  # Ray Serve's own switches are read from the environment of its processes
        key, _, value = pair.partition("=")
        os.environ[key] = value
    # as eimf serve does: with direct ingress the clients' port is the replica's own server, the proxy is elsewhere
    proxy_port = give_the_replica_the_port("127.0.0.1", port) if direct_ingress_on() else port
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
        serve.run(app({"model_uri": args.model_uri, "max_batch_size": args.max_batch_size,
                       "batch_wait_timeout_s": args.batch_wait_timeout_s, "threads": args.threads}),
                  name="eimf", route_prefix="/")
        wait(f"http://127.0.0.1:{port}/health", ok=200)
        name = f"Ray Serve (1 replica, batch <= {args.max_batch_size}, wait {args.batch_wait_timeout_s * 1000:g} ms" \
            + "".join(f", {e}" for e in args.ray_env) + ")"
        row = measure(name, f"http://127.0.0.1:{port}/recommend", bodies, lambda b: b, args)
        row.update(replica_times(ray._private.worker._global_node.get_session_dir_path(), args.warmup, args.single))
        return row
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_ms(session_dir) -> list:
    """Every accepted request's time in the Ray Serve replica so far, in log order (``POST /recommend 200 2.1ms``)."""
    ms = []
    for log in sorted(Path(session_dir, "logs", "serve").glob("replica_*.log")):
        for line in log.read_text().splitlines():
            if "POST /recommend 200" in line:
                ms.append(float(line.rsplit(" ", 1)[1].rstrip("ms")))
    return ms


def replica_times(session_dir: str, warmup: int, single: int) -> dict:
    """p50 / p99 of the replica's own time for the single-user requests, from its access log (Ray Serve writes
    ``POST /recommend 200 2.1ms`` per request, in order: warm-up, single-user, load): the rest of a client's latency
    is the HTTP proxy and the hops to and from the replica."""
    own = np.asarray(replica_ms(session_dir)[warmup: warmup + single])
    if not len(own):  # a buffered access log (RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE) may not be written yet
        return {}
    return {"replica_p50_ms": float(np.percentile(own, 50)), "replica_p99_ms": float(np.percentile(own, 99))}


def in_process(args, bodies) -> dict:
    """The Recommender alone (no HTTP): one user at a time, then batches of ``--clients`` users; 1 thread."""
    import torch

    from eimf.evaluation.retrieval import set_faiss_threads
    from eimf.serving.pyfunc import load_recommender

    torch.set_num_threads(1)
    set_faiss_threads(1)
    rec = load_recommender(args.model_uri)
    for b in bodies[: args.warmup]:
        rec.recommend([b])
    lat = []
    for b in bodies[: args.single]:
        t = time.perf_counter()
        rec.recommend([b])
        lat.append(time.perf_counter() - t)
    lat = np.asarray(lat) * 1000
    batches = [bodies[i:i + args.clients] for i in range(0, min(len(bodies), args.requests), args.clients)]
    t = time.perf_counter()
    for b in batches:
        rec.recommend(b)
    wall = time.perf_counter() - t
    row = {"server": f"in process (batches of {args.clients})", "single_p50_ms": float(np.percentile(lat, 50)),
           "single_p99_ms": float(np.percentile(lat, 99)), "single_mean_ms": float(lat.mean()), "single_errors": 0,
           "clients": args.clients, "requests": sum(len(b) for b in batches),
           "throughput_rps": sum(len(b) for b in batches) / wall, "load_p50_ms": 1000 * wall / len(batches),
           "load_p99_ms": float("nan"), "load_errors": 0}
    print(f"  {row['server']}: {row}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", required=True, help="models:/name/version (MLFLOW_TRACKING_URI set) or a folder")
    p.add_argument("--histories", required=True, help="a prepared test.parquet (internal ids) of the same dataset")
    p.add_argument("--items", help="that prepared folder's items.parquet (default: beside --histories)")
    p.add_argument("--single", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.002)
    p.add_argument("--threads", type=int, default=1, help="torch/faiss threads of a Ray Serve replica")
    p.add_argument("--ray-env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="environment for Ray's processes, e.g. RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0")
    p.add_argument("--servers", nargs="+", default=["mlflow", "ray", "inprocess"])
    p.add_argument("--output")
    args = p.parse_args()
    test = pd.read_parquet(args.histories)
    items = pd.read_parquet(args.items or Path(args.histories).with_name("items.parquet"))
    raw = items.sort_values("item")["raw_id"].astype(str).to_numpy()
    bodies = [{"history": raw[np.asarray(h)[-50:] - 1].tolist(), "k": 50} for h in test["history"]]
    rows = []
    if "mlflow" in args.servers:
        rows.append(mlflow_serve(args, bodies))
    if "ray" in args.servers:
        rows.append(ray_serve(args, bodies))
    if "inprocess" in args.servers:
        rows.append(in_process(args, bodies))
    print("| server | single p50 ms | single p99 ms | clients | requests | req/s | p50 ms under load | "
          "p99 ms under load | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['single_p50_ms']:.1f} | {r['single_p99_ms']:.1f} | {r['clients']} | "
              f"{r['requests']} | {r['throughput_rps']:.0f} | {r['load_p50_ms']:.1f} | {r['load_p99_ms']:.1f} | "
              f"{r['single_errors'] + r['load_errors']} |")
    for r in rows:
        if "replica_p50_ms" in r:
            print(f"{r['server']}: the replica's own time p50 {r['replica_p50_ms']:.1f} ms, p99 {r['replica_p99_ms']:.1f} ms")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
