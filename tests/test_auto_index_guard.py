"""The guarded ``retrieval.index=auto`` (eimf.evaluation.retrieval.auto_index): above the exact size it tries the
fast 4-bit candidate ``MIPS,IVF<cells>,PQ<d+1>x4fs,RFlat``, keeps it only when it finds at least
``AUTO_MIN_RECALL_OF_EXACT`` of the exact top-50 of the check queries, else builds the safe ``MIPS,IVF<cells>,Flat``;
the decision is recorded in the model folder. Small synthetic tables (20,000 rows), the exact-size threshold
lowered to 10,000. Measured here when written: the candidate kept 0.993 of the exact top-50 on the clustered table
(kept) and 0.79 on the Gaussian one (fallback)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from eimf.config import load_config
from eimf.evaluation import retrieval
from eimf.evaluation.retrieval import ItemIndex, auto_fast_index, brute_force_topn, default_nprobe, fast_nprobe

N = 20_000  # above the lowered threshold: 1024 cells
THRESHOLD = 10_000
FAST = "MIPS,IVF1024,PQ{}x4fs,RFlat"
SAFE = "MIPS,IVF1024,Flat"


@pytest.fixture(autouse=True)
def small_catalogues(monkeypatch):
    monkeypatch.setattr(retrieval, "AUTO_EXACT_MAX_ITEMS", THRESHOLD)
    retrieval.set_faiss_threads(2)


def clustered_table(d: int = 8, seed: int = 0) -> np.ndarray:
    """``[N + 1, d]``: rows around 200 centres with varied norms (row 0 padding): the fast candidate holds."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, d)).astype(np.float32)
    x = centres[rng.integers(0, 200, N)] + 0.3 * rng.standard_normal((N, d)).astype(np.float32)
    x *= rng.uniform(0.5, 1.5, (N, 1)).astype(np.float32)
    return np.vstack([np.zeros((1, d), np.float32), x])


def gaussian_table(d: int = 16, seed: int = 0) -> np.ndarray:
    """``[N + 1, d]`` isotropic Gaussian rows: no cell structure, so 1/19 of the cells misses much of the top-50."""
    rng = np.random.default_rng(seed)
    return np.vstack([np.zeros((1, d), np.float32), rng.standard_normal((N, d)).astype(np.float32)])


