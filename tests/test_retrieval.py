"""faiss retrieval, the merge over interests, exclude_history, MostPopular and evaluate() end to end."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from eimf.evaluation import (
    ItemIndex,
    brute_force_topn,
    evaluate,
    history_batch,
    merge_candidates,
    most_popular,
    user_metrics,
)

L3 = 1 / math.log2(3)


def rand_table(n_items=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_items + 1, d)).astype(np.float32)


def test_merge_dedupes_keeps_max_orders_by_score_and_drops_padding():
    ids = np.array([[5, 2, 0, 5, 9], [4, 4, 4, 1, 3]])
    scores = np.array([[0.1, 0.5, 2.0, 0.9, 0.7], [0.3, 0.8, 0.2, 0.5, -1.0]], dtype=np.float32)
    out_ids, out_sc = merge_candidates(ids, scores, 3)
    # row 0: padding (score 2.0) dropped; 5 appears twice and keeps 0.9
    assert out_ids[0].tolist() == [5, 9, 2]
    assert out_sc[0] == pytest.approx([0.9, 0.7, 0.5])
    # row 1: 4 three times -> once with 0.8
    assert out_ids[1].tolist() == [4, 1, 3]
    assert out_sc[1] == pytest.approx([0.8, 0.5, -1.0])


def test_merge_pads_when_too_few_candidates_and_excludes():
    ids = np.array([[3, 3, 0, 1]])
    sc = np.array([[1.0, 2.0, 5.0, 0.5]], dtype=np.float32)
    out_ids, out_sc = merge_candidates(ids, sc, 4)
    assert out_ids.tolist() == [[3, 1, 0, 0]]
    assert np.isneginf(out_sc[0, 2:]).all()
    out_ids, _ = merge_candidates(ids, sc, 2, exclude=[[3]])
    assert out_ids.tolist() == [[1, 0]]


def test_faiss_equals_bruteforce_multi_interest():
    table = rand_table(300, 16)
    x = np.random.default_rng(1).standard_normal((40, 4, 16)).astype(np.float32)
    index = ItemIndex(table)
    ids, sc = index.search_multi(x, 20)
    ref_ids, ref_sc = brute_force_topn(table, x, 20)
    assert (ids == ref_ids).all()
    assert np.allclose(sc, ref_sc, atol=1e-4)
    assert all(len(set(r)) == 20 for r in ids.tolist())  # distinct
    assert (np.diff(sc, axis=1) <= 0).all()  # descending
    # top-20 is a prefix of top-50
    ids50, _ = index.search_multi(x, 50)
    assert (ids50[:, :20] == ids).all()
    # single-interest [B, d] and torch inputs are accepted
    ids1, _ = ItemIndex(torch.from_numpy(table)).search_multi(torch.from_numpy(x[:, 0]), 10)
    assert (ids1 == brute_force_topn(table, x[:, 0], 10)[0]).all()


def test_padding_row_never_recommended():
    table = rand_table(50, 8)
    table[0] = 100.0  # the padding row would win every query
    x = np.abs(np.random.default_rng(2).standard_normal((10, 3, 8))).astype(np.float32)
    ids, _ = ItemIndex(table).search_multi(x, 50)  # the whole catalogue
    assert (ids != 0).all()
    assert sorted(ids[0].tolist()) == list(range(1, 51))
    ids, _ = ItemIndex(table).search_multi(x, 60)  # more than N: padded with 0 at the end only
    assert (ids[:, :50] != 0).all() and (ids[:, 50:] == 0).all()


def test_exclude_history():
    table = rand_table(200, 16, seed=3)
    x = np.random.default_rng(4).standard_normal((12, 4, 16)).astype(np.float32)
    index = ItemIndex(table)
    plain, _ = index.search_multi(x, 20)
    hist = [plain[i, : 5 + i].tolist() for i in range(12)]  # exclude the user's own top hits
    ids, _ = index.search_multi(x, 20, exclude=hist)
    for i in range(12):
        assert not set(ids[i]) & set(hist[i])
        assert (ids[i] != 0).all()
    assert (ids == brute_force_topn(table, x, 20, exclude=hist)[0]).all()


def test_ivf_with_full_probe_equals_flat():
    table = rand_table(400, 8, seed=5)
    x = np.random.default_rng(6).standard_normal((16, 2, 8)).astype(np.float32)
    flat, _ = ItemIndex(table).search_multi(x, 20)
    ivf, _ = ItemIndex(table, index="ivf", nlist=8, nprobe=8).search_multi(x, 20)
    assert (flat == ivf).all()


def test_history_batch_keeps_last_maxlen_right_padded():
    hist, mask = history_batch([[1, 2, 3, 4, 5], [7], []], maxlen=3)
    assert hist.tolist() == [[3, 4, 5], [7, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]


def test_most_popular_tiny():
    # train popularity: 3 x3, 2 x2, 1 x1 -> [3, 2, 1] (ids are global-frequency order; train order differs)
    train = pd.DataFrame({"user": [0, 1, 2], "items": [[1, 2, 3], [2, 3], [3]]})
    split = pd.DataFrame({"user": [10, 11], "history": [[2], [3]], "truth": [[3], [1]]})
    r = most_popular(train, split, topk=(1, 3))
    assert r["n_users"] == 2
    assert r["recall@1"] == pytest.approx(0.5)  # user 10 hit at rank 1, user 11 misses
    assert r["recall@3"] == pytest.approx(1.0)  # user 11's item 1 is at rank 3
    assert r["ndcg@3"] == pytest.approx((1.0 + 0.5) / 2)  # 1/log2(2) and 1/log2(4)
    assert r["hitrate@1"] == pytest.approx(0.5)
    # excluding history: user 10 gets [3, 1], user 11 gets [2, 1] -> item 1 at rank 2
    r = most_popular(train, split, topk=(1, 3), exclude_history=True)
    assert r["recall@1"] == pytest.approx(0.5)
    assert r["ndcg@3"] == pytest.approx((1.0 + L3) / 2)


def _split(n_users=23, n_items=120, seed=7):
    rng = np.random.default_rng(seed)
    hist = [rng.integers(1, n_items + 1, size=rng.integers(1, 80)).tolist() for _ in range(n_users)]
    truth = [rng.integers(1, n_items + 1, size=rng.integers(1, 6)).tolist() for _ in range(n_users)]
    return pd.DataFrame({"user": np.arange(n_users), "history": hist, "truth": truth})


@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("exclude", [False, True])
def test_evaluate_end_to_end(as_torch, exclude):
    n_items, d, k, maxlen = 120, 8, 3, 50
    table = rand_table(n_items, d, seed=8)
    proj = np.random.default_rng(9).standard_normal((k, d)).astype(np.float32)
    seen = []

    def interest_fn(hist, mask):
        seen.append((hist, mask))
        # interests: mean of the real history embeddings, shifted per interest
        h = hist.numpy()
        m = mask.numpy()[..., None]
        mean = (table[h] * m).sum(1) / np.maximum(m.sum(1), 1)
        out = mean[:, None, :] + proj[None]
        return torch.from_numpy(out) if as_torch else out

    split = _split(n_items=n_items)
    res = evaluate(interest_fn, torch.from_numpy(table) if as_torch else table, split,
                   topk=(5, 20), batch_size=10, maxlen=maxlen, exclude_history=exclude)
    assert len(seen) == 3  # 23 users in batches of 10
    h0, m0 = seen[0]
    assert h0.dtype == torch.int64 and m0.dtype == torch.bool and h0.shape == (10, maxlen)
    assert (m0 == (h0 != 0)).all()

    # reference: same interests, brute-force ranking, per-user metrics averaged
    hist, mask = history_batch(list(split["history"]), maxlen)
    x = interest_fn(torch.from_numpy(hist), torch.from_numpy(mask))
    x = x.numpy() if as_torch else x
    recs, _ = brute_force_topn(table, x, 20, exclude=list(split["history"]) if exclude else None)
    if exclude:
        assert not any(set(r) & set(h) for r, h in zip(recs.tolist(), split["history"]))
    assert res["n_users"] == 23
    for n in (5, 20):
        m = user_metrics(recs, list(split["truth"]), n)
        for name in ("recall", "ndcg", "hitrate"):
            assert res[f"{name}@{n}"] == pytest.approx(m[name].mean(), abs=1e-9)


def test_building_an_index_keeps_the_training_thread_count():
    """faiss and torch share one OpenMP runtime: an index built during evaluation inside a 1-thread training
    worker must not reset the count to every core (that made 2-worker training ~5x slower after its first eval)."""
    import faiss

    from eimf.evaluation.retrieval import ItemIndex, set_faiss_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ItemIndex(np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32), index="Flat")
        assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
        assert set_faiss_threads(2) == 2 and faiss.omp_get_max_threads() == 2  # an explicit count still applies
    finally:
        torch.set_num_threads(before)


def skewed_table(n_items=3000, d=16, seed=0):
    """Rows with very different norms, as trained tables have: inner product and L2 rank them differently."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((n_items + 1, d)).astype(np.float32)
    return t * rng.uniform(0.1, 4.0, (n_items + 1, 1)).astype(np.float32)


