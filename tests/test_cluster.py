"""eimf on an emulated cluster (cluster/local_cluster.py): a head and two worker hosts, each a network namespace
with its own disk, PID and hostname, S3 (moto, on the head) as the only storage they share, MLflow behind basic
auth, Ray behind its token.

- the hosts are isolated: a file one host writes to /tmp is not on another; no host has a route out;
- strangers are kept out: the Ray dashboard/job API and MLflow answer 401 without credentials;
- the pipeline, submitted from outside the hosts with `ray job submit`, runs with data, stage outputs, checkpoints
  and MLflow artifacts on S3: once with DeepSpeed ZeRO-2 and the vLLM annotator (SmolLM2 on CPU, one engine on
  each worker host), once with the TorchRec row-sharded table; one training worker on each worker host;
- no credential appears in MLflow params or tags, in manifests, or in any log line of any host.

Root is needed (network namespaces); the module is skipped without it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("EIMF_DATA_DIR", str(REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "cluster"))

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"),
                       reason="network namespaces need root, iproute2 and util-linux"),
    pytest.mark.skipif(not Path(DATA_DIR, "ml-100k").exists(), reason="ml-100k not in EIMF_DATA_DIR"),
]

BUCKET = "s3://eimf-cluster"
#: A small complete pipeline on ML-100K, every path on the cluster's S3, one training worker per worker host.
PIPELINE = ["data.dataset=ml-100k", f"data.data_dir={BUCKET}/datasets", f"pipeline.storage_path={BUCKET}/pipelines",
            "pipeline.warmup_steps=100", "train.max_steps=100", "train.eval_every=50", "train.patience=100",
            "semantic.n_clusters=2", "train.scaling.num_workers=2", "train.scaling.placement_strategy=STRICT_SPREAD"]


@pytest.fixture(scope="module")
def cluster(smollm2_dir):
    from local_cluster import LocalCluster

    def upload_data(c):
        c.python_on_client(f"from eimf import fs; fs.upload_dir({os.path.join(DATA_DIR, 'ml-100k')!r}, "
                           f"'{BUCKET}/datasets/ml-100k')")
        return c

    if os.environ.get("EIMF_TEST_CLUSTER"):  # a cluster you started (`local_cluster.py up`): used, not torn down
        yield upload_data(LocalCluster.attach(os.environ["EIMF_TEST_CLUSTER"]))
        return
    # 3 logical CPUs per worker host: one 2-CPU vLLM engine fits on each, with room for the light stages
    c = LocalCluster.up(workers=2, cpus_per_worker=3)
    try:
        yield upload_data(c)
    finally:
        c.down()
        assert not any(line.startswith(f"eimfc-{c.state.id}-") for line in
                       os.popen("ip netns list").read().splitlines()), "namespaces left behind"


def _client_json(cluster, code: str, **env) -> object:
    out = cluster.python_on_client(code, **env)
    return json.loads(out.strip().splitlines()[-1])


def _submit(cluster, args, timeout=1500) -> tuple:
    """`ray job submit` of the pipeline from outside the hosts (the cluster's client address), then polled to its end
    (the CLI's own log stream can drop on a loaded machine and return early). -> (status, logs)."""
    sid = _start_job(cluster, "jobs/pipeline.py", args)
    return _wait_job(cluster, sid, timeout)


def _mlflow(cluster, experiment: str) -> dict:
    """Runs of an experiment through the server's REST API, with the jobs' credentials."""
    creds = cluster.mlflow_job_credentials()
    code = f"""
import json, requests
auth = ({creds['MLFLOW_TRACKING_USERNAME']!r}, {creds['MLFLOW_TRACKING_PASSWORD']!r})
url = {cluster.mlflow_url!r} + "/api/2.0/mlflow/"
exp = requests.get(url + "experiments/get-by-name", params={{"experiment_name": {experiment!r}}}, auth=auth, timeout=30).json()
runs = requests.post(url + "runs/search", json={{"experiment_ids": [exp["experiment"]["experiment_id"]]}},
                     auth=auth, timeout=30).json()["runs"]
print(json.dumps([{{"id": r["info"]["run_id"], "name": r["info"]["run_name"], "status": r["info"]["status"],
                   "tags": {{t["key"]: t["value"] for t in r["data"].get("tags", [])}},
                   "params": {{p["key"]: p["value"] for p in r["data"].get("params", [])}},
                   "metrics": {{m["key"]: m["value"] for m in r["data"].get("metrics", [])}}}} for r in runs]))
"""
    return _client_json(cluster, code)


def _pipeline_runs(cluster, run: str) -> dict:
    """The MLflow runs of one pipeline: its parent run and its stages' runs, by stage."""
    runs = _mlflow(cluster, "eimf-ml-100k")
    parent = next(r for r in runs if r["tags"].get("stage") == "pipeline" and r["name"] == run)
    return {"pipeline": parent, **{r["tags"]["stage"]: r for r in runs
                                   if r["tags"].get("mlflow.parentRunId") == parent["id"]}}


def _s3_text(cluster, prefix: str) -> dict:
    """Every JSON/YAML/text file under an S3 prefix: {path: text} (manifests, summaries, configs)."""
    code = f"""
import json
from eimf import fs
s3 = fs.s3fs_filesystem()
out = {{p: s3.cat_file(p).decode("utf-8", "replace") for p in s3.find({prefix!r})
       if p.endswith((".json", ".yaml", ".md", ".txt"))}}
print(json.dumps(out))
"""
    return _client_json(cluster, code)


def _secrets(cluster) -> dict:
    creds = cluster.mlflow_job_credentials()
    return {"mlflow admin password": cluster.mlflow_admin()[1],
            "mlflow job password": creds["MLFLOW_TRACKING_PASSWORD"],
            "s3 secret key": cluster.state.s3_secret_key}


def _assert_no_secret_in(texts: dict, secrets: dict) -> None:
    for where, text in texts.items():
        for what, value in secrets.items():
            assert value not in text, f"the {what} appears in {where}"


def _host_log_files(cluster):
    """Every log file on every host's disk: Ray's session logs (/tmp/ray), the hosts' service logs."""
    for host in cluster.state.hosts:
        disk = cluster.disk(host)
        for path in [*disk.glob("tmp/ray/session_*/logs/**/*"), *disk.glob("logs/*"),
                     *disk.glob("home/mlflow/*.log")]:
            if path.is_file():
                yield path


# ------------------------------------------------------------------------------------------------ the hosts
def test_hosts_have_private_disks_own_names_and_no_route_out(cluster):
    on = {h: cluster.exec_host(h, ["bash", "-c", "hostname; ip route; echo $HOME; touch /tmp/mine-$(hostname);"
                                                 " ls /tmp | grep ^mine-;"
                                                 f" touch {REPO}/x 2>&1 | grep -c 'Read-only'"]).stdout.split("\n")
          for h in ("head", "w1", "w2")}
    for host, lines in on.items():
        assert lines[0] == f"eimf-{host}"
        assert not any(line.startswith("default") for line in lines), f"{host} has a default route: {lines}"
        assert [x for x in lines if x.startswith("mine-")] == [f"mine-eimf-{host}"], "another host's /tmp is visible"
        assert lines[-2] == "1", f"the repository is writable on {host}"
    # a Ray task pinned to w2 does not see what a task on w1 wrote to its /tmp
    r = cluster.exec_client(["ray", "job", "submit", "--address", cluster.dashboard_url, "--entrypoint-num-cpus", "0",
                             "--", "python", "-c", _ISOLATION_JOB], timeout=300)
    probe = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("[{")))
    assert [p["host"] for p in probe] == ["eimf-w1", "eimf-w2"]
    assert probe[0]["exists"] and not probe[1]["exists"]


