"""Serving without licensed data: the model folder round trip, the retrieval index setting, and the request
contract of the Recommender (raw ids in and out, interest attribution and labels, clear errors)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from eimf.config import load_config
from eimf.evaluation.retrieval import ItemIndex, auto_index, brute_force_topn
from eimf.serving.folder import ModelFolder, ModelFolderError, build_index
from eimf.serving.recommender import Recommender
from eimf.serving.schema import MAX_HISTORY, RequestError

N_ITEMS = 300


def _folder(with_head: bool = False, index: str = "Flat") -> ModelFolder:
    from eimf.models import build_model

    cfg = load_config(None, ["data.dataset=custom", "model.dim=16", "model.num_interests=3", "model.maxlen=8",
                             f"retrieval.index={index}", "eimf.predictor_hidden=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, N_ITEMS).eval()
    items = pd.DataFrame({"item": np.arange(1, N_ITEMS + 1), "raw_id": [f"sku-{i:04d}" for i in range(N_ITEMS)],
                          "text": [f"title {i}" for i in range(N_ITEMS)],
                          "count": np.arange(N_ITEMS, 0, -1)})
    head = phrases = None
    if with_head:
        from eimf.serving.explain import PhraseTable
        from eimf.modules.alignment import EIMFHead

        head = EIMFHead.from_config(cfg, 8).eval()
        vecs = np.eye(8, dtype=np.float32)[:4]
        phrases = PhraseTable(["jazz", "horror", "cooking", "travel"], ["", "", "", ""], vecs)
    return ModelFolder(model=model, cfg=cfg, items=items, index=build_index(model, cfg), metrics={"step": 1},
                       head=head, phrases=phrases, data_path=None)


def _raw(ids):
    return [f"sku-{i - 1:04d}" for i in ids]


# ------------------------------------------------------------------------------------------ index setting
def test_index_factory_strings_build_search_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((2001, 16)).astype(np.float32)
    q = rng.standard_normal((5, 3, 16)).astype(np.float32)
    exact, _ = brute_force_topn(table, q, 20)
    for spec, tol in (("Flat", 1.0), ("HNSW32", 0.9), ("IVF16,Flat", 0.9), ("IVF16,PQ4x4fs,RFlat", 0.8)):
        index = ItemIndex(table, index=spec, nprobe=16, ef_search=256, refine_k=8)
        ids, scores = index.search_multi(q, 20)
        got = np.mean([len(np.intersect1d(a, b)) / 20 for a, b in zip(ids, exact)])
        assert got >= tol, (spec, got)
        index.save(tmp_path / "i.faiss")
        again = ItemIndex.load(tmp_path / "i.faiss", spec, nprobe=16, ef_search=256, refine_k=8)
        ids2, scores2 = again.search_multi(q, 20)
        assert np.array_equal(ids, ids2) and np.allclose(scores, scores2)
    # only the parameters an index has are set
    assert set(ItemIndex(table, index="HNSW32").params) == {"efSearch"}
    assert set(ItemIndex(table, index="IVF16,Flat").params) == {"nprobe"}
    assert ItemIndex(table, index="Flat").params == {}


def test_index_setting_errors_and_auto():
    table = np.ones((11, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="retrieval index 'NotAnIndex'"):
        ItemIndex(table, index="NotAnIndex")
    with pytest.raises(ValueError, match="retrieval.nprobe must be >= 1"):
        load_config(None, ["retrieval.nprobe=0"])
    assert auto_index(1000) == "Flat" and auto_index(1_000_000) == "MIPS,IVF3072,Flat"
    assert ItemIndex(table, index="auto").spec == "Flat"


# ------------------------------------------------------------------------------------------- model folder
def test_model_folder_round_trip(tmp_path):
    f = _folder(with_head=True)
    f.write(str(tmp_path / "m"))
    g = ModelFolder.load(str(tmp_path / "m"))
    for (k, a), b in zip(f.model.state_dict().items(), g.model.state_dict().values()):
        assert torch.equal(a, b), k
    pd.testing.assert_frame_equal(f.items, g.items)
    assert g.index.spec == "Flat" and g.index.n_items == N_ITEMS
    assert g.phrases.names == f.phrases.names and np.allclose(g.phrases.vectors, f.phrases.vectors)
    for a, b in zip(f.head.state_dict().values(), g.head.state_dict().values()):
        assert torch.equal(a, b)
    assert g.metrics == {"step": 1}


def test_model_folder_errors_name_the_folder_and_file(tmp_path):
    with pytest.raises(ModelFolderError, match="no folder.json"):
        ModelFolder.load(str(tmp_path))
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="before the model folder format"):
        ModelFolder.load(str(tmp_path))
    _folder().write(str(tmp_path / "m"))
    (tmp_path / "m" / "index.faiss").unlink()
    with pytest.raises(ModelFolderError, match="missing index.faiss"):
        ModelFolder.load(str(tmp_path / "m"))


def test_model_folder_on_s3(moto_s3):
    _folder().write("s3://eimf-test/models/m1")
    rec = Recommender.load("s3://eimf-test/models/m1")
    assert rec.recommend([{"history": ["sku-0001"]}])[0]["items"]


# ------------------------------------------------------------------------------------------- recommender
def test_answers_equal_exact_retrieval_in_raw_ids():
    f = _folder()
    rec = Recommender(f)
    rng = np.random.default_rng(1)
    hists = [rng.integers(1, N_ITEMS + 1, size=n) for n in (1, 5, 8, 20)]
    table = f.model.item_embeddings().detach().numpy()
    for exclude in (False, True):
        answers = rec.recommend([{"history": _raw(h), "k": 25, "exclude_seen": exclude} for h in hists])
        for h, a in zip(hists, answers):
            last = torch.as_tensor(np.pad(h[-8:], (0, 8 - len(h[-8:])))[None])
            v = f.model.interests(last, last != 0).detach().numpy()
            ids, scores = brute_force_topn(table, v, 25, exclude=[h] if exclude else None)
            assert a["items"] == _raw(ids[0]) and np.allclose(a["scores"], scores[0], atol=1e-5)
            # the interest named for each item is the one that attains its score
            per = np.einsum("kd,nd->nk", v[0], table[ids[0]])
            assert a["interests"] == per.argmax(axis=1).tolist()
            assert np.allclose(per.max(axis=1), a["scores"], atol=1e-5)
            assert a["titles"][0] == f"title {ids[0][0] - 1}"
            assert a["history_used"] == min(len(h), 8) and a["unknown_ids"] == 0
            if exclude:
                assert not set(a["items"]) & set(_raw(h))


def test_unknown_ids_are_ignored_and_counted():
    rec = Recommender(_folder())
    a, b = rec.recommend([{"history": ["sku-0003", "nope", 12345, "sku-0010"]},
                          {"history": ["sku-0003", "sku-0010"]}])
    assert a["unknown_ids"] == 2 and a["history_used"] == 2
    assert a["items"] == b["items"]


@pytest.mark.parametrize("request_, field, match", [
    ({"history": []}, "history", "is empty"),
    ({"history": ["nope", "never"]}, "history", "none of the 2 ids is in the catalogue"),
    ({}, "history", "is required"),
    ({"history": "sku-0001"}, "history", "must be a list of item ids, got str"),
    ({"history": ["sku-0001", 1.5]}, "history[1]", "an item id is a string or an integer, got float"),
    ({"history": [None]}, "history[0]", "got NoneType"),
    ({"history": [True]}, "history[0]", "got bool"),
    ({"history": [""]}, "history[0]", "1 to 256 characters, got 0"),
    ({"history": ["x" * 300]}, "history[0]", "1 to 256 characters, got 300"),
    ({"history": ["sku-0001"], "k": 0}, "k", "must be >= 1, got 0"),
    ({"history": ["sku-0001"], "k": -3}, "k", "must be >= 1"),
    ({"history": ["sku-0001"], "k": N_ITEMS + 1}, "k", f"more than the catalogue's {N_ITEMS} items"),
    ({"history": ["sku-0001"], "k": 10**30}, "k", "at most 1000 per request"),
    ({"history": ["sku-0001"], "k": "ten"}, "k", "must be an integer, got str"),
    ({"history": ["sku-0001"], "k": "5"}, "k", "must be an integer, got str"),
    ({"history": ["sku-0001"], "k": True}, "k", "must be an integer, got bool"),
    ({"history": ["sku-0001"], "k": 2.5}, "k", "must be an integer, got float"),
    ({"history": ["sku-0001"], "exclude_seen": "yes"}, "exclude_seen", "must be true or false"),
    ({"history": ["sku-0001"], "exclude_seen": 1}, "exclude_seen", "must be true or false"),
    ({"history": ["sku-0001"], "user": 3}, "user", "unknown field"),
    ({"history": ["sku-0001"] * (MAX_HISTORY + 1)}, "history", f"at most {MAX_HISTORY}"),
    (["sku-0001"], None, "a request is an object"),
])
def test_bad_requests_get_a_clear_error(request_, field, match):
    rec = Recommender(_folder())
    with pytest.raises(RequestError, match=match) as e:
        rec.recommend([request_])
    assert e.value.field == field
    assert rec.recommend([{"history": ["sku-0001"], "k": 3}])[0]["items"]  # still serves


def test_a_bad_request_in_a_batch_is_named_by_position():
    rec = Recommender(_folder())
    with pytest.raises(RequestError, match=r"request 1\.k: must be >= 1"):
        rec.recommend([{"history": ["sku-0001"]}, {"history": ["sku-0001"], "k": 0}])


def test_k_up_to_the_whole_catalogue_and_fewer_after_exclusion():
    rec = Recommender(_folder())
    everything = rec.recommend([{"history": ["sku-0001"], "k": N_ITEMS, "exclude_seen": False}])[0]
    assert sorted(everything["items"]) == sorted(f"sku-{i:04d}" for i in range(N_ITEMS))
    rest = rec.recommend([{"history": ["sku-0001", "sku-0002"], "k": N_ITEMS}])[0]
    assert len(rest["items"]) == N_ITEMS - 2


def test_eimf_models_label_each_interest_with_the_nearest_phrase():
    from eimf.serving.explain import label_interests

    f = _folder(with_head=True)
    answer = Recommender(f).recommend([{"history": ["sku-0001", "sku-0100"]}])[0]
    hist = torch.tensor([[2, 101, 0, 0, 0, 0, 0, 0]])
    v = f.model.interests(hist, hist != 0)
    expected = [names[0][0] for names in label_interests(f.head, v, f.phrases)[0]]
    assert answer["interest_labels"] == expected and len(expected) == 3
    assert set(expected) <= {"jazz", "horror", "cooking", "travel"}
    assert Recommender(_folder()).recommend([{"history": ["sku-0001"]}])[0]["interest_labels"] == []


def test_pyfunc_predict_maps_a_dataframe_and_raises_mlflow_errors(tmp_path):
    from mlflow.exceptions import MlflowException

    from eimf.serving.pyfunc import EIMFRecommenderModel

    model = EIMFRecommenderModel()
    model.recommender = Recommender(_folder())
    out = model.predict(None, pd.DataFrame({"history": [["sku-0001"], ["sku-0002", "sku-0003"]], "k": [3, 4]}))
    assert list(out["items"].map(len)) == [3, 4]
    assert set(out.columns) == {"items", "scores", "interests", "titles", "interest_labels", "unknown_ids",
                                "history_used"}
    with pytest.raises(MlflowException, match=r"request 1\.k: must be >= 1"):
        model.predict(None, pd.DataFrame({"history": [["sku-0001"], ["sku-0002"]], "k": [3, 0]}))
    with pytest.raises(MlflowException, match="needs a 'history' column"):
        model.predict(None, pd.DataFrame({"items": [["sku-0001"]]}))


def test_log_recommender_registers_a_loadable_model_and_leaves_the_tracking_uri_alone(tmp_path, monkeypatch):
    import os

    import mlflow
    from mlflow.tracking import MlflowClient

    from eimf.serving.pyfunc import load_recommender, log_recommender

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("serving-unit", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    _folder(with_head=True).write(str(tmp_path / "m"))
    model_uri = log_recommender(str(tmp_path / "m"), uri, run_id, "eimf-unit")
    assert model_uri == "models:/eimf-unit/1"
    # the process's MLflow state is as before (no tracking URI pinned, no mlflow.db in the working dir)
    assert "MLFLOW_TRACKING_URI" not in os.environ and not (tmp_path / "mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rec = load_recommender(model_uri)
    direct = Recommender(ModelFolder.load(str(tmp_path / "m"))).recommend([{"history": ["sku-0007"], "k": 7}])
    assert rec.recommend([{"history": ["sku-0007"], "k": 7}]) == direct
    assert direct[0]["interest_labels"]
    got = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"history": [["sku-0007"]], "k": [7]}))
    assert list(got["items"][0]) == direct[0]["items"]
    # the model carries eimf's sources, not the logging machine's compiled caches
    stored = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "dl")))
    code = [p.relative_to(stored) for p in stored.rglob("*") if "code" in p.relative_to(stored).parts]
    assert any(p.name == "pyfunc.py" for p in code)
    assert not [p for p in code if p.name == "__pycache__" or p.suffix == ".pyc"]


@pytest.mark.parametrize("request_, field", [
    ({"history": ["\ud800"]}, "history[0]"),  # JSON's "\ud800" escape: a lone surrogate (HTTP 500 before)
    ({"history": ["sku-0001", "a\udfffb"]}, "history[1]"),
])
def test_an_id_that_is_not_valid_unicode_is_a_request_error_not_a_crash(request_, field):
    rec = Recommender(_folder())
    with pytest.raises(RequestError, match="valid Unicode") as e:
        rec.recommend([request_])
    assert e.value.field == field
    (e.value.reason + e.value.field).encode("utf-8")  # the error itself must encode as a JSON answer


def test_an_error_quoting_a_lone_surrogate_still_encodes():
    rec = Recommender(_folder())
    with pytest.raises(RequestError, match="unicode") as e:
        rec.recommend([{"history": ["sku-0001"], "\ud800": 1}])
    str(e.value).encode("utf-8")
    assert RequestError("got '\ud800'", "a\udfff").field == "a\\udfff"


def test_the_app_refuses_past_its_in_flight_limit_with_503_before_reading_the_body():
    from starlette.testclient import TestClient

    from eimf.serving.ray_serve import ROUTE, InFlightLimit, api

    before = InFlightLimit.limit
    InFlightLimit.limit = 0  # every request finds the replica full
    try:
        client = TestClient(api)
        r = client.post(ROUTE, json={"history": ["sku-0001"]})
        assert r.status_code == 503 and "overloaded" in r.json()["error"]["reason"]
        assert client.get("/openapi.json").status_code == 200  # only the recommend route is limited
        assert InFlightLimit.in_flight == 0
    finally:
        InFlightLimit.limit = before


def test_eimf_serve_gives_its_port_to_the_replica_and_refuses_a_taken_one(monkeypatch):
    """With direct ingress, the port clients were told becomes Ray's whole port range for replicas' servers (so a
    restarted replica takes it again, with no quarantine), the proxy gets another free port, and a taken port is a
    clear error before Ray starts."""
    import socket

    from eimf.serving import ray_serve

    for key in ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT",
                "RAY_SERVE_PORT_QUARANTINE_S", "RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        monkeypatch.delenv(key, raising=False)
    assert not ray_serve.direct_ingress_on()
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    assert ray_serve.direct_ingress_on()
    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0")
    assert not ray_serve.direct_ingress_on()

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        held.listen()
        with pytest.raises(ray_serve.PortInUseError, match=str(taken)):
            ray_serve.give_the_replica_the_port("127.0.0.1", taken)
    port = taken  # free again
    proxy = ray_serve.give_the_replica_the_port("127.0.0.1", port)
    assert proxy != port
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == str(port)
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] == str(port + 1)  # Ray's range is [min, max)
    assert os.environ["RAY_SERVE_PORT_QUARANTINE_S"] == "0"  # monkeypatch puts the environment back after