@pytest.mark.parametrize("spec", ["MIPS,Flat", "MIPS,IVF16,Flat"])
def test_mips_lift_ranks_and_scores_by_inner_product(spec, tmp_path):
    table = skewed_table()
    x = np.random.default_rng(1).standard_normal((25, 3, 16)).astype(np.float32)
    ref_ids, ref_sc = brute_force_topn(table, x, 30)
    index = ItemIndex(table, index=spec, nprobe=16)  # every cell probed: exact
    assert index.dim == 16 and index.index.d == 17 and index.exact == (spec == "MIPS,Flat")
    ids, sc = index.search_multi(x, 30)
    assert (ids == ref_ids).all()
    assert np.allclose(sc, ref_sc, atol=1e-3)  # inner products, not L2 distances: they merge across interests
    # on this table plain L2 ranks differently from inner product: the lift is what makes the L2 index right
    nearest = np.argsort(((x[:, 0, None, :] - table[None, 1:]) ** 2).sum(-1), axis=1)[:, :30] + 1
    assert (nearest != brute_force_topn(table, x[:, 0], 30)[0]).any()
    # written and read back (the model folder's path): same ids and scores, the norm bound recovered
    index.save(tmp_path / "index.faiss")
    again = ItemIndex.load(tmp_path / "index.faiss", index.spec, nprobe=16)
    assert again.mips_m2 == pytest.approx(index.mips_m2, rel=1e-5)
    ids2, sc2 = again.search_multi(x, 30)
    assert (ids2 == ids).all() and np.allclose(sc2, sc, atol=1e-3)