_ISOLATION_JOB = """
import json, os, socket, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as on
ray.init()
node = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
@ray.remote(num_cpus=0)
def probe(write):
    if write:
        open("/tmp/probe.txt", "w").write("w1")
    return {"host": socket.gethostname(), "exists": os.path.exists("/tmp/probe.txt")}
a = ray.get(probe.options(scheduling_strategy=on(node["10.213.0.11"], soft=False)).remote(True))
b = ray.get(probe.options(scheduling_strategy=on(node["10.213.0.12"], soft=False)).remote(False))
print(json.dumps([a, b]))
"""


def test_ray_and_mlflow_refuse_requests_without_credentials(cluster):
    creds = cluster.mlflow_job_credentials()
    token = (cluster.dir / "client" / "auth_token").read_text().strip()
    codes = _client_json(cluster, f"""
import json, requests
dash, ml = {cluster.dashboard_url!r}, {cluster.mlflow_url!r} + "/api/2.0/mlflow/experiments/search?max_results=1"
get = lambda url, **kw: requests.get(url, timeout=10, **kw).status_code
print(json.dumps({{
    "ray_no_token": get(dash + "/api/version"), "ray_jobs_no_token": get(dash + "/api/jobs/"),
    "ray_bad_token": get(dash + "/api/jobs/", headers={{"Authorization": "Bearer nope"}}),
    "ray_token": get(dash + "/api/jobs/", headers={{"Authorization": "Bearer " + {token!r}}}),
    "mlflow_none": get(ml), "mlflow_wrong": get(ml, auth=("eimf-jobs", "wrong")),
    "mlflow_job": get(ml, auth=({creds['MLFLOW_TRACKING_USERNAME']!r}, {creds['MLFLOW_TRACKING_PASSWORD']!r})),
}}))
""")
    assert codes == {"ray_no_token": 401, "ray_jobs_no_token": 401, "ray_bad_token": 403, "ray_token": 200,
                     "mlflow_none": 401, "mlflow_wrong": 401, "mlflow_job": 200}
    # the admin password is on the head only, readable by its root only; workers got the jobs' account alone
    ini = cluster.disk("head") / "home" / "mlflow" / "basic_auth.ini"
    assert ini.stat().st_mode & 0o077 == 0
    admin = cluster.mlflow_admin()[1]
    for w in cluster.workers:
        for f in (p for p in cluster.disk(w).rglob("*") if p.is_file() and "/tmp/ray/" not in str(p)):
            assert admin not in f.read_text(errors="replace"), f"the admin password is on {w}: {f}"


