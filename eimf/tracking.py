"""MLflow tracking: one experiment per dataset, one run per training, rank-0 logging.

The driver creates the experiment (with an explicit artifact location, so artifacts never land in a
Ray worker's temp folder) and the run; training workers log metrics to that run id; the driver logs
artifacts at the end. Metric names are the same in every run so runs compare side by side in the UI.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import mlflow
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service import utils

from eimf.config import Config, eimf_home, flatten, to_dict

log = logging.getLogger(__name__)


def default_tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = Path(eimf_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.tracking_uri or default_tracking_uri()


def default_artifact_root() -> str:
    if os.environ.get("EIMF_ARTIFACT_ROOT"):
        return os.environ["EIMF_ARTIFACT_ROOT"]
    return (Path(eimf_home()).resolve() / "mlartifacts").as_uri()


def metric_key(name: str) -> str:
    """MLflow names allow [/\\w.\\- :] only: 'valid/recall@50' -> 'valid/recall_at_50'."""
    return re.sub(r"[^/\w.\- :]", "_", name.replace("@", "_at_"))


def code_version() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def client(uri: str):
    return MlflowClient(tracking_uri=uri)


def start_run(cfg: Config, run_name: str, tags: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Create (or, for a resumed run name, find) the MLflow run; returns its id. Driver only.

    ``tags`` are set on the run, a found one included; ``{"mlflow.parentRunId": id}`` nests it under a parent
    run in the UI (a pipeline stage under its pipeline run)."""
    if not cfg.tracking.enabled:
        return None
    uri = tracking_uri(cfg)
    c = client(uri)
    exp_name = cfg.tracking.experiment or f"eimf-{cfg.data.dataset}"
    exp = c.get_experiment_by_name(exp_name)
    if exp:
        exp_id = exp.experiment_id
    else:
        # A tracking server decides where artifacts go (its --artifacts-destination, proxied); a local
        # store gets an explicit root so artifacts never land in a Ray worker's working directory.
        served = uri.startswith(("http://", "https://", "databricks"))
        location = os.environ.get("EIMF_ARTIFACT_ROOT") if served else default_artifact_root()
        exp_id = c.create_experiment(exp_name, artifact_location=location)
    found = c.search_runs([exp_id], filter_string=f"tags.`eimf.run_name` = '{run_name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        for k, v in (tags or {}).items():  # e.g. the parent run of a pipeline stage that is resumed
            c.set_tag(run_id, k, v)
        log.info("MLflow: resuming run %s (%s) in %s", run_name, run_id, uri)
        return run_id
    all_tags = {"eimf.run_name": run_name, "mlflow.runName": run_name,
                "backbone": cfg.model.backbone, "dataset": cfg.data.dataset,
                "code_version": code_version(), **(tags or {})}
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    params = {k: str(v)[:6000] for k, v in flatten(to_dict(cfg)).items()}

    c.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    log.info("MLflow: run %s (%s) in %s, experiment %s", run_name, run.info.run_id, uri, exp_name)
    return run.info.run_id


def _metric_batch(metrics: Dict[str, float], step: int) -> list:
    ts = int(time.time() * 1000)
    return [Metric(metric_key(k), float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float))]


def log_metrics(uri: str, run_id: Optional[str], metrics: Dict[str, float], step: int) -> None:
    if run_id:
        client(uri).log_batch(run_id, metrics=_metric_batch(metrics, step))


class _Refused(Exception):
    pass


