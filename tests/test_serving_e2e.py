"""Serving end to end on real MovieLens-100K: a model trained for a few steps is registered in a real `mlflow
server`, loaded by a fresh process with `mlflow.pyfunc.load_model` after its data and run folders are deleted,
served by a real `mlflow models serve` and by the Ray Serve deployment, and bad requests are refused while the
servers keep serving."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from eimf.config import load_config

# the fuzz harness is a script (benchmarks/ is not a package): the CI subset runs the very code of the full run
_FUZZ_SPEC = importlib.util.spec_from_file_location(
    "serving_fuzz", Path(__file__).resolve().parents[1] / "benchmarks" / "serving_fuzz.py")
serving_fuzz = sys.modules.setdefault("serving_fuzz", importlib.util.module_from_spec(_FUZZ_SPEC))
_FUZZ_SPEC.loader.exec_module(serving_fuzz)  # dataclasses look their module up in sys.modules

DATA_DIR = os.environ.get("EIMF_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not Path(DATA_DIR, "ml-100k").exists(), reason="ml-100k not in EIMF_DATA_DIR")]
N_USERS = 100


@pytest.fixture(scope="module")
def registered(tmp_path_factory, mlflow_server, ray_session):
    """(model URI, reference answers of in-process exact retrieval for 100 test users, server URL, n_items)."""
    from eimf.formats.prepared import load_prepared
    from eimf.evaluation import ItemIndex, history_batch
    from eimf.serving.folder import ModelFolder
    from eimf.steps.train import train

    root = tmp_path_factory.mktemp("serving")
    cfg = load_config(None, [
        "data.dataset=ml-100k", f"data.data_dir={DATA_DIR}", f"data.output_dir={root / 'prepared'}",
        "train.max_steps=100", "train.eval_every=50", "train.log_every=50", f"train.storage_path={root / 'runs'}",
        "train.run_name=serving-e2e", f"tracking.tracking_uri={mlflow_server}"])
    result = train(cfg)
    assert result.model_uri and result.model_uri.startswith("models:/eimf-ml-100k/")

    folder = ModelFolder.load(result.export_dir)
    data = load_prepared(folder.data_path)
    users = data.test.iloc[:N_USERS]
    hist, mask = history_batch(list(users["history"]), cfg.model.maxlen)
    with torch.no_grad():
        v = folder.model.interests(torch.from_numpy(hist), torch.from_numpy(mask)).numpy()
    ids, scores = ItemIndex(folder.model.item_embeddings().detach().numpy(), index="Flat").search_multi(v, 50)
    raw = folder.items["raw_id"].to_numpy()
    reference = {"histories": [raw[np.asarray(h) - 1].tolist() for h in users["history"]],
                 "items": [raw[row - 1].tolist() for row in ids], "scores": scores.tolist()}
    shutil.rmtree(root / "prepared")  # the model must not need the data or the run any more
    shutil.rmtree(root / "runs")
    return result.model_uri, reference, mlflow_server, folder.n_items


def test_the_model_is_registered_with_a_signature(registered):
    from mlflow.tracking import MlflowClient

    uri, _, server, _ = registered
    name, version = uri.split("/")[1:]
    mv = MlflowClient(tracking_uri=server).get_model_version(name, version)
    assert mv.status == "READY"
    env = {**os.environ, "MLFLOW_TRACKING_URI": server}
    out = subprocess.run([sys.executable, "-c", (
        "import mlflow, json; i = mlflow.models.get_model_info(%r); "
        "print(json.dumps({'inputs': i.signature.inputs.input_names(), 'flavors': list(i.flavors)}))" % uri)],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["inputs"] == ["history", "k", "exclude_seen"] and "python_function" in got["flavors"]


def test_a_fresh_process_loads_it_and_matches_exact_retrieval(registered, tmp_path):
    uri, ref, server, _ = registered
    (tmp_path / "in.json").write_text(json.dumps(ref["histories"]))
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "h = json.load(open(sys.argv[2]))\n"
        "out = m.predict(pd.DataFrame({'history': h, 'k': [50] * len(h), 'exclude_seen': [False] * len(h)}))\n"
        "json.dump({'items': [list(x) for x in out['items']], 'scores': [list(x) for x in out['scores']]},"
        " open(sys.argv[3], 'w'))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": server}
    run = subprocess.run([sys.executable, "-c", script, uri, str(tmp_path / "in.json"), str(tmp_path / "out.json")],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["items"] == ref["items"]
    assert np.abs(np.asarray(got["scores"]) - np.asarray(ref["scores"])).max() < 1e-5


def _wait_http(url: str, proc, log: Path, timeout: float = 300, ok=lambda status: status < 500) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if ok(requests.get(url, timeout=2).status_code):
                return
        except requests.RequestException:  # not listening yet, or too busy starting to answer in 2 s
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer in {timeout} s: {log.read_text()[-3000:]}")


def _bad_requests(post, ok_body, n_items):
    """(name, body) of each bad request; ``post(body_bytes) -> (status, json or text)``."""
    return [
        ("empty history", {"history": []}),
        ("wrong type", {"history": [1.5, "x"]}),
        ("k <= 0", {"history": ok_body["history"], "k": 0}),
        ("k > catalogue", {"history": ok_body["history"], "k": n_items + 1}),
        ("only unknown ids", {"history": ["no-such-item"]}),
    ]


def test_mlflow_models_serve_answers_and_refuses_bad_requests(registered, free_port, tmp_path):
    uri, ref, server, n_items = registered
    port = free_port()
    log = tmp_path / "serve.log"
    # mlflow starts uvicorn by name: the venv's bin must be on PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": server,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{base}/ping", proc, log)

        def post(payload, raw=None):
            r = requests.post(f"{base}/invocations", data=raw if raw is not None else json.dumps(payload),
                              headers={"Content-Type": "application/json"}, timeout=120)
            return r.status_code, r.text

        good = {"history": ref["histories"][0][-10:] + ["no-such-item"], "k": 5}
        status, text = post({"dataframe_records": [good]})
        assert status == 200, text
        answer = json.loads(text)["predictions"][0]
        assert len(answer["items"]) == 5 and answer["unknown_ids"] == 1 and len(answer["titles"]) == 5
        for name, bad in _bad_requests(post, good, n_items):
            status, text = post({"dataframe_records": [bad]})
            assert 400 <= status < 500, (name, status, text[:500])
            assert post({"dataframe_records": [good]})[0] == 200, f"not serving after {name}"
        status, text = post(None, raw=b"{" * (10 * 2**20))  # a 10 MB body that is not JSON
        assert 400 <= status < 500, (status, text[:300])
        huge = json.dumps({"dataframe_records": [{"history": ["1"] * (10 * 2**20 // 6)}]})
        status, text = post(None, raw=huge.encode())  # 10 MB of valid JSON: too long a history
        assert 400 <= status < 500 and "at most" in text, (status, text[:300])
        assert post({"dataframe_records": [good]})[0] == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)


def test_ray_serve_batches_concurrent_requests_and_refuses_bad_ones(registered, free_port):
    from ray import serve

    from eimf.serving.ray_serve import app
    from eimf.serving.schema import RecommendRequest, RecommendResponse

    uri, ref, server, n_items = registered
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app({"model_uri": uri, "tracking_uri": server, "max_batch_size": 8, "num_cpus": 0.5}),
                  name="eimf", route_prefix="/")
        base = f"http://127.0.0.1:{port}"

        def post(payload, raw=None, headers=None):
            r = requests.post(f"{base}/recommend", data=raw if raw is not None else json.dumps(payload),
                              headers=headers or {"Content-Type": "application/json"}, timeout=120)
            return r.status_code, r.text

        # the published contract is the shared schema itself
        doc = requests.get(f"{base}/openapi.json", timeout=60).json()
        schemas = doc["components"]["schemas"]
        shared = RecommendRequest.model_json_schema(ref_template="#/components/schemas/{model}")["properties"]
        for name, field in schemas["RecommendRequest"]["properties"].items():  # FastAPI leaves "default": null out
            assert field == {k: v for k, v in shared[name].items() if k != "default"}, name
        assert set(schemas["RecommendResponse"]["properties"]) == set(RecommendResponse.model_fields)
        assert set(doc["paths"]["/recommend"]["post"]["responses"]) >= {"200", "400", "413", "422"}

        bodies = [{"history": h, "k": 10, "exclude_seen": False} for h in ref["histories"][:32]]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(post, bodies))
        for (status, text), expected in zip(answers, ref["items"]):
            assert status == 200, text
            assert json.loads(text)["items"] == expected[:10]
        good = bodies[0]
        for name, bad in _bad_requests(post, good, n_items):
            status, text = post(bad)
            assert status == 422, (name, status, text)
            error = json.loads(text)["error"]
            assert error["field"] in ("history", "history[0]", "k") and error["reason"], (name, error)
            assert post(good)[0] == 200, f"not serving after {name}"
        status, text = post(None, raw=b"x" * (10 * 2**20))
        assert status == 413 and json.loads(text)["error"]["reason"], (status, text[:200])
        status, text = post(None, raw=b"{not json")
        assert status == 400 and "not JSON" in json.loads(text)["error"]["reason"]
        status, text = post(None, raw=json.dumps(good), headers={"Content-Type": "text/plain"})
        assert status == 415, (status, text)
        assert post(good)[0] == 200
    finally:
        serve.shutdown()


def test_ray_serve_sheds_load_with_503_past_its_queue(registered, free_port):
    """One request at a time, one waiting (each held 0.5 s by the batch wait): the rest get 503 at once, the
    accepted ones are answered, and the server serves normally afterwards."""
    from ray import serve

    from eimf.serving.ray_serve import app

    uri, ref, server, _ = registered
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app({"model_uri": uri, "tracking_uri": server, "num_cpus": 0.5, "max_ongoing_requests": 1,
                       "max_queued_requests": 1, "batch_wait_timeout_s": 0.5}), name="eimf", route_prefix="/")
        url = f"http://127.0.0.1:{port}/recommend"
        good = {"history": ref["histories"][0], "k": 5, "exclude_seen": False}

        def post(_):
            t = time.monotonic()
            r = requests.post(url, json=good, timeout=120)
            return r.status_code, time.monotonic() - t, r.text

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(post, range(12)))
        codes = [a[0] for a in answers]
        assert set(codes) <= {200, 503} and codes.count(503) >= 6 and codes.count(200) >= 1, codes
        for status, seconds, text in answers:
            if status == 200:
                assert json.loads(text)["items"] == ref["items"][0][:5]
            else:  # refused at once, not after waiting in a queue
                assert seconds < 0.45, (status, seconds)
        assert post(0)[0] == 200
    finally:
        serve.shutdown()


def test_eimf_serve_answers_then_stops_on_ctrl_c_leaving_nothing_behind(registered, free_port, tmp_path):
    import psutil

    uri, ref, server, _ = registered
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MLFLOW_TRACKING_URI=server)
    # a process group of its own, so that SIGINT can go to the whole group, as a terminal's Ctrl-C sends it
    proc = subprocess.Popen([sys.executable, "-m", "eimf.cli", "serve", uri, "--port", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        # 200 only once the proxy routes to the app (it answers 404 before)
        _wait_http(f"http://127.0.0.1:{port}/health", proc, log, ok=lambda status: status == 200)
        r = requests.post(f"http://127.0.0.1:{port}/recommend", timeout=60,
                          json={"history": ref["histories"][0], "k": 5, "exclude_seen": False})
        assert r.status_code == 200 and r.json()["items"] == ref["items"][0][:5], r.text
        started = psutil.Process(proc.pid).children(recursive=True)  # its Ray: GCS, raylet, Serve's actors...
        assert len(started) >= 3
        t = time.monotonic()
        os.killpg(proc.pid, 2)  # Ctrl-C: its Ray's processes get the SIGINT too
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
        took = time.monotonic() - t
        time.sleep(1)
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [(p.pid, p.name()) for p in left]
        assert took < 15, took
        assert "stopped in" in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of its group is left, if the test failed
            os.killpg(proc.pid, 9)
        proc.wait()


FUZZ_REQUESTS = 300
FUZZ_SEED = 0


def _known_ids(ref) -> list:
    return list(dict.fromkeys(i for h in ref["histories"] for i in h))


def _assert_survived(result: dict) -> None:
    assert result["sent"] >= FUZZ_REQUESTS, result["sent"]
    assert result["2xx"] > 0 and result["4xx"] > 0, result["by_status"]
    assert result["pids_before"] and not result["crashed_or_restarted"], (result["pids_before"],
                                                                        result["pids_after"])
    assert result["rss_within_tolerance"], (result["rss_mb_before"], result["rss_mb_after"])
    assert result["same_answer"]
    assert result["slow"] == {"200": serving_fuzz.SLOW_SOCKETS}, result["slow"]  # slowloris bodies are answered
    assert result["abandoned"] > 0


def test_fuzzing_ray_serve_gives_no_5xx_and_leaves_it_serving(registered, free_port):
    """schemathesis against /openapi.json plus the hostile cases: every answer is a documented status in the
    documented shape, no 5xx, the replica and the proxy are the same processes after, in the same memory."""
    uri, ref, server, _ = registered
    result = serving_fuzz.fuzz_ray(uri, server, free_port(), _known_ids(ref), FUZZ_REQUESTS, FUZZ_SEED)
    assert set(result["pids_before"]) == {"ServeReplica:eimf:Recommend", "ProxyActor"}, result["pids_before"]
    assert result["5xx"] == 0 and result["503"] == 0, result["causes_5xx"]
    assert not result["dropped"], result["dropped"]
    assert not result["check_failures"], result["check_examples"]
    _assert_survived(result)


def test_fuzzing_eimf_serve_on_its_replicas_own_server_gives_no_5xx(registered, free_port, tmp_path):
    """The same fuzzing against `eimf serve` itself: with one replica its port is the replica's own HTTP server
    (Ray Serve's direct ingress), which the proxy no longer shields from slow, abandoned, huge or malformed
    requests. Then Ctrl-C (SIGINT to its group) must still stop it cleanly."""
    uri, ref, server, _ = registered
    log = tmp_path / "eimf-serve.log"
    port = free_port()
    result = serving_fuzz.fuzz_eimf_serve(uri, server, port, _known_ids(ref), FUZZ_REQUESTS, FUZZ_SEED, log)
    assert f"at http://127.0.0.1:{port}/recommend" in log.read_text() and "Ray's proxy at" in log.read_text(), \
        "the fuzzed port is not the replica's own server"
    assert set(result["pids_before"]) == {"ServeReplica:eimf:Recommend", "ProxyActor"}, result["pids_before"]
    assert result["5xx"] == 0 and result["503"] == 0, result["causes_5xx"]
    assert not result["dropped"], result["dropped"]
    assert not result["check_failures"], result["check_examples"]
    _assert_survived(result)
    assert result["exit_status"] == 0, log.read_text()[-3000:]


def test_fuzzing_mlflow_models_serve_gives_only_mlflows_own_5xx(registered, free_port, tmp_path):
    """hypothesis bodies in every input format plus the hostile cases. The only 5xx allowed are the MLflow-side
    causes listed in serving_fuzz.MLFLOW_CAUSES (docs/serving.md, "Faults that are MLflow's own"), and each must
    show an MLflow traceback in the server's log with no eimf frame in it."""
    uri, ref, server, _ = registered
    log = tmp_path / "mlflow-serve.log"
    result = serving_fuzz.fuzz_mlflow(uri, server, free_port(), _known_ids(ref), FUZZ_REQUESTS, FUZZ_SEED, log)
    named = {cause: serving_fuzz.mlflow_cause(cause, entry) for cause, entry in result["causes_5xx"].items()}
    assert None not in named.values(), result["causes_5xx"]
    # the known faults are still there (the hostile list has both), and alone
    assert set(named.values()) == set(serving_fuzz.MLFLOW_CAUSES), named
    assert result["503"] == 0
    _assert_survived(result)