# ------------------------------------------------------------------------------------------------ the pipeline
def _check_pipeline(cluster, run: str, status: str, logs: str) -> tuple:
    """What both pipeline runs must show; returns (MLflow runs by stage, manifests by stage)."""
    assert status == "SUCCEEDED", status + logs[-6000:]
    root = f"{BUCKET}/pipelines/{run}"
    files = _s3_text(cluster, root)
    manifests = {json.loads(t)["stage"]: json.loads(t) for p, t in files.items() if p.endswith("/manifest.json")
                 and json.loads(t).get("stage")}
    files.update(_s3_text(cluster, f"{BUCKET}/pipelines/stages"))  # the stage store: checked for credentials too
    assert set(manifests) >= {"prepare", "warmup", "annotate", "train", "evaluate", "export"}
    assert all(m["status"] == "completed" for m in manifests.values())
    for stage, m in manifests.items():
        for path in m["outputs"].values():
            assert path.startswith((root + "/", f"{BUCKET}/pipelines/stages/")), (stage, path)
    # nothing went to a host's own disk instead of S3
    for host in cluster.state.hosts:
        assert not any((cluster.disk(host) / "eimf").iterdir()), f"{host} wrote to its EIMF_HOME"
    runs = _pipeline_runs(cluster, run)
    # a stage another pipeline on this storage ran first (e.g. prepare) is shared and has its MLflow run there
    assert set(runs) >= {s for s, m in manifests.items() if m["pipeline_run"] == run}
    assert all(r["status"] == "FINISHED" for r in runs.values())
    train = runs["train"]
    hosts = {train["tags"]["worker.0.host"], train["tags"]["worker.1.host"]}
    # two distinct hosts among those running now (an earlier test may have replaced w2 by w3)
    live = {f"eimf-{n} ({cluster.state.hosts[n].ip})" for n in cluster.live_workers}
    assert len(hosts) == 2 and hosts <= live, (hosts, live)
    for rank in (0, 1):
        assert re.fullmatch(r"rx [1-9]\d* B/step, tx [1-9]\d* B/step", train["tags"][f"worker.{rank}.link"])
    assert train["metrics"]["net/rx_bytes_per_step_max"] > 0 and train["metrics"]["net/tx_bytes_per_step_max"] > 0
    assert train["metrics"]["step"] == float(train["params"]["train.max_steps"]) and train["metrics"]["hosts"] == 2
    print(f"{run}: stage seconds " + ", ".join(f"{s} {m['wall_seconds']:.0f}" for s, m in manifests.items()))
    print(f"{run}: link bytes per step: worker 0 {train['tags']['worker.0.link']}, "
          f"worker 1 {train['tags']['worker.1.link']}")
    # no credential in params, tags, manifests, stage files, job logs, or any log file of any host
    secrets = _secrets(cluster)
    texts = {f"MLflow run {r['name']}": json.dumps({"p": r["params"], "t": r["tags"]}) for r in runs.values()}
    texts.update(files)
    texts["job logs"] = logs
    _assert_no_secret_in(texts, secrets)
    _assert_no_secret_in({str(p): p.read_text(errors="replace") for p in _host_log_files(cluster)}, secrets)
    return runs, manifests


