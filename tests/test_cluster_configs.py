"""The cluster files validate with the tools that consume them: ray_cluster.yaml with the Ray cluster
launcher's own validation, cluster/runtime_env.yaml with Ray's runtime_env parsing and packaging, every eimf
profile in cluster/ with eimf.config.load_config; the MLflow server script against moto's S3 (e2e)."""
from __future__ import annotations

import copy
import os
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
#: YAML files in cluster/ that are not eimf profiles.
NOT_PROFILES = {"runtime_env.yaml"}
PROFILE_ENV = {"EIMF_S3_BUCKET": "eimf-bucket", "EIMF_HEAD_IP": "10.0.1.23"}


def _launcher_config(raw: dict) -> dict:
    """What `ray up` does to a config before it talks to the cloud: defaults, then schema + checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def cluster_raw():
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_ray_cluster_yaml_passes_the_launcher_validation(cluster_raw):
    cfg = _launcher_config(cluster_raw)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert {"gpu_annotate", "gpu_train"} <= set(gpu_types)
    # Each GPU type advertises its own accelerator type, so engines asking for one cannot land on the other.
    accel = {name: {k for k in t["resources"] if k.startswith("accelerator_type:")} for name, t in gpu_types.items()}
    assert accel["gpu_annotate"] == {"accelerator_type:L4"} and accel["gpu_train"] == {"accelerator_type:A10G"}
    assert all(t["min_workers"] == 0 for name, t in types.items() if name != cfg["head_node_type"])
    assert sum(t["max_workers"] for name, t in types.items()) <= cfg["max_workers"] + head["max_workers"]
    # Every node installs the project; the head starts MLflow before Ray.
    assert any("cluster/setup_node.sh" in c for c in cfg["head_setup_commands"])
    assert any("cluster/setup_node.sh" in c for c in cfg["worker_setup_commands"])
    start = cfg["head_start_ray_commands"]
    mlflow_at = next(i for i, c in enumerate(start) if "cluster/mlflow_server.sh --background" in c)
    ray_at = next(i for i, c in enumerate(start) if "ray start --head" in c)
    assert mlflow_at < ray_at
    assert cfg["file_mounts"] == {"~/eimf": "."}
    for script in ("setup_node.sh", "mlflow_server.sh"):
        assert os.access(CLUSTER / script, os.X_OK), f"cluster/{script} must be executable"


@pytest.mark.parametrize("breakage", ["typo_in_node_type", "resources_not_integer", "head_type_missing"])
def test_the_launcher_validation_rejects_broken_variants(cluster_raw, breakage):
    """The check above can fail: the same validation rejects small mistakes in this very file."""
    import jsonschema

    raw = copy.deepcopy(cluster_raw)
    if breakage == "typo_in_node_type":
        raw["available_node_types"]["gpu_train"]["max_worker"] = 2
    elif breakage == "resources_not_integer":
        raw["available_node_types"]["gpu_annotate"]["resources"]["GPU"] = 0.5
    else:
        raw["head_node_type"] = "no_such_type"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _launcher_config(raw)


def test_cluster_shell_scripts_parse():
    for script in sorted(CLUSTER.glob("*.sh")):
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, f"{script.name}: {out.stderr}"


def test_mlflow_server_script_names_the_missing_setting(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("EIMF_S3_BUCKET", "EIMF_MLFLOW_ARTIFACTS")}
    env["EIMF_MLFLOW_DIR"] = str(tmp_path)
    out = subprocess.run([str(CLUSTER / "mlflow_server.sh"), "--background"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "EIMF_S3_BUCKET" in out.stderr


def test_runtime_env_parses_and_packages_the_right_files(tmp_path):
    from ray._private.runtime_env.packaging import _get_excludes, create_package, get_excludes_from_ignore_files
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    # Exactly what `ray job submit --runtime-env cluster/runtime_env.yaml` builds.
    spec = parse_runtime_env_args(runtime_env=str(CLUSTER / "runtime_env.yaml"))
    env = RuntimeEnv(**spec)
    assert env["working_dir"] == "."
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    with pytest.raises(TypeError):  # the parsing is strict: a non-string env var value is refused
        RuntimeEnv(**{**spec, "env_vars": {"X": 1}})

    # The package Ray uploads for working_dir ".", run from the repository root.
    target = tmp_path / "pkg.zip"
    create_package(str(ROOT), target, include_gitignore=True, excludes=env["excludes"])
    names = set(zipfile.ZipFile(target).namelist())
    for must in ("eimf/fs.py", "eimf/data/__init__.py", "jobs/train.py", "cluster/gpu.yaml", "pyproject.toml"):
        assert must in names, f"{must} missing from the job package"
    for prefix in (".venv/", ".eimf/"):
        assert not any(n.startswith(prefix) for n in names), f"{prefix} must not be uploaded with jobs"
    assert not any("__pycache__" in n for n in names)
    assert target.stat().st_size < 50 * 2**20

    # The same rules on paths that may not exist in this checkout.
    rules = [_get_excludes(ROOT, env["excludes"]), *get_excludes_from_ignore_files(ROOT, include_gitignore=True)]
    excluded = lambda rel: any(rule(ROOT / rel) for rule in rules)  # noqa: E731
    for rel in ("data/ml-1m/ratings.dat", "cluster/cluster.env", ".venv/bin/python", ".eimf/mlflow.db", "x.db"):
        assert excluded(rel), f"{rel} would be uploaded with jobs"
    for rel in ("eimf/data/preprocess.py", "cluster/cluster.env.example", "jobs/train.py"):
        assert not excluded(rel), f"{rel} would be left out of jobs"


def _profiles():
    return sorted(p for p in CLUSTER.glob("*.yaml") if p.name not in NOT_PROFILES)


def test_every_cluster_profile_loads(monkeypatch):
    from eimf.config import load_config

    for k, v in PROFILE_ENV.items():
        monkeypatch.setenv(k, v)
    profiles = _profiles()
    assert {p.name for p in profiles} >= {"gpu.yaml", "laptop.yaml"}
    for path in profiles:
        cfg = load_config(path)
        assert cfg.train.batch_size % cfg.train.scaling.num_workers == 0, path.name
        assert 0 <= cfg.train.deepspeed.zero_stage <= 3, path.name


def test_gpu_profile(monkeypatch):
    from eimf.config import load_config

    for k, v in PROFILE_ENV.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(CLUSTER / "gpu.yaml")
    assert cfg.train.scaling.use_gpu and cfg.train.scaling.num_workers == 4 and cfg.train.strategy == "deepspeed"
    assert cfg.train.storage_path == "s3://eimf-bucket/eimf/runs"
    assert cfg.data.output_dir.startswith("s3://eimf-bucket/") and cfg.semantic.cache_dir.startswith("s3://eimf-bucket/")
    assert cfg.tracking.tracking_uri == "http://10.0.1.23:5000"
    assert cfg.semantic.annotator == "vllm" and cfg.semantic.vllm.device == "gpu"
    assert "7B" in cfg.semantic.vllm.model and cfg.semantic.vllm.concurrency >= 1
    # The model the cluster downloads is the model the profile asks for.
    env_example = (CLUSTER / "cluster.env.example").read_text()
    assert f"EIMF_ANNOTATE_MODEL={cfg.semantic.vllm.model}\n" in env_example
    assert f'EIMF_ANNOTATE_MODEL:-{cfg.semantic.vllm.model}}}' in (ROOT / "ray_cluster.yaml").read_text()
    # Overrides still apply on top of the profile.
    assert load_config(CLUSTER / "gpu.yaml", ["train.scaling.num_workers=8"]).train.scaling.num_workers == 8


def test_gpu_profile_without_its_environment_names_variable_and_key(monkeypatch):
    from eimf.config import load_config

    monkeypatch.setenv("EIMF_S3_BUCKET", "eimf-bucket")
    monkeypatch.delenv("EIMF_HEAD_IP", raising=False)
    with pytest.raises(Exception, match=r"EIMF_HEAD_IP(.|\n)*tracking\.tracking_uri"):
        load_config(CLUSTER / "gpu.yaml")


@pytest.mark.parametrize("path", _profiles(), ids=lambda p: p.name)
def test_profiles_reject_unknown_keys(path, tmp_path, monkeypatch):
    from eimf.config import load_config

    for k, v in PROFILE_ENV.items():
        monkeypatch.setenv(k, v)
    raw = yaml.safe_load(path.read_text())
    raw.setdefault("train", {})["num_worker"] = 2  # typo
    bad = tmp_path / path.name
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match="num_worker"):
        load_config(bad)


# --- MLflow server with S3 artifacts (cluster/mlflow_server.sh) ---------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_mlflow_server_stores_artifacts_on_s3(moto_s3, moto_s3_endpoint, monkeypatch, tmp_path, free_port):
    """cluster/mlflow_server.sh with --artifacts-destination s3://... on moto: a request without credentials gets
    401; with the jobs' account, eimf.tracking logs a run over HTTP, the artifact lands in the bucket, and reads back
    through the server."""
    from eimf import tracking
    from eimf.config import Config

    port = free_port()
    env = dict(os.environ, EIMF_MLFLOW_DIR=str(tmp_path / "mlflow"), EIMF_MLFLOW_HOST="127.0.0.1",
               EIMF_MLFLOW_PORT=str(port), EIMF_MLFLOW_ARTIFACTS="s3://eimf-test/mlflow-artifacts",
               MLFLOW_S3_ENDPOINT_URL=moto_s3_endpoint)
    script = str(CLUSTER / "mlflow_server.sh")
    t0 = time.time()
    out = subprocess.run([script, "--background"], env=env, capture_output=True, text=True, timeout=200)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        uri = f"http://127.0.0.1:{port}"
        # basic auth: nothing without credentials; the jobs' account from job.env (mode 600) works
        import requests

        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(search, timeout=10).status_code == 401
        job_env = tmp_path / "mlflow" / "job.env"
        assert job_env.stat().st_mode & 0o077 == 0 and (tmp_path / "mlflow" / "basic_auth.ini").stat().st_mode & 0o077 == 0
        creds = dict(line.split("=", 1) for line in job_env.read_text().split())
        assert creds["MLFLOW_TRACKING_USERNAME"] == "eimf-jobs"
        assert requests.get(search, auth=("eimf-jobs", "not-the-password"), timeout=10).status_code == 401
        for k, v in creds.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("EIMF_ARTIFACT_ROOT", raising=False)
        cfg = Config()
        cfg.tracking.tracking_uri = uri
        cfg.tracking.experiment = "eimf-s3-test"
        run_id = tracking.start_run(cfg, "s3-artifacts-run")
        tracking.log_metrics(uri, run_id, {"valid/recall@50": 0.5}, step=1)
        folder = tmp_path / "export"
        folder.mkdir()
        (folder / "metrics.json").write_text('{"recall@50": 0.5}\n')
        tracking.log_artifacts(uri, run_id, str(folder), "model")
        tracking.end_run(uri, run_id)

        stored = [p for p in moto_s3.find("eimf-test/mlflow-artifacts") if p.endswith("model/metrics.json")]
        assert len(stored) == 1 and run_id in stored[0]
        assert moto_s3.cat_file(stored[0]) == b'{"recall@50": 0.5}\n'
        back = tracking.client(uri).download_artifacts(run_id, "model/metrics.json", str(tmp_path))
        assert Path(back).read_text() == '{"recall@50": 0.5}\n'
        run = tracking.client(uri).get_run(run_id)
        assert run.data.metrics["valid/recall_at_50"] == 0.5 and run.info.status == "FINISHED"
    finally:
        subprocess.run([script, "--stop"], env=env, capture_output=True, timeout=60)
    print(f"mlflow server round trip: {time.time() - t0:.1f}s")


# --- the GPU node stack (cluster/setup_node.sh) resolves --------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_gpu_node_requirements_resolve_together(tmp_path):
    """`setup_node.sh --check`: pip resolves the nodes' exact requirements (the CUDA vLLM with its torch, the
    TorchRec/FBGEMM pair, DeepSpeed, Ray) from the package index without installing anything. A conflict fails
    here, not on a cluster. Needs the package index (CI has it)."""
    import json
    import sys

    report = tmp_path / "report.json"
    out = subprocess.run([str(CLUSTER / "setup_node.sh"), "--check", str(report)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable), timeout=880)
    assert out.returncode == 0, out.stderr[-4000:]
    got = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
           for i in json.loads(report.read_text())["install"]}
    reqs = subprocess.run([str(CLUSTER / "setup_node.sh"), "--requirements"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), check=True).stdout.split()
    pinned = dict(r.split("==") for r in reqs if "==" in r)
    for name, version in pinned.items():
        assert got[name.split("[")[0].lower().replace("_", "-")] == version, name
    # vLLM's own torch pin decides the node's torch; FBGEMM 1.9 is built for that torch (setup_node.sh)
    assert got["vllm"] == "0.33.0" and got["torch"].startswith("2.14.")
    assert got["fbgemm-gpu"] == "1.9.0" and got["torchrec"] == "1.9.2"