def test_mips_from_blocks_equals_whole_table():
    from eimf.config import RetrievalConfig

    table = skewed_table(2000)
    x = np.random.default_rng(2).standard_normal((10, 2, 16)).astype(np.float32)
    cfg = RetrievalConfig(index="MIPS,IVF8,Flat", nprobe=8)

    def blocks():  # the largest row in the last block: the bound must come from every block
        yield table[1:700]
        yield table[700:]
    whole = ItemIndex(table, index=cfg.index, nprobe=8)
    parts = ItemIndex.from_blocks(blocks, 2000, 16, cfg)
    assert parts.mips_m2 == pytest.approx(whole.mips_m2)
    assert (parts.search_multi(x, 20)[0] == brute_force_topn(table, x, 20)[0]).all()


def test_evaluate_through_an_approximate_index_reports_exact_metrics_beside_it():
    table = skewed_table(3000)
    rng = np.random.default_rng(3)
    users = pd.DataFrame({"user": np.arange(60), "history": [list(rng.integers(1, 3001, 8)) for _ in range(60)],
                          "truth": [list(rng.integers(1, 3001, 3)) for _ in range(60)]})
    emb = torch.from_numpy(table)

    def interest_fn(hist, mask):
        return emb[hist[:, -4:]]  # [B, 4, d]: the last 4 history items as interests

    exact = evaluate(interest_fn, table, users, topk=(20, 50), index=ItemIndex(table))
    assert "ann/recall@50" not in exact and "approximate_index" not in exact
    lossy = ItemIndex(table, index="IVF64,Flat", nprobe=1)  # one cell of 64: loses much of the top-50
    both = evaluate(interest_fn, table, users, topk=(20, 50), index=lossy)
    for k in ("recall@50", "ndcg@20", "hitrate@50", "n_users"):  # the plain keys stay the exact ones
        assert both[k] == pytest.approx(exact[k])
    ann = evaluate(interest_fn, table, users, topk=(20, 50), index=lossy, exact_index=ItemIndex(table))
    assert ann == pytest.approx(both)
    assert 0 < both["ann/recall_of_exact@50"] < 0.9
    assert both["ann/recall_of_exact@20"] > 0
    # the same through a full-probe IVF: it finds all of the exact top-N
    full = evaluate(interest_fn, table, users, topk=(20, 50), index=ItemIndex(table, index="IVF64,Flat", nprobe=64))
    assert full["ann/recall_of_exact@50"] == pytest.approx(1.0)
    assert full["ann/recall@50"] == pytest.approx(exact["recall@50"])
    # without the table the metrics are the lossy index's, and say so
    alone = evaluate(interest_fn, None, users, topk=(20, 50), index=lossy)
    assert alone["approximate_index"] == 1.0 and alone["recall@50"] == pytest.approx(both["ann/recall@50"])