def test_pipeline_with_deepspeed_and_vllm_engines_on_both_worker_hosts(cluster, smollm2_dir):
    run = os.environ.get("EIMF_TEST_RUN_PREFIX", "") + "cl-deepspeed"
    status, logs = _submit(cluster, [
        *PIPELINE, f"pipeline.run_name={run}", "train.strategy=deepspeed", "train.deepspeed.zero_stage=2",
        "semantic.annotator=vllm", "semantic.budget=4", f"semantic.vllm.model={smollm2_dir}",
        "semantic.vllm.concurrency=2", "semantic.vllm.cpus_per_engine=2", "semantic.vllm.batch_size=2",
        "semantic.max_attempts=2", "semantic.max_tokens=320", "semantic.token_budget=600",
        "semantic.vllm.max_num_seqs=4", "semantic.vllm.timeout_s=1200"])
    runs, manifests = _check_pipeline(cluster, run, status, logs)
    annotate = manifests["annotate"]
    assert annotate["info"]["annotator"] == "vllm" and annotate["metrics"]["valid_share"] > 0
    # the annotation fanned out: an engine started on each worker host (its actor's log on that host's own disk);
    # the manifest names the hosts whose engines were running when answers came (the first ready one at least)
    for host in cluster.workers:
        assert any(":actor_name:MapWorker(MapBatches(vLLMEngineStageUDF))" in p.read_text(errors="replace")
                   for p in cluster.disk(host).glob("tmp/ray/session_*/logs/worker-*.out")), f"no engine on {host}"
    assert set(annotate["info"]["stats"]["engine_hosts"]) <= {"10.213.0.11", "10.213.0.12"}
    assert annotate["info"]["stats"]["engine_hosts"]
    assert runs["train"]["params"]["train.deepspeed.zero_stage"] == "2"


def test_pipeline_with_the_sharded_item_table(cluster):
    run = os.environ.get("EIMF_TEST_RUN_PREFIX", "") + "cl-sharded"
    status, logs = _submit(cluster, [*PIPELINE, f"pipeline.run_name={run}", "train.strategy=sharded",
                                     "semantic.annotator=metadata", "semantic.budget=5"])
    runs, _ = _check_pipeline(cluster, run, status, logs)
    assert runs["train"]["metrics"]["gathered_rows_per_step"] > 0
    print(f"{run}: {runs['train']['metrics']['gathered_rows_per_step']:,.0f} rows gathered per worker and step")