def queries_near(table: np.ndarray, users: int = 200, k: int = 2, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = table.shape[1]
    return table[rng.integers(1, len(table), (users, k))] + 0.1 * rng.standard_normal((users, k, d)).astype(np.float32)


def recall_of_exact(index: ItemIndex, table: np.ndarray, q: np.ndarray, n: int = 50) -> float:
    got, _ = index.search_multi(q, n)
    exact, _ = brute_force_topn(table, q, n)
    return float(np.mean([len(np.intersect1d(a[a > 0], b[b > 0])) / n for a, b in zip(got, exact)]))


def test_the_candidate_and_its_nprobe():
    assert fast_nprobe("MIPS,IVF3072,PQ65x4fs,RFlat") == 160  # the measured setting (docs/serving.md)
    assert fast_nprobe(FAST.format(9)) == 53 and default_nprobe(SAFE) == 64
    assert auto_fast_index(N, 64) == "MIPS,IVF1024,PQ65x4fs,RFlat"
    assert auto_fast_index(N, 8) == FAST.format(9)  # odd sub-quantizer counts build too
    assert auto_fast_index(THRESHOLD, 64) is None  # exact there
    assert retrieval.auto_index(N) == SAFE


def test_auto_keeps_the_fast_candidate_where_it_holds_and_records_its_recall():
    table = clustered_table()
    q = queries_near(table)
    index = ItemIndex(table, index="auto", check_queries=q)
    assert index.spec == FAST.format(9)
    assert index.params == {"nprobe": 53, "k_factor_rf": retrieval.DEFAULT_REFINE_K}
    check = index.auto_check
    assert check["kept"] is True and check["candidate"] == FAST.format(9)
    assert check["check_users"] == 200 and check["check_vectors"] == 400 and check["top_n"] == 50
    assert check["candidate_recall_of_exact"] >= retrieval.AUTO_MIN_RECALL_OF_EXACT
    # the recorded recall is the one brute force finds for these queries (merged per user as evaluation does)
    assert check["candidate_recall_of_exact"] == pytest.approx(recall_of_exact(index, table, q), abs=1e-6)
    assert index.record()["auto_check"] == check and index.record()["spec"] == FAST.format(9)


def test_auto_falls_back_to_the_safe_ivf_where_the_candidate_loses_recall():
    table = gaussian_table()
    q = np.random.default_rng(2).standard_normal((100, 2, 16)).astype(np.float32)
    index = ItemIndex(table, index="auto", check_queries=q)
    check = index.auto_check
    assert index.spec == SAFE and index.params == {"nprobe": 64}
    assert check["kept"] is False and check["candidate"] == FAST.format(17) and check["check_users"] == 100
    assert check["candidate_recall_of_exact"] < retrieval.AUTO_MIN_RECALL_OF_EXACT
    assert f"{check['candidate_recall_of_exact']:.4f} < 0.95" in check["reason"]
    # the fallback (coarse cells taken over from the candidate) is a working IVF,Flat over every row
    assert index.n_items == N and not index.exact
    safe = ItemIndex(table, index=SAFE)
    assert recall_of_exact(index, table, q) == pytest.approx(recall_of_exact(safe, table, q), abs=0.05)


def test_the_threshold_decides(monkeypatch):
    table = clustered_table()
    q = queries_near(table, users=50)
    monkeypatch.setattr(retrieval, "AUTO_MIN_RECALL_OF_EXACT", 1.01)  # nothing reaches it
    index = ItemIndex(table, index="auto", check_queries=q)
    assert index.spec == SAFE and index.auto_check["kept"] is False
    assert index.auto_check["candidate_recall_of_exact"] >= 0.95 and "< 1.01" in index.auto_check["reason"]


def test_without_check_queries_auto_builds_the_safe_ivf_unverified():
    table = clustered_table()
    for q in (None, np.zeros((0, 2, 8), np.float32)):
        index = ItemIndex(table, index="auto", check_queries=q)
        assert index.spec == SAFE and index.params == {"nprobe": 64}
        check = index.auto_check
        assert check["kept"] is False and check["check_users"] == 0
        assert check["candidate_recall_of_exact"] is None and "no check queries" in check["reason"]
    with pytest.raises(ValueError, match="check queries"):
        ItemIndex(table, index="auto", check_queries=np.zeros((3, 2, 5), np.float32))


def test_an_explicit_spec_is_never_changed_by_the_guard(monkeypatch):
    table = clustered_table()
    q = queries_near(table, users=50)
    monkeypatch.setattr(retrieval, "AUTO_MIN_RECALL_OF_EXACT", 1.01)  # the guard would reject anything
    for spec in (FAST.format(9), SAFE):
        index = ItemIndex(table, index=spec, check_queries=q)
        assert index.spec == spec and index.auto_check is None and "auto_check" not in index.record()
    assert index.params == {"nprobe": 64}
    small = ItemIndex(table[:THRESHOLD + 1], index="auto", check_queries=q)  # exact: nothing to guard
    assert small.spec == "Flat" and small.auto_check is None


def test_the_block_by_block_build_takes_the_same_decision():
    table = clustered_table()
    q = queries_near(table, users=100)
    whole = ItemIndex(table, index="auto", check_queries=q)
    cfg = load_config(None, ["retrieval.index=auto"])

    def blocks():
        for s in range(1, N + 1, 7_000):
            yield table[s:s + 7_000]

    built = ItemIndex.from_blocks(blocks, N, 8, cfg.retrieval, check_queries=q)
    assert built.spec == whole.spec == FAST.format(9)
    assert built.auto_check == whole.auto_check


def _model_with_table(table: np.ndarray, index: str = "auto"):
    from eimf.models import build_model

    cfg = load_config(None, ["data.dataset=custom", f"model.dim={table.shape[1]}", "model.num_interests=2",
                             "model.maxlen=8", f"retrieval.index={index}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, len(table) - 1).eval()
    with torch.no_grad():
        model.item_emb.weight.copy_(torch.from_numpy(table))
    return cfg, model


def _prepared_valid(path, users: int = 600, seed: int = 3):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user": np.arange(1, users + 1),
                  "history": [rng.integers(1, N + 1, rng.integers(2, 12)).tolist() for _ in range(users)],
                  "truth": [[int(rng.integers(1, N + 1))] for _ in range(users)]}).to_parquet(path / "valid.parquet")
    return str(path)


def test_the_decision_is_recorded_in_the_model_folder_and_reads_back(tmp_path):
    from eimf.serving.folder import ModelFolder, build_index, check_interests

    table = clustered_table()
    cfg, model = _model_with_table(table)
    data = _prepared_valid(tmp_path / "prepared")
    q = check_interests(model, cfg, data)
    assert q.shape == (retrieval.AUTO_CHECK_USERS, 2, 8)  # a sample of the 600 VALID users, their interests
    index = build_index(model, cfg, data_path=data)
    assert index.auto_check["check_users"] == retrieval.AUTO_CHECK_USERS
    assert index.auto_check["candidate_recall_of_exact"] == pytest.approx(recall_of_exact(index, table, q), abs=1e-6)
    items = pd.DataFrame({"item": np.arange(1, N + 1), "raw_id": [str(i) for i in range(N)], "text": "",
                          "count": 1})
    folder = ModelFolder(model=model, cfg=cfg, items=items, index=index)
    folder.write(str(tmp_path / "m"))
    manifest = json.loads((tmp_path / "m" / "folder.json").read_text())
    assert manifest["index"]["spec"] == index.spec and manifest["index"]["auto_check"] == index.auto_check
    again = ModelFolder.load(str(tmp_path / "m"))
    assert again.index.spec == index.spec and again.index.params == index.params
    assert again.index.auto_check == index.auto_check
    ids, scores = index.search_multi(q, 50)
    ids2, scores2 = again.index.search_multi(q, 50)
    assert np.array_equal(ids, ids2) and np.allclose(scores, scores2, atol=1e-4)
    # a folder written before the guard (no auto_check) reads as before
    del manifest["index"]["auto_check"]
    (tmp_path / "m" / "folder.json").write_text(json.dumps(manifest))
    old = ModelFolder.load(str(tmp_path / "m"))
    assert old.index.auto_check is None and old.index.spec == index.spec and "auto_check" not in old.index.record()


def test_build_index_without_prepared_data_falls_back(tmp_path):
    from eimf.serving.folder import build_index

    cfg, model = _model_with_table(clustered_table())
    index = build_index(model, cfg, data_path=str(tmp_path / "gone"))  # the prepared data is not there
    assert index.spec == SAFE and index.auto_check["check_users"] == 0


def test_check_interests_of_a_sharded_export_read_the_row_blocks(tmp_path):
    """A sharded export's backbone has no table (``BatchRows``): the check users' history rows come from the
    ``.npy`` blocks, and the interests equal those of the whole-table model."""
    pytest.importorskip("torchrec")
    from eimf.models import build_model
    from eimf.serving.folder import check_interests
    from eimf.training.sharded import BatchRows

    table = clustered_table()
    cfg, whole = _model_with_table(table)
    data = _prepared_valid(tmp_path / "prepared", users=40)
    parts = []
    for i, (lo, hi) in enumerate(((0, 7_001), (7_001, 15_000), (15_000, N + 1))):  # row 0 heads the first block
        parts.append(str(tmp_path / f"part{i}.npy"))
        np.save(parts[-1], table[lo:hi])
    dense = build_model(cfg.model, N, item_table=BatchRows())
    dense.load_state_dict({k: v for k, v in whole.state_dict().items() if not k.startswith("item_emb.")},
                          strict=False)
    dense.eval()
    np.testing.assert_allclose(check_interests(dense, cfg, data, table_parts=parts),
                               check_interests(whole, cfg, data), rtol=1e-5, atol=1e-6)


def test_the_export_step_checks_auto_with_the_models_valid_users(tmp_path):
    """eimf.steps.export.from_checkpoint (what the pipeline's export stage runs) hands the guard the interests of
    the prepared data's VALID users: the folder's index is checked, not left unverified."""
    from eimf.formats import checkpoints as ckpt
    from eimf.steps.export import from_checkpoint

    table = clustered_table()
    cfg, model = _model_with_table(table)
    data = _prepared_valid(tmp_path / "prepared")
    pd.DataFrame({"item": np.arange(1, N + 1), "raw_id": [str(i) for i in range(N)], "text": "",
                  "count": 1}).to_parquet(tmp_path / "prepared" / "items.parquet")
    (tmp_path / "ckpt").mkdir()
    torch.save(model.state_dict(), tmp_path / "ckpt" / ckpt.BEST_MODEL)
    folder = from_checkpoint(tmp_path / "ckpt", cfg, data, head_file=None)
    check = folder.index.auto_check
    assert check["check_users"] == retrieval.AUTO_CHECK_USERS and check["kept"], check
    assert folder.index.spec == FAST.format(9)