class MetricSender:
    """Sends a run's metrics from a background thread, so that a slow or absent tracking server never stalls
    training. Batches wait in order; one that fails is retried with backoff until the server answers, for at
    most ``give_up_s`` seconds of outage, then dropped and counted (as is the oldest batch when more than
    ``max_pending`` wait). :meth:`close` waits for the queue to drain and returns the counts."""

    def __init__(self, uri: str, run_id: Optional[str], give_up_s: float = 600.0, max_pending: int = 100_000):
        self.uri, self.run_id, self.give_up_s, self.max_pending = uri, run_id, give_up_s, max_pending
        self.counts = {"sent": 0, "retries": 0, "dropped": 0}
        self._pending: "collections.deque" = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="eimf-metrics", daemon=True) if run_id else None
        if self._thread:
            self._thread.start()

    def log(self, metrics: Dict[str, float], step: int) -> None:
        if not self._thread:
            return
        with self._wake:
            if len(self._pending) >= self.max_pending:
                self._pending.popleft()
                self.counts["dropped"] += 1
            self._pending.append(_metric_batch(metrics, step))
            self._wake.notify()

    def _send(self, batch: list) -> None:
        """One batch, without MLflow's own retries (their backoff grows to minutes, ours stays <= 10 s): over the
        documented REST API for a tracking server, through the client for a local store."""
        if not self.uri.startswith(("http://", "https://")):
            client(self.uri).log_batch(self.run_id, metrics=batch)
            return
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        headers = {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"} \
            if os.environ.get("MLFLOW_TRACKING_TOKEN") else {}
        r = requests.post(f"{self.uri.rstrip('/')}/api/2.0/mlflow/runs/log-batch", timeout=30, headers=headers,
                          auth=(user, password) if user else None,
                          json={"run_id": self.run_id, "metrics": [
                              {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                              for m in batch]})
        if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
            raise _Refused(f"{r.status_code} {r.text[:200]}")
        r.raise_for_status()

    def _run(self) -> None:
        outage_since, backoff = None, 0.5
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                batch = self._pending[0]
            try:
                self._send(batch)
            except _Refused as e:  # the server answered no (bad run, no permission): retrying changes nothing
                log.warning("tracking server refused a metric batch: %s", e)
                self._done(dropped=True)
                continue
            except Exception as e:  # noqa: BLE001 - the server is down or overloaded: retry, then drop
                outage_since = outage_since or time.monotonic()
                if time.monotonic() - outage_since > self.give_up_s:
                    log.warning("tracking server unreachable for %.0f s: dropping a metric batch (%s)",
                                self.give_up_s, e)
                    self._done(dropped=True)
                    continue
                self.counts["retries"] += 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            outage_since, backoff = None, 0.5
            self._done(dropped=False)

    def _done(self, dropped: bool) -> None:
        with self._wake:
            if not self._pending:  # close() gave up on the queue meanwhile and counted it
                return
            self._pending.popleft()
            self.counts["dropped" if dropped else "sent"] += 1
            self._wake.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until every batch logged so far is sent (or dropped); True if it was. Before a
        checkpoint: a run killed after it resumes past those steps, so their metrics must be out by then."""
        if not self._thread:
            return True
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(left)
        return True

    def close(self, timeout: Optional[float] = None) -> Dict[str, int]:
        """Send what is left (waiting at most ``timeout`` s); batches still unsent then count as dropped."""
        if self._thread:
            with self._wake:
                self._closing = True
                self._wake.notify()
            self._thread.join(timeout)
            with self._wake:
                self.counts["dropped"] += len(self._pending)
                self._pending.clear()
        return dict(self.counts)


def set_tags(uri: str, run_id: Optional[str], tags: Dict[str, str]) -> None:
    if run_id:
        client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifacts(uri: str, run_id: Optional[str], folder: str, artifact_path: Optional[str] = None) -> None:
    if run_id:
        client(uri).log_artifacts(run_id, folder, artifact_path)


def end_run(uri: str, run_id: Optional[str], status: str = "FINISHED") -> None:
    if run_id:
        client(uri).set_terminated(run_id, status=status)


@contextlib.contextmanager
def fluent_tracking_uri(uri: str):
    """MLflow's fluent API (log_model needs it) pointed at ``uri``, then exactly the state before. set_tracking_uri
    also writes $MLFLOW_TRACKING_URI, so restoring with set_tracking_uri(get_tracking_uri()) would pin MLflow's
    default store (./mlflow.db) for every later run of this process: it did, and a pipeline lost its runs."""
    env, previous = os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = previous
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env