# ------------------------------------------------------------------------------------------------ faults
#: One training (jobs/train.py) long enough to be hit mid-way: DeepSpeed ZeRO-2, a worker on each worker host,
#: a checkpoint on S3 every 40 steps, the loss logged every 10.
FAULT_TRAIN = ["data.dataset=ml-100k", f"data.data_dir={BUCKET}/datasets", f"data.output_dir={BUCKET}/prepared",
               f"train.storage_path={BUCKET}/runs", "train.scaling.num_workers=2", "train.scaling.placement_strategy=STRICT_SPREAD",
               "train.strategy=deepspeed", "train.deepspeed.zero_stage=2", "train.max_steps=200", "train.eval_every=40",
               "train.log_every=10", "train.patience=100", "tracking.experiment=faults", "tracking.log_model=false"]


def _start_job(cluster, script: str, args) -> str:
    sid = f"{Path(script).stem}-{uuid.uuid4().hex[:8]}"
    r = cluster.exec_client(["ray", "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO),
                             "--submission-id", sid, "--entrypoint-num-cpus", "0", "--no-wait", "--",
                             "python", script, *args], cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return sid


def _job_status(cluster, sid: str) -> str:
    return cluster.python_on_client(
        "from ray.job_submission import JobSubmissionClient as C; "
        f"print(C({cluster.dashboard_url!r}).get_job_status({sid!r}).value)").strip().splitlines()[-1]


def _wait_job(cluster, sid: str, timeout: float) -> tuple:
    deadline = time.time() + timeout
    while (status := _job_status(cluster, sid)) in ("RUNNING", "PENDING"):
        assert time.time() < deadline, f"job {sid} still {status} after {timeout} s"
        time.sleep(10)  # each look starts a Python client: not too often on 2 cores
    logs = cluster.exec_client(["ray", "job", "logs", "--address", cluster.dashboard_url, sid], timeout=120).stdout
    return status, logs


#: Ray Train writes this once a checkpoint is registered (its upload complete): the one a resume loads.
REGISTERED = "checkpoint_manager_snapshot.json"


def _wait_for_checkpoint(cluster, folder: str, timeout: float = 900, contains: str = "") -> None:
    """Until a registered checkpoint is on S3 below ``folder`` (a checkpoint folder alone may be mid-upload), in a
    path that has ``contains``."""
    cluster.python_on_client(f"""
import time
from eimf import fs
deadline = time.time() + {timeout}
while not any(f.endswith({REGISTERED!r}) and {contains!r} in f for f in (fs.list_files({folder!r}) if fs.exists({folder!r}) else [])):
    assert time.time() < deadline, "no registered checkpoint"
    time.sleep(1)
""", timeout=timeout + 60)


def _metric_steps(cluster, run: str, key: str) -> list:
    creds = cluster.mlflow_job_credentials()
    return _client_json(cluster, f"""
import json, mlflow
c = mlflow.MlflowClient({cluster.mlflow_url!r})
exp = c.get_experiment_by_name("faults")
run = c.search_runs([exp.experiment_id], filter_string="tags.`eimf.run_name` = '{run}'")[0]
print(json.dumps({{"steps": sorted(m.step for m in c.get_metric_history(run.info.run_id, {key!r})),
                   "metrics": run.data.metrics, "tags": run.data.tags}}))
""", **creds)


def test_a_worker_host_lost_mid_training_is_replaced_and_training_resumes_from_s3(cluster):
    """SIGKILL to every process of w2 once a checkpoint is on S3; a fresh host joins 30 s later; Ray Train restarts the
    group from that checkpoint and the run ends complete: every logged step present, repeated only after the
    checkpoint it resumed from."""
    run = os.environ.get("EIMF_TEST_RUN_PREFIX", "") + "fault-host"
    sid = _start_job(cluster, "jobs/train.py", [*FAULT_TRAIN, f"train.run_name={run}"])
    _wait_for_checkpoint(cluster, f"{BUCKET}/runs/{run}")
    t_kill = time.time()
    cluster.kill_host("w2")
    time.sleep(30)
    fresh = cluster.add_worker()
    status, logs = _wait_job(cluster, sid, timeout=1200)
    recovered_s = time.time() - t_kill
    assert status == "SUCCEEDED", logs[-6000:]
    got = _metric_steps(cluster, run, "train/loss")
    m = got["metrics"]
    assert m["step"] == 200 and m["done"] == 1 and m["resumes"] == 1
    resumed_at = m["first_resume_step"]
    steps = got["steps"]
    assert sorted(set(steps)) == list(range(10, 201, 10)), "a logged step is missing"
    repeated = sorted(s for s in set(steps) if steps.count(s) > 1)
    assert all(s > resumed_at for s in repeated) and all(steps.count(s) == 2 for s in repeated)
    hosts = {got["tags"]["worker.0.host"], got["tags"]["worker.1.host"]}
    assert f"eimf-{fresh} (10.213.0.{10 + int(fresh[1:])})" in hosts and not any("eimf-w2" in h for h in hosts)
    print(f"host lost at a checkpoint: resumed from step {resumed_at}, {len(repeated)} logged steps repeated "
          f"({repeated}), job done {recovered_s:.0f} s after the kill")


def test_the_mlflow_server_down_for_60_s_neither_stops_training_nor_loses_its_metrics(cluster):
    """The tracking server is stopped for 60 s in the middle of a training and started again: the training goes on
    (no restart), and every step logged meanwhile reaches the server once it is back, none dropped."""
    run = os.environ.get("EIMF_TEST_RUN_PREFIX", "") + "fault-mlflow"
    sid = _start_job(cluster, "jobs/train.py", [*FAULT_TRAIN, f"train.run_name={run}"])
    _wait_for_checkpoint(cluster, f"{BUCKET}/runs/{run}")
    cluster.mlflow_server("--stop")
    time.sleep(60)
    assert _job_status(cluster, sid) == "RUNNING"
    cluster.mlflow_server("--background")
    status, logs = _wait_job(cluster, sid, timeout=1200)
    assert status == "SUCCEEDED", logs[-6000:]
    got = _metric_steps(cluster, run, "train/loss")
    m = got["metrics"]
    assert m["resumes"] == 0 and m["step"] == 200
    assert got["steps"] == list(range(10, 201, 10)), "a step logged during the outage is missing or doubled"
    assert m["tracking/metric_batches_dropped"] == 0 and m["tracking/metric_batches_retries"] > 0
    print(f"MLflow down 60 s: {m['tracking/metric_batches_retries']:.0f} retries, 0 dropped, no restart")


def test_the_driver_killed_and_the_same_job_submitted_again_skips_finished_stages_and_resumes(cluster):
    """SIGKILL to the pipeline's driver on the head while the EIMF stage trains (a checkpoint on S3); the same
    command submitted again with the same pipeline.run_name skips the finished stages from their S3 outputs and
    resumes the interrupted training from its checkpoint."""
    run = os.environ.get("EIMF_TEST_RUN_PREFIX", "") + "fault-driver"
    args = [*PIPELINE, f"pipeline.run_name={run}", "train.strategy=sharded", "semantic.annotator=metadata",
            "semantic.budget=5", "train.max_steps=300", "train.eval_every=40", "tracking.log_model=false"]
    sid = _start_job(cluster, "jobs/pipeline.py", args)
    root = f"{BUCKET}/pipelines/{run}"
    _wait_for_checkpoint(cluster, f"{BUCKET}/pipelines/stages/train", timeout=1200, contains=f"/{run}-train-")
    # inside the head's own PID namespace, a kill by name touches that host only
    killed = cluster.exec_host("head", ["pkill", "-9", "-f", "jobs/pipeline.py"])
    assert killed.returncode == 0
    status, _ = _wait_job(cluster, sid, timeout=300)
    assert status == "FAILED"
    status, logs = _submit(cluster, args)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "stage 4/6 train: running (interrupted (running): resuming" in logs
    files = _s3_text(cluster, root)
    summary = {s["stage"]: s["status"] for s in json.loads(files[f"{root[5:]}/summary.json"])["stages"]}
    assert summary == {"prepare": "skipped", "warmup": "skipped", "annotate": "skipped", "train": "ran",
                       "evaluate": "ran", "export": "ran"}
    train = json.loads(files[f"{root[5:]}/train/manifest.json"])
    assert train["status"] == "completed" and train["attempt"] == 2
    assert train["metrics"]["resumes"] == 1 and train["metrics"]["step"] == 300
    print(f"driver killed: resubmitted run skipped 3 stages, resumed training at step "
          f"{train['metrics'].get('first_resume_step')}")


def test_s3_slow_and_failing_and_a_lossy_link_the_pipeline_completes_through_retries(cluster):
    """Every host reaches S3 through a proxy that answers 5 % of requests with 503 SlowDown and drops 1 % of
    connections unanswered; w1's link is cut to 20 Mbit/s and drops 1 % of its packets each way. Preparation,
    checkpoints, the exported model and the MLflow artifacts (the tracking server writes them to S3 through the
    same proxy) all complete, each injected fault a request that was retried."""
    run = os.environ.get("EIMF_TEST_RUN_PREFIX", "") + "fault-s3"
    before = cluster.s3_fault_counts()
    cluster.set_s3_faults(slowdown=0.05, reset=0.01)
    cluster.set_link("w1", rate="20mbit", loss_pct=1.0)
    try:
        # fewer steps than the other pipelines: every stage still reads and writes S3, in less CI time
        status, logs = _submit(cluster, [*PIPELINE, f"pipeline.run_name={run}", "train.strategy=sharded",
                                         "semantic.annotator=metadata", "semantic.budget=5",
                                         "pipeline.warmup_steps=40", "train.max_steps=40", "train.eval_every=20"])
    finally:
        cluster.set_s3_faults(0.0, 0.0)
        cluster.set_link("w1")
    after = cluster.s3_fault_counts()
    _check_pipeline(cluster, run, status, logs)
    faults = {k: after[k] - before.get(k, 0) for k in after}
    assert faults["slowdowns"] > 0 and faults["resets"] > 0, faults
    print(f"S3 faults: {faults['requests']} requests through the proxy, {faults['slowdowns']} answered SlowDown, "
          f"{faults['resets']} dropped; all retried")


def test_a_worker_host_lost_with_none_to_replace_it_fails_in_bounded_time_naming_it(cluster):
    """With no host to take the lost one's place, the restart waits train.failure.restart_timeout_s for the resources, then
    the job fails with the lost host in its message (a STRICT_SPREAD group of 2 cannot run on 1 host)."""
    run = os.environ.get("EIMF_TEST_RUN_PREFIX", "") + "fault-none"
    victim = cluster.workers[-1]
    sid = _start_job(cluster, "jobs/train.py", [*FAULT_TRAIN, f"train.run_name={run}", "train.failure.restart_timeout_s=60"])
    _wait_for_checkpoint(cluster, f"{BUCKET}/runs/{run}")
    t_kill = time.time()
    cluster.kill_host(victim)
    status, logs = _wait_job(cluster, sid, timeout=900)
    failed_after = time.time() - t_kill
    assert status == "FAILED"
    assert f"training failed after losing host(s) eimf-{victim} (" in logs, logs[-4000:]
    print(f"host lost, none joined: the job failed {failed_after:.0f} s after the kill")
