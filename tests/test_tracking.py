"""eimf.tracking.MetricSender against a real `mlflow server` that goes away and comes back: logging never blocks
the caller, every batch held during the outage arrives once the server returns (no step lost, none twice), and
what cannot arrive within the give-up bound is counted as dropped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from eimf import tracking
from eimf.config import Config


def _start(root, port):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art"),
         "--workers", "1"], stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    return proc
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            time.sleep(0.3)
        raise AssertionError("mlflow server did not start")
    except BaseException:  # a start that fails or times out (pytest-timeout) must not leave its server running
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def _new_run(uri: str, experiment: str) -> str:
    cfg = Config()
    cfg.tracking.tracking_uri, cfg.tracking.experiment = uri, experiment
    return tracking.start_run(cfg, f"{experiment}-run")


class _Server:
    """A real `mlflow server` on one port that a test can stop (SIGKILL) and start again on the same store."""

    def __init__(self, root, port):
        self.root, self.port, self.uri = root, port, f"http://127.0.0.1:{port}"
        self.proc = _start(root, port)

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def restart(self):
        self.proc = _start(self.root, self.port)


@pytest.fixture
def server(tmp_path, free_port):
    srv = _Server(tmp_path, free_port())
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.mark.timeout(300)
def test_metrics_logged_while_the_server_is_down_arrive_when_it_returns(server):
    run_id = _new_run(server.uri, "outage")
    sender = tracking.MetricSender(server.uri, run_id, give_up_s=120)
    for step in range(5):
        sender.log({"loss": 1.0 / (step + 1)}, step=step)
    server.stop()
    t0 = time.perf_counter()
    for step in range(5, 15):  # the server is gone: each call must return at once
        sender.log({"loss": 1.0 / (step + 1)}, step=step)
    assert time.perf_counter() - t0 < 5  # a blocking client would wait out MLflow's retries (minutes)
    time.sleep(3)
    server.restart()
    counts = sender.close(timeout=120)
    assert counts["dropped"] == 0 and counts["sent"] == 15 and counts["retries"] > 0
    history = tracking.client(server.uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(15))  # every step once


@pytest.mark.timeout(120)
def test_batches_that_cannot_arrive_are_counted_as_dropped(free_port):
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    sender = tracking.MetricSender(uri, "no-such-run", give_up_s=1.0)
    for step in range(3):
        sender.log({"loss": 1.0}, step=step)
    counts = sender.close(timeout=60)
    assert counts == {"sent": 0, "retries": counts["retries"], "dropped": 3} and counts["retries"] >= 1


def test_a_full_queue_drops_its_oldest_batch_and_counts_it(free_port):
    sender = tracking.MetricSender(f"http://127.0.0.1:{free_port()}", "no-such-run", give_up_s=0.0, max_pending=2)
    for step in range(50):
        sender.log({"loss": 1.0}, step=step)
    counts = sender.close(timeout=30)
    assert counts["sent"] == 0 and counts["dropped"] == 50


@pytest.mark.timeout(120)
def test_flush_waits_for_what_was_logged_and_gives_up_at_its_timeout(server):
    run_id = _new_run(server.uri, "flush")
    sender = tracking.MetricSender(server.uri, run_id)
    for step in range(20):
        sender.log({"loss": 1.0}, step=step)
    assert sender.flush(timeout=30)  # everything logged is on the server when flush returns
    assert len(tracking.client(server.uri).get_metric_history(run_id, "loss")) == 20
    server.stop()
    sender.log({"loss": 2.0}, step=20)
    t0 = time.perf_counter()
    assert not sender.flush(timeout=1.0)  # the server is away: flush gives up, the batch stays queued
    assert time.perf_counter() - t0 < 5
    assert sender.close(timeout=0.1)["dropped"] == 1