def test_evaluate_stage_through_an_approximate_folder_index_reports_exact_and_ann(tiny_dataset, tmp_path):
    """The evaluate stage on a model folder whose index is lossy: plain keys exact (equal to a Flat folder's), the
    folder's index under ann/ with its recall of the exact top-N."""
    from eimf.config import load_config
    from eimf.data.preprocess import prepare
    from eimf.models import build_model
    from eimf.serving.folder import ModelFolder, build_index
    from eimf.steps.evaluate import evaluate_splits

    def folder(index, nprobe):
        cfg = load_config(None, tiny_dataset + [f"data.output_dir={tmp_path / 'prepared'}", "model.dim=16",
                                                f"retrieval.index={index}", f"retrieval.nprobe={nprobe}"])
        data = prepare(cfg.data)
        torch.manual_seed(0)
        model = build_model(cfg.model, data.n_items).eval()
        items = pd.DataFrame({"item": np.arange(1, data.n_items + 1), "raw_id": [str(i) for i in range(data.n_items)],
                              "text": [""] * data.n_items, "count": np.ones(data.n_items, dtype=np.int64)})
        out = str(tmp_path / index.replace(",", "_"))
        ModelFolder(model=model, cfg=cfg, items=items, index=build_index(model, cfg), metrics={},
                    head=None, phrases=None, data_path=str(data.path)).write(out)
        return out

    exact = evaluate_splits(folder("Flat", 1), ("test",), with_baseline=False)
    lossy = evaluate_splits(folder("IVF16,Flat", 1), ("test",), with_baseline=False)
    assert not any("/ann/" in k for k in exact)
    for k, v in exact.items():
        assert lossy[k] == pytest.approx(v), k
    assert 0 < lossy["test/ann/recall_of_exact@50"] < 1
    assert lossy["test/ann/recall@50"] <= lossy["test/recall@50"] + 0.05


def test_auto_is_exact_for_small_catalogues_then_the_lifted_ivf_probing_a_share_of_its_cells(tmp_path):
    from eimf.evaluation.retrieval import AUTO_EXACT_MAX_ITEMS, auto_index, default_nprobe, resolve_index

    assert auto_index(1000) == "Flat" and auto_index(AUTO_EXACT_MAX_ITEMS) == "Flat"
    assert auto_index(1_000_000) == "MIPS,IVF3072,Flat" and auto_index(10_000_000) == "MIPS,IVF12288,Flat"
    assert resolve_index("auto", 667_377) == "MIPS,IVF3072,Flat"
    # nprobe unset: the share of the cells, recorded in params (so the model folder writes it) and read back
    index = ItemIndex(skewed_table(4000), index="MIPS,IVF256,Flat")
    assert index.params == {"nprobe": default_nprobe("MIPS,IVF256,Flat")}
    index.save(tmp_path / "i.faiss")
    assert ItemIndex.load(tmp_path / "i.faiss", index.spec, nprobe=index.params["nprobe"]).params == index.params
    assert ItemIndex(skewed_table(4000), index="MIPS,IVF256,Flat", nprobe=3).params == {"nprobe": 3}


def test_lifted_4_bit_codes_with_exact_rescoring_find_what_exact_vectors_in_the_same_cells_find(tmp_path):
    """``MIPS,IVF<n>,PQ<d+1>x4fs,RFlat`` (docs/serving.md: 0.95 of exact at 10x on trained 667K tables)."""
    from eimf.evaluation.retrieval import DEFAULT_REFINE_K

    spec = "MIPS,IVF64,PQ17x4fs,RFlat"  # one 4-bit code per lifted coordinate at d = 16
    table = skewed_table(4000)
    index = ItemIndex(table, index=spec, nprobe=16)
    assert index.params == {"nprobe": 16, "k_factor_rf": DEFAULT_REFINE_K}  # refine_k unset: the default
    x = np.random.default_rng(1).standard_normal((40, 2, 16)).astype(np.float32)
    ref_ids, _ = brute_force_topn(table, x, 20)
    ids, sc = index.search_multi(x, 20)
    flat_ids, _ = ItemIndex(table, index="MIPS,IVF64,Flat", nprobe=16).search_multi(x, 20)

    def found(got):
        return np.mean([len(np.intersect1d(a, b)) / 20 for a, b in zip(got, ref_ids)])

    assert found(ids) > 0.6 and found(ids) > found(flat_ids) - 0.05
    # what the re-scoring stage returns is the exact inner product of each id found, with the interest that found it
    exact = np.einsum("ukd,nd->ukn", x, table)  # [U, K, N + 1]
    per_interest = np.take_along_axis(exact, np.repeat(ids[:, None, :], 2, axis=1), axis=2)  # [U, K, 20]
    assert (np.abs(per_interest - sc[:, None, :]).min(axis=1)[ids > 0] < 1e-2).all()
    index.save(tmp_path / "i.faiss")
    back = ItemIndex.load(tmp_path / "i.faiss", index.spec, nprobe=16, refine_k=index.params["k_factor_rf"])
    assert back.params == index.params
    assert np.array_equal(back.search_multi(x, 20)[0], ids)


