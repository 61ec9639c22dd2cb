"""The pipeline job (jobs/pipeline.py, eimf/pipeline/).

Fast: fingerprints (what changes which stage), skip/rerun decisions from manifests, bad settings, the CLI.
End to end on real ML-100K (marked e2e): `ray job submit` of the pipeline to a separate local `ray start --head`
cluster with the SmolLM2 vLLM annotator, read back from an `mlflow server`; a rerun that skips finished stages
and a changed setting that reruns only the stages downstream of it; the pipeline with input, stage outputs,
checkpoints and MLflow artifacts on s3:// (moto); `python jobs/pipeline.py` as on a laptop, SIGKILLed during
EIMF training after a checkpoint, then run again: it resumes that checkpoint.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from eimf.config import load_config
from eimf.pipeline import STAGES, Pipeline, PipelineError, write_manifest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("EIMF_DATA_DIR", str(REPO.parent / "shared" / "data"))
VENV_BIN = str(Path(sys.executable).parent)
needs_ml100k = pytest.mark.skipif(not Path(DATA_DIR, "ml-100k").exists(), reason="ml-100k not in EIMF_DATA_DIR")

#: A small but complete pipeline on ML-100K: 100 warm-up and 100 EIMF steps.
SMALL = ["data.dataset=ml-100k", "pipeline.warmup_steps=100", "train.max_steps=100", "train.eval_every=50",
         "train.patience=100", "semantic.n_clusters=2"]


def _cfg(data, tmp_path, *overrides):
    """A pipeline config on ``data`` (the ``tiny_dataset`` fixture's overrides: no licensed files needed)."""
    return load_config(None, [*data, "pipeline.run_name=unit", f"pipeline.storage_path={tmp_path / 'pipelines'}",
                              f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}", *overrides])


def _fps(data, tmp_path, *overrides):
    return {p.name: p.fingerprint for p in Pipeline(_cfg(data, tmp_path, *overrides)).plan()}


# ------------------------------------------------------------------------------------------------- fast
def test_fingerprints_change_with_their_stage_config_and_everything_downstream(tiny_dataset, tmp_path):
    base = _fps(tiny_dataset, tmp_path)
    assert list(base) == list(STAGES) and len(set(base.values())) == len(STAGES)
    assert _fps(tiny_dataset, tmp_path) == base  # deterministic

    def changed(*overrides):
        now = _fps(tiny_dataset, tmp_path, *overrides)
        return [s for s in STAGES if now[s] != base[s]]

    assert changed("data.min_count=10") == list(STAGES)
    assert changed("pipeline.warmup_steps=200") == ["warmup", "annotate", "train", "evaluate", "export", "promote"]
    assert changed("model.dim=32") == ["warmup", "annotate", "train", "evaluate", "export", "promote"]
    assert changed("semantic.budget=20") == ["annotate", "train", "evaluate", "export", "promote"]
    assert changed("semantic.annotator=vllm") == ["annotate", "train", "evaluate", "export", "promote"]
    assert changed("eimf.lambda_sp=0.5") == ["train", "evaluate", "export", "promote"]
    assert changed("train.max_steps=7") == ["train", "evaluate", "export", "promote"]  # the warm-up has its own steps
    assert changed("pipeline.eval_splits=[test]") == ["evaluate", "export", "promote"]
    # the index ranks the validation that picks the best model, and the evaluation
    assert changed("retrieval.index=HNSW32") == ["warmup", "annotate", "train", "evaluate", "export", "promote"]
    assert changed("tracking.registered_model=mine") == ["export", "promote"]
    assert changed("pipeline.promote_margin=0.01") == ["promote"]
    # where things go and how fast they run: no stage changes
    assert changed("semantic.cache_dir=/elsewhere", "semantic.chunk_size=7", "semantic.vllm.concurrency=3",
                   "train.log_every=5", "train.failure.max_failures=9", "train.storage_path=/x",
                   f"tracking.tracking_uri=sqlite:///{tmp_path / 'other.db'}") == []


def test_plan_skips_only_completed_stages_with_the_same_fingerprint_and_present_outputs(tiny_dataset, tmp_path):
    p = Pipeline(_cfg(tiny_dataset, tmp_path))
    plans = {sp.name: sp for sp in p.plan()}
    assert all(not sp.skip and sp.reason == "not run yet" for sp in plans.values())
    out = tmp_path / "some_output"
    out.write_text("x")
    for name in ("prepare", "warmup", "annotate"):
        write_manifest(plans[name], "completed", 1, "t", outputs={"file": str(out)})
    write_manifest(plans["train"], "running", 1, "t")
    write_manifest(plans["evaluate"], "completed", 1, "t", outputs={"file": str(tmp_path / "gone")})
    again = {sp.name: sp for sp in Pipeline(_cfg(tiny_dataset, tmp_path)).plan()}
    assert [s for s in STAGES if again[s].skip] == ["prepare", "warmup", "annotate"]
    assert again["train"].reason.startswith("interrupted (running)")
    assert again["evaluate"].reason.startswith("outputs missing") and str(tmp_path / "gone") in again["evaluate"].reason
    assert again["export"].reason == "not run yet"
    # a changed semantic setting: annotate and everything after it run again, prepare and warmup stay
    changed = {sp.name: sp for sp in Pipeline(_cfg(tiny_dataset, tmp_path, "semantic.budget=3")).plan()}
    assert [s for s in STAGES if changed[s].skip] == ["prepare", "warmup"]
    assert changed["annotate"].reason == "config or inputs changed"
    # an output deleted after the fact: that stage runs again (its fingerprint is the same, so nothing else does)
    out.unlink()
    assert not any(sp.skip for sp in Pipeline(_cfg(tiny_dataset, tmp_path)).plan())
    # an unreadable manifest is not trusted
    out.write_text("x")
    Path(p.stage_dir("prepare"), "manifest.json").write_text("{not json")
    assert [sp.name for sp in Pipeline(_cfg(tiny_dataset, tmp_path)).plan() if sp.skip] == ["warmup", "annotate"]


def test_stage_names_and_layout(tiny_dataset, tmp_path):
    p = Pipeline(_cfg(tiny_dataset, tmp_path))
    assert p.root == str(tmp_path / "pipelines" / "unit")
    plans = p.plan()
    # stage folders are keyed by step and fingerprint in the store beside the runs; export and the promotion gate
    # stay the run's own
    steps = ("prepare", "train", "annotate", "train", "evaluate")
    assert [sp.dir for sp in plans] == [str(tmp_path / "pipelines" / "stages" / s / sp.fingerprint[:16])
                                        for s, sp in zip(steps, plans)] + [
        str(tmp_path / "pipelines" / "unit" / s) for s in ("export", "promote")]
    assert [sp.view for sp in plans] == [str(tmp_path / "pipelines" / "unit" / s) for s in STAGES]
    # the training stages' Ray Train run name carries the fingerprint: a changed config never resumes another's
    assert p.stage_run_name("train", plans[3].fingerprint) == f"unit-train-{plans[3].fingerprint[:8]}"
    s3 = Pipeline(_cfg(tiny_dataset, tmp_path, "pipeline.storage_path=s3://bucket/runs/"))
    assert s3.root == "s3://bucket/runs/unit" and s3.run_dir("annotate") == "s3://bucket/runs/unit/annotate"
    assert s3.store_dir("annotate", "ab" * 32) == "s3://bucket/runs/stages/annotate/" + "ab" * 8
    # storage defaults to train.storage_path, then <EIMF_HOME>/pipelines
    assert Pipeline(_cfg(tiny_dataset, tmp_path, "pipeline.storage_path=null", "train.storage_path=/r")).root == "/r/unit"
    generated = Pipeline(load_config(None, ["data.dataset=ml-100k"])).run_name
    assert generated.startswith("pipeline-ml-100k-comirec_sa-")


def test_run_calls_the_steps_in_order_with_their_inputs_and_skips_them_on_rerun(tiny_dataset, tmp_path, monkeypatch):
    """Pipeline.run on stand-in steps (no data, Ray or MLflow): what each step gets, and the skip on a rerun."""
    from eimf.steps import StepOutput

    calls = []

    def fake(name, outputs):
        def run(cfg, inputs, out_dir, tags, run_name, **kwargs):
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            files = {k: str(Path(out_dir) / v) for k, v in outputs.items()}
            for f in files.values():
                Path(f).write_text("x")
            calls.append((name, cfg, dict(inputs), out_dir, tags, run_name, kwargs))
            return StepOutput(files, {"n": 1.0})
        return run

    for module, name, outputs in [("prepare", "prepare", {"data_path": "data"}),
                                  ("annotate", "annotate", {"annotations": "annotations.parquet"}),
                                  ("evaluate", "evaluate", {"metrics": "metrics.json"}),
                                  ("export", "export", {"model_dir": "model"})]:
        monkeypatch.setattr(f"eimf.steps.{module}.run", fake(name, outputs))
    monkeypatch.setattr("eimf.steps.train.run", fake("train", {"model_dir": "export"}))
    monkeypatch.setattr("eimf.pipeline.data_fingerprint", lambda data_cfg: "fixed")
    monkeypatch.setattr("eimf.ray_init.init_ray", lambda **kw: None)
    cfg = _cfg(tiny_dataset, tmp_path, "tracking.enabled=false", "pipeline.warmup_steps=7", "train.max_steps=9")
    results = Pipeline(cfg).run()
    root = tmp_path / "pipelines" / "unit"
    where = {sp.name: Path(sp.dir) for sp in Pipeline(cfg).plan()}  # each stage's folder (the store's)
    assert [r.status for r in results] == ["ran"] * (len(STAGES) - 1)  # tracking off: nothing registered, no gate
    assert [c[0] for c in calls] == ["prepare", "train", "annotate", "train", "evaluate", "export"]
    prep, warm, ann, train, ev, exp = calls
    assert prep[3] == str(where["prepare"]) and prep[2] == {"data_fingerprint": "fixed"}  # taken once, by the plan
    assert warm[2] == {"data_path": str(where["prepare"] / "data")} and warm[1].train.max_steps == 7
    assert ann[2] == {"model_dir": str(where["warmup"] / "export")} and ann[3] == str(where["annotate"] / "annotations")
    assert ann[1].semantic.cache_dir == str(where["annotate"] / "cache")
    assert train[2] == {"data_path": str(where["prepare"] / "data"),
                        "annotations": str(where["annotate"] / "annotations" / "annotations.parquet")}
    assert train[1].train.max_steps == 9 and train[1].tracking.registered_model == ""  # export registers
    assert ev[2] == {"model_dir": str(where["train"] / "export")} and ev[6] == {"splits": ("valid", "test")}
    assert exp[2]["metrics"] == str(where["evaluate"] / "metrics.json") and exp[3] == str(root / "export")
    assert set(exp[6]["lineage"]["stages"]) == set(STAGES) - {"promote"}
    assert all(c[5].startswith("unit-") for c in calls)
    assert (root / "summary.md").exists()
    calls.clear()
    assert [r.status for r in Pipeline(cfg).run()] == ["skipped"] * (len(STAGES) - 1) and calls == []
    Pipeline(_cfg(tiny_dataset, tmp_path, "tracking.enabled=false", "pipeline.warmup_steps=7", "train.max_steps=9",
                  "semantic.budget=3")).run()
    assert [c[0] for c in calls] == ["annotate", "train", "evaluate", "export"]


def test_eimf_stage_keeps_the_distributed_setup_and_reads_memory_input(tmp_path):
    """cluster/gpu.yaml trains with DeepSpeed on 4 GPU workers and the Ray Data cut: the EIMF stage keeps the
    workers, strategy and ZeRO stage (the DeepSpeed runner trains the head) and only switches to memory input,
    which carries the typical users' semantic vectors."""
    from eimf.pipeline import stage_config
    from eimf.steps.train import eimf_train_config

    gpu = load_config(None, ["train.scaling.num_workers=4", "train.strategy=deepspeed", "train.deepspeed.zero_stage=2",
                             "train.input=ray_data", "train.scaling.use_gpu=true", "train.batch_size=512"])
    t, note = eimf_train_config(gpu.train)
    assert (t.scaling.num_workers, t.strategy, t.deepspeed.zero_stage, t.input) == (4, "deepspeed", 2, "memory")
    assert t.scaling.use_gpu and t.batch_size == 512 and "ray_data -> memory" in note
    plain, note = eimf_train_config(load_config(None, []).train)
    assert note is None and plain == load_config(None, []).train
    # the fingerprint hashes what the stage runs: the input mode is not part of the EIMF stage's, ZeRO is
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("eimf.pipeline.data_fingerprint", lambda data_cfg: "fixed")
        cut = load_config(None, ["train.input=ray_data"])
        assert stage_config(cut, "train") == stage_config(load_config(None, []), "train")
        ds = load_config(None, ["train.strategy=deepspeed", "train.deepspeed.zero_stage=2"])
        assert stage_config(ds, "train") != stage_config(load_config(None, []), "train")


def test_bad_settings_fail_naming_the_field(tmp_path):
    # the config's own checks (eimf/config/ __post_init__) fail before a Pipeline exists
    with pytest.raises(PipelineError, match="pipeline.warmup_steps"):
        load_config(None, ["pipeline.warmup_steps=0"])
    with pytest.raises(PipelineError, match="pipeline.eval_splits"):
        load_config(None, ["pipeline.eval_splits=[train]"])
    with pytest.raises(PipelineError, match="pipeline.run_name"):
        load_config(None, ["pipeline.run_name=a/b"])


def _script(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "jobs" / "pipeline.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env={**os.environ, **(env or {})})


def test_cli_plan_and_errors(tiny_dataset, tmp_path):
    r = _script("--plan", *tiny_dataset, "pipeline.run_name=cli", f"pipeline.storage_path={tmp_path}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(STAGES) and all(" run " in line for line in lines)
    assert not (tmp_path / "cli").exists()  # --plan writes nothing
    r = _script("nope.key=1")
    assert r.returncode == 2 and "pipeline: error" in r.stderr and "nope" in r.stderr
    r = _script("data.dataset=ml-100k", "pipeline.warmup_steps=0")
    assert r.returncode == 2 and "pipeline.warmup_steps must be >= 1" in r.stderr
    r = _script("--plan", "not-an-override")
    assert r.returncode == 2 and "not a key=value override: not-an-override" in r.stderr
    r = _script("--plan", "data.dataset=ml-100k", f"data.data_dir={tmp_path / 'none'}")
    assert r.returncode == 2 and str(tmp_path / "none") in r.stderr


# ------------------------------------------------------------------------------------------- end to end
def _kill_processes_mentioning(marker: str) -> int:
    """SIGKILL every process whose command line names ``marker`` (a test's own temp folder): only what this
    test started, never another user's Ray."""
    import psutil

    killed = 0
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(marker in part for part in (p.info["cmdline"] or [])):
                p.kill()
                killed += 1
        except psutil.Error:
            pass
    return killed


@pytest.fixture(scope="module")
def ray_head(free_port):
    """A separate local Ray cluster: `ray start --head --block` in its own process group, 2 CPUs, its own temp
    folder and ports, token auth off on both sides. Stopped by killing that process group (never `ray stop`,
    which would stop every Ray on the machine)."""
    temp = tempfile.mkdtemp(prefix="eimfray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    port, dash, client, agent = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp, "head.log"), "w")
    proc = subprocess.Popen(
        [os.path.join(VENV_BIN, "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    try:
        while True:
            try:
                if requests.get(f"{url}/api/version", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not start: {Path(temp, 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": url, "temp": temp, "env": env}
    finally:
        try:  # a throwaway cluster: a short grace, then SIGKILL (its graceful stop took ~30 s)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_processes_mentioning(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _job_env(**extra) -> dict:
    # vLLM on CPU: one OpenMP thread on core 0 unless told otherwise (on a shared 2-core box more threads spin).
    env = {"EIMF_DATA_DIR": DATA_DIR, "RAY_USAGE_STATS_ENABLED": "0",
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions")),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")}
    env.update(extra)
    return env


def _submit(head, args, env, timeout=1500):
    """`ray job submit` of jobs/pipeline.py with the repository as working dir; waits for the end.
    -> (status, logs, seconds)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    sid = f"pipeline-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    r = subprocess.run(
        [os.path.join(VENV_BIN, "ray"), "job", "submit", "--address", head["url"], "--working-dir", str(REPO),
         "--submission-id", sid, "--no-wait", "--runtime-env-json", json.dumps({"env_vars": env}),
         "--", "python", "jobs/pipeline.py", *args],
        capture_output=True, text=True, env=head["env"], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this client, like the CLI above
    try:
        client = JobSubmissionClient(head["url"])
        deadline = time.time() + timeout
        while True:
            status = client.get_job_status(sid)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            if time.time() > deadline:
                client.stop_job(sid)
                raise AssertionError(f"job {sid} still {status} after {timeout} s:\n"
                                     f"{client.get_job_logs(sid)[-5000:]}")
            time.sleep(2)
        return str(status.value), client.get_job_logs(sid), time.time() - t0
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def _manifests(root, stages=STAGES):
    from eimf import fs

    return {s: fs.read_json(fs.join(root, s, "manifest.json")) for s in stages}


def _summary(root):
    from eimf import fs

    return {s["stage"]: s for s in fs.read_json(fs.join(root, "summary.json"))["stages"]}


def _rest(url, path, **params):
    r = requests.get(f"{url}/api/2.0/mlflow/{path}", params=params, timeout=30)
    r.raise_for_status()
    return r.json()


def _runs(url, experiment):
    exp = _rest(url, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    runs = requests.post(f"{url}/api/2.0/mlflow/runs/search", json={"experiment_ids": [exp["experiment_id"]]},
                         timeout=30).json()["runs"]
    return [{"id": r["info"]["run_id"], "name": r["info"]["run_name"], "status": r["info"]["status"],
             "tags": {t["key"]: t["value"] for t in r["data"].get("tags", [])},
             "metrics": {m["key"]: m["value"] for m in r["data"].get("metrics", [])}} for r in runs]


@pytest.fixture(scope="module")
def vllm_pipeline(ray_head, mlflow_server, smollm2_dir, tmp_path_factory):
    """The pipeline submitted as a Ray job with the SmolLM2 vLLM annotator (4 typical users), local storage."""
    if not Path(DATA_DIR, "ml-100k").exists():
        pytest.skip("ml-100k not in EIMF_DATA_DIR")
    tmp = tmp_path_factory.mktemp("vllm_pipeline")
    args = [*SMALL, "pipeline.run_name=pl-vllm", f"pipeline.storage_path={tmp / 'pipelines'}",
            f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=pipeline-vllm",
            "semantic.annotator=vllm", "semantic.budget=4", f"semantic.vllm.model={smollm2_dir}",
            "semantic.max_attempts=2", "semantic.max_tokens=320", "semantic.token_budget=600",
            "semantic.vllm.max_num_seqs=4", "semantic.vllm.timeout_s=1200"]
    env = _job_env(EIMF_HOME=str(tmp / "home"))
    status, logs, secs = _submit(ray_head, args, env)
    print(f"vllm pipeline job: {status} in {secs:.0f} s")
    return {"status": status, "logs": logs, "seconds": secs, "root": str(tmp / "pipelines" / "pl-vllm"),
            "args": args, "env": env, "tmp": tmp}


@pytest.mark.e2e
def test_pipeline_job_with_vllm_annotator_succeeds_and_logs_to_mlflow(vllm_pipeline, mlflow_server):
    v = vllm_pipeline
    assert v["status"] == "SUCCEEDED", v["logs"][-6000:]
    # progress while it runs: a line per stage start and end, then the summary table
    for i, s in enumerate(STAGES, 1):
        assert f"[pipeline pl-vllm] stage {i}/7 {s}: running" in v["logs"]
        assert f"[pipeline pl-vllm] stage {i}/7 {s}: done in" in v["logs"]
    assert "pipeline pl-vllm: completed" in v["logs"] and "| stage " in v["logs"]
    root = v["root"]
    m = _manifests(root)
    assert all(m[s]["status"] == "completed" and m[s]["stage"] == s for s in STAGES)
    assert m["annotate"]["inputs"] == {"warmup": m["warmup"]["fingerprint"]}
    assert m["train"]["inputs"] == {"prepare": m["prepare"]["fingerprint"], "annotate": m["annotate"]["fingerprint"]}
    assert m["annotate"]["info"]["annotator"] == "vllm" and m["annotate"]["info"]["model"].startswith("vllm:")
    assert m["annotate"]["metrics"]["selected"] == 4 and m["annotate"]["metrics"]["prompts"] >= 1
    assert m["annotate"]["metrics"]["valid_share"] > 0
    # stage folders live in the store beside the runs (keyed by fingerprint); the run folder has their manifests
    assert all(m[s]["dir"] == os.path.join(os.path.dirname(root), "stages", m[s]["step"], m[s]["fingerprint"][:16])
               for s in STAGES[:-2]) and m["export"]["dir"] == os.path.join(root, "export")
    assert m["promote"]["dir"] == os.path.join(root, "promote") and m["promote"]["info"]["decision"]["promoted"]
    assert Path(m["annotate"]["info"]["cache_dir"]) == Path(m["annotate"]["dir"], "cache")
    assert glob.glob(os.path.join(m["annotate"]["dir"], "cache", "part-*.parquet"))
    assert m["warmup"]["metrics"]["step"] == 100 and m["train"]["metrics"]["step"] == 100
    assert m["train"]["metrics"]["best_valid/recall@50"] > 0.05
    for stage in ("prepare", "warmup", "annotate", "train", "evaluate", "export"):
        for path in m[stage]["outputs"].values():
            assert os.path.exists(path), (stage, path)
    final = Path(m["export"]["outputs"]["model_dir"])
    assert final == Path(root, "export", "model")
    assert {"model.pt", "config.yaml", "eimf_head.pt", "evaluation.json", "pipeline.json"} <= {
        f.name for f in final.iterdir()}
    lineage = json.loads((final / "pipeline.json").read_text())
    assert {k: v["fingerprint"] for k, v in lineage["stages"].items()} == {s: m[s]["fingerprint"] for s in STAGES}
    assert load_config(final / "config.yaml").eimf.enabled
    summary = _summary(root)
    assert [summary[s]["status"] for s in STAGES] == ["ran"] * 7
    assert set(json.loads((final / "evaluation.json").read_text())) >= {"valid/recall@50", "test/recall@50",
                                                                         "test/mostpop/recall@50"}

    # MLflow, read back through the server's REST API: the parent run and one child per stage
    runs = _runs(mlflow_server, "pipeline-vllm")
    parent = [r for r in runs if r["tags"].get("stage") == "pipeline"]
    assert len(parent) == 1 and parent[0]["name"] == "pl-vllm" and parent[0]["status"] == "FINISHED"
    pid = parent[0]["id"]
    children = {r["tags"]["stage"]: r for r in runs if r["tags"].get("mlflow.parentRunId") == pid}
    assert set(children) == set(STAGES) and len(runs) == 8
    for s in STAGES:
        assert children[s]["status"] == "FINISHED" and children[s]["id"] == m[s]["mlflow_run_id"]
        assert children[s]["tags"]["pipeline.fingerprint"] == m[s]["fingerprint"]
    assert children["train"]["tags"]["eimf"] == "on" and children["warmup"]["tags"]["eimf"] == "off"
    assert children["annotate"]["tags"]["annotator"] == "vllm"
    assert children["annotate"]["metrics"]["annotate/selected"] == 4
    assert children["train"]["metrics"]["test/recall_at_50"] == pytest.approx(m["train"]["metrics"]["test/recall@50"])
    assert parent[0]["metrics"]["test/recall_at_50"] == pytest.approx(m["evaluate"]["metrics"]["test/recall@50"])
    assert parent[0]["metrics"]["pipeline/annotate_ran"] == 1.0
    arts = {a["path"] for a in _rest(mlflow_server, "artifacts/list", run_id=pid)["files"]}
    assert {"pipeline_summary.json", "pipeline_summary.md"} <= arts
    table = requests.get(f"{mlflow_server}/get-artifact", params={"path": "pipeline_summary.json", "run_uuid": pid},
                         timeout=30).json()
    assert [row[table["columns"].index("stage")] for row in table["data"]] == list(STAGES)
    assert {"annotations"} <= {a["path"] for a in _rest(mlflow_server, "artifacts/list",
                                                        run_id=children["annotate"]["id"])["files"]}
    for stage in ("train", "export"):  # the model folder stored once per run: inside its pyfunc model
        listed = _rest(mlflow_server, "artifacts/list", run_id=children[stage]["id"])
        files = {a["path"] for a in listed.get("files", [])}  # an export run may have no run artifacts at all
        run_tags = {t["key"]: t["value"] for t in _rest(mlflow_server, "runs/get", run_id=children[stage]["id"])[
            "run"]["data"]["tags"]}
        assert "model" not in files and run_tags["model_uri"], (stage, files)


@pytest.mark.e2e
def test_rerun_skips_finished_stages_and_a_changed_setting_reruns_only_downstream(vllm_pipeline, ray_head,
                                                                                   mlflow_server):
    v = vllm_pipeline
    if v["status"] != "SUCCEEDED":
        pytest.fail("the first pipeline run failed (see the test above)")
    root = v["root"]
    before = _manifests(root)
    status, logs, secs = _submit(ray_head, v["args"], v["env"])
    assert status == "SUCCEEDED", logs[-5000:]
    print(f"rerun job: {secs:.0f} s")
    summary = _summary(root)
    assert [summary[s]["status"] for s in STAGES] == ["skipped"] * 7
    assert _manifests(root) == before  # nothing rewritten
    assert "stage 3/7 annotate: skipped (unchanged, outputs present" in logs
    runs = _runs(mlflow_server, "pipeline-vllm")
    assert len(runs) == 8  # no new child run: the parent is continued

    # a changed evaluation setting, run as on a laptop (`python jobs/pipeline.py`; these stages need no Ray)
    env = {k: val for k, val in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(v["env"])
    t0 = time.time()
    r = subprocess.run([sys.executable, "jobs/pipeline.py", *v["args"], "pipeline.eval_splits=[test]"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"laptop rerun with a changed eval setting: {time.time() - t0:.0f} s")
    summary = _summary(root)
    assert [summary[s]["status"] for s in STAGES] == ["skipped"] * 4 + ["ran"] * 3  # the gate meets v1 again
    after = _manifests(root)
    assert all(after[s] == before[s] for s in STAGES[:4])
    assert after["evaluate"]["fingerprint"] != before["evaluate"]["fingerprint"]
    assert set(after["evaluate"]["metrics"]) == {k for k in before["evaluate"]["metrics"] if k.startswith("test/")}
    assert "| evaluate | ran" in r.stdout and "| annotate | skipped" in r.stdout
    runs = _runs(mlflow_server, "pipeline-vllm")
    parent = next(x for x in runs if x["tags"].get("stage") == "pipeline")
    evals = [x for x in runs if x["tags"].get("stage") == "evaluate"]
    assert len(runs) == 11 and len(evals) == 2 and all(x["tags"]["mlflow.parentRunId"] == parent["id"] for x in evals)


@pytest.mark.e2e
@needs_ml100k
def test_pipeline_on_s3_input_outputs_checkpoints_and_mlflow_artifacts(ray_head, moto_s3, moto_s3_endpoint,
                                                                       tmp_path):
    from eimf import fs

    fs.upload_dir(os.path.join(DATA_DIR, "ml-100k"), "s3://eimf-test/datasets/ml-100k")
    s3_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
              "AWS_ENDPOINT_URL": moto_s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": moto_s3_endpoint,
              "EIMF_ARTIFACT_ROOT": "s3://eimf-test/mlartifacts"}
    args = [*SMALL, "pipeline.run_name=pl-s3", "data.data_dir=s3://eimf-test/datasets",
            "pipeline.storage_path=s3://eimf-test/pipelines", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
            "semantic.annotator=metadata", "semantic.budget=5"]
    status, logs, secs = _submit(ray_head, args, _job_env(EIMF_HOME=str(tmp_path / "home"), **s3_env))
    print(f"s3 pipeline job: {status} in {secs:.0f} s")
    assert status == "SUCCEEDED", logs[-6000:]
    root = "s3://eimf-test/pipelines/pl-s3"
    m = _manifests(root)
    assert all(m[s]["status"] == "completed" for s in STAGES)
    assert m["prepare"]["outputs"]["data_path"].startswith(f"{m['prepare']['dir']}/ml-100k/")
    # every output in the stage store beside the runs, or the run's own folder (export)
    assert all(p.startswith(("s3://eimf-test/pipelines/stages/", root + "/")) for s in STAGES
               for p in m[s]["outputs"].values())
    assert all(fs.exists(p) for s in STAGES for p in m[s]["outputs"].values())
    assert any(f.startswith("checkpoint_") for f in fs.list_files(m["train"]["outputs"]["run_dir"]))
    assert {"model.pt", "eimf_head.pt", "evaluation.json"} <= set(fs.list_files(f"{root}/export/model"))
    assert any(f.startswith("part-") for f in fs.list_files(f"{m['annotate']['dir']}/cache"))
    assert not (tmp_path / "home" / "pipelines").exists()  # nothing went to the local disk instead
    assert fs.read_json(f"{root}/summary.json")["status"] == "completed"
    # MLflow artifacts went to S3 as well
    from eimf import tracking

    c = tracking.client(f"sqlite:///{tmp_path / 'm.db'}")
    exp = c.get_experiment_by_name("eimf-ml-100k")
    assert exp.artifact_location == "s3://eimf-test/mlartifacts"
    parent = c.search_runs([exp.experiment_id], filter_string="tags.stage = 'pipeline'")[0]
    art = parent.info.artifact_uri
    assert art.startswith("s3://eimf-test/mlartifacts/")
    assert {"pipeline_summary.json", "pipeline_summary.md"} <= set(fs.list_files(art))
    children = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {r.data.tags["stage"] for r in children} == set(STAGES)


@pytest.mark.e2e
@needs_ml100k
def test_laptop_run_killed_during_training_resumes_from_its_checkpoint(tmp_path):
    """`python jobs/pipeline.py` with no cluster (Ray starts in the process), SIGKILLed with its whole process
    group once the EIMF training stage has a checkpoint; the same command again skips the finished stages and
    resumes training from that checkpoint."""
    ray_tmp = tempfile.mkdtemp(prefix="eimfrl", dir="/tmp")  # this run's Ray lives here, found by it at cleanup
    storage = tmp_path / "pipelines"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(_job_env(EIMF_HOME=str(tmp_path / "home"), RAY_TMPDIR=ray_tmp))
    args = ["data.dataset=ml-100k", "pipeline.run_name=pl-kill", f"pipeline.storage_path={storage}",
            "pipeline.warmup_steps=100", "train.max_steps=300", "train.eval_every=100", "train.patience=100",
            "semantic.annotator=metadata", "semantic.budget=5", "semantic.n_clusters=2"]
    cmd = [sys.executable, "jobs/pipeline.py", *args]
    snapshots = str(storage / "stages" / "train" / "*" / "pl-kill-train-*" / "checkpoint_manager_snapshot.json")
    try:
        t0 = time.time()
        with open(tmp_path / "first.log", "w") as logf:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            deadline = time.time() + 900
            while not glob.glob(snapshots):
                assert proc.poll() is None, f"finished before it could be killed:\n{(tmp_path / 'first.log').read_text()[-4000:]}"
                assert time.time() < deadline, "no training checkpoint in 900 s"
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        print(f"killed after {time.time() - t0:.0f} s")
        _kill_processes_mentioning(ray_tmp)  # whatever of its local Ray outlived the process group
        m = _manifests(storage / "pl-kill", STAGES[:4])
        assert [m[s]["status"] for s in STAGES[:4]] == ["completed"] * 3 + ["running"]
        assert not (storage / "pl-kill" / "summary.json").exists()

        t1 = time.time()
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                           start_new_session=True)
        print(f"resumed run: {time.time() - t1:.0f} s")
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        assert "stage 4/7 train: running (interrupted (running): resuming" in r.stderr
        summary = _summary(storage / "pl-kill")
        assert [summary[s]["status"] for s in STAGES] == ["skipped"] * 3 + ["ran"] * 4
        train = _manifests(storage / "pl-kill", ["train"])["train"]
        assert train["status"] == "completed" and train["attempt"] == 2
        assert train["metrics"]["step"] == 300
        assert train["metrics"]["resumes"] == 1 and train["metrics"]["first_resume_step"] >= 100
        # one MLflow run for the training stage, continued, under the one pipeline run
        from eimf import tracking

        c = tracking.client(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
        exp = c.get_experiment_by_name("eimf-ml-100k")
        runs = c.search_runs([exp.experiment_id])
        parent = [x for x in runs if x.data.tags.get("stage") == "pipeline"]
        assert len(parent) == 1 and parent[0].info.status == "FINISHED"
        trains = [x for x in runs if x.data.tags.get("stage") == "train"]
        assert len(trains) == 1 and trains[0].info.run_id == train["mlflow_run_id"]
        assert trains[0].data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        steps = {x.step for x in c.get_metric_history(trains[0].info.run_id, "valid/recall_at_50")}
        assert steps == {100, 200, 300}
    finally:
        _kill_processes_mentioning(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