def test_a_model_folder_with_the_lifted_index_reads_back_with_the_same_answers(tmp_path):
    """The folder's writer records the spec and nprobe; its reader passes them to ItemIndex.load, which recovers
    the lift's norm bound: same ids and inner-product scores after the round trip."""
    from eimf.config import load_config
    from eimf.models import build_model
    from eimf.serving.folder import ModelFolder, build_index

    cfg = load_config(None, ["data.dataset=custom", "model.dim=16", "retrieval.index=MIPS,IVF8,Flat"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 500).eval()
    items = pd.DataFrame({"item": np.arange(1, 501), "raw_id": [str(i) for i in range(500)], "text": [""] * 500,
                          "count": np.ones(500, dtype=np.int64)})
    written = ModelFolder(model=model, cfg=cfg, items=items, index=build_index(model, cfg), metrics={}, head=None,
                          phrases=None, data_path=None)
    written.write(str(tmp_path / "m"))
    read = ModelFolder.load(str(tmp_path / "m"))
    assert read.index.spec == "MIPS,IVF8,Flat" and read.index.params == written.index.params == {"nprobe": 8}
    x = np.random.default_rng(0).standard_normal((12, 3, 16)).astype(np.float32)
    ids, scores = read.index.search_multi(x, 20)
    ref_ids, ref_scores = brute_force_topn(model.item_embeddings().detach().numpy(), x, 20)
    assert (ids == ref_ids).all() and np.allclose(scores, ref_scores, atol=1e-4)  # all 8 cells probed: exact


def test_reserved_slots_give_the_lowest_places_to_the_best_new_items_a_row_lacks():
    from eimf.evaluation.retrieval import reserve_slots

    is_new = np.zeros(10, dtype=bool)
    is_new[[7, 8, 9]] = True
    ids = np.array([[1, 2, 3, 4], [1, 7, 2, 3], [1, 2, 0, 0], [7, 8, 1, 2]])
    scores = np.array([[9, 8, 7, 6], [9, 8, 7, 6], [9, 8, -np.inf, -np.inf], [9, 8, 7, 6]], dtype=np.float32)
    new_ids = np.array([[9, 8], [7, 9], [8, 0], [7, 8]])
    new_scores = np.array([[2, 1], [8, 3], [5, -np.inf], [9, 8]], dtype=np.float32)
    out, out_s = reserve_slots(ids, scores, new_ids, new_scores, is_new, slots=2)
    assert out.tolist() == [[1, 2, 9, 8],  # two places given up, the new items in score order after the rest
                            [1, 7, 2, 9],  # it had one new item: one place given
                            [1, 2, 8, 0],  # room left: nothing given up; only one new item to show
                            [7, 8, 1, 2]]  # enough new items already: unchanged
    assert out_s[0].tolist() == [9, 8, 2, 1] and out_s[1].tolist() == [9, 8, 7, 3]
    same, _ = reserve_slots(ids, scores, new_ids, new_scores, is_new, slots=0)
    assert same.tolist() == ids.tolist()
    wide, _ = reserve_slots(ids, scores, new_ids, new_scores, is_new, slots=9)  # never more than the list
    assert wide[0].tolist() == [1, 2, 9, 8]


def test_subset_search_ranks_only_the_subset_in_catalogue_ids_and_excludes_by_them():
    from eimf.evaluation.retrieval import subset_topn

    table = np.random.default_rng(0).standard_normal((11, 4)).astype(np.float32)
    sub_ids = np.array([2, 5, 9])
    sub_table = np.concatenate([np.zeros((1, 4), np.float32), table[sub_ids]])
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    got, got_s = subset_topn(sub_table, sub_ids, x, 2)
    ref, ref_s = brute_force_topn(sub_table, x, 2)  # the same ranking, in positions 1..3 of the subset
    assert got.tolist() == sub_ids[ref - 1].tolist() and np.allclose(got_s, ref_s)
    # a catalogue id of the subset is excluded; one outside it (7) is ignored; a row lacking items pads with 0
    kept, _ = subset_topn(sub_table, sub_ids, x, 3, exclude=[[got[0, 0], 7], []])
    assert got[0, 0] not in kept[0] and kept[0, 2] == 0 and sorted(kept[1]) == sorted(sub_ids)
