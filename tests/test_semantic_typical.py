"""Typical-sample selection: determinism, budgets, near-centroid long-history users, random ablation."""

import numpy as np
import pandas as pd
import pytest
import torch

from eimf.config import ModelConfig, SemanticConfig
from eimf.semantic.typical import (SELECTION_COLUMNS, apportion, cluster_users, combine_interests, resolve_budget,
                                   select_random_users, select_typical_users, select_users,
                                   user_representations)


def clustered(n_clusters=4, per=60, k=3, d=16, seed=0):
    """Users around ``n_clusters`` orthogonal directions; every interest of a user is its direction plus
    noise whose scale grows with the user's index in its cluster (so the true nearest users are known)."""
    rng = np.random.default_rng(seed)
    centers = np.eye(d, dtype=np.float32)[:n_clusters] * 3
    reprs, users, lens, truth_cluster, noise = [], [], [], [], []
    uid = 100
    for c in range(n_clusters):
        for j in range(per):
            scale = 0.05 + 1.0 * j / per
            reprs.append(centers[c][None, :] + scale * rng.standard_normal((k, d)).astype(np.float32))
            users.append(uid)
            lens.append(int(rng.integers(10, 100)))
            truth_cluster.append(c)
            noise.append(scale)
            uid += 1
    return (np.stack(reprs), np.array(users), np.array(lens), np.array(truth_cluster), np.array(noise))


def test_budget_resolution_and_apportionment():
    assert resolve_budget(0.1, 95) == 10 and resolve_budget(25, 95) == 25 and resolve_budget(500, 95) == 95
    assert resolve_budget(0.001, 95) == 1 and resolve_budget(0, 95) == 0
    assert resolve_budget(1.0, 95) == 95 and resolve_budget(1, 95) == 95  # 1 is 100 %, not one user
    assert resolve_budget(2, 95) == 2
    with pytest.raises(ValueError, match="whole number"):
        resolve_budget(2.5, 95)
    q = apportion([50, 30, 15, 5], 10)
    assert q.sum() == 10 and (q >= 1).all() and q[0] >= q[1] >= q[2] >= q[3]
    assert list(apportion([50, 30, 20], 10, min_one=False)) == [5, 3, 2]
    assert list(apportion([2, 100], 50)) == [1, 49]  # capped by size, remainder goes elsewhere
    assert list(apportion([3, 1, 0], 10)) == [3, 1, 0]  # never more than the users there are


def test_combine_interests_units():
    x = np.random.default_rng(0).standard_normal((5, 3, 8)).astype(np.float32)
    for how, dim in (("mean", 8), ("concat", 24)):
        v = combine_interests(x, how)
        assert v.shape == (5, dim) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert combine_interests(x[:, 0], "mean").shape == (5, 8)
    with pytest.raises(ValueError):
        combine_interests(x, "max")


def test_selection_deterministic_and_budget_respected():
    reprs, users, lens, _, _ = clustered()
    a = select_typical_users(reprs, users, lens, n_clusters=4, budget=0.1, seed=7)
    b = select_typical_users(reprs, users, lens, n_clusters=4, budget=0.1, seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == SELECTION_COLUMNS
    assert len(a) == 24 and a["user"].is_unique  # 10% of 240
    assert len(select_typical_users(reprs, users, lens, 4, budget=13, seed=7)) == 13
    assert len(select_typical_users(reprs, users, lens, 4, budget=10_000, seed=7)) == 240
    c = select_typical_users(reprs, users, lens, 4, budget=0.1, seed=7, how="concat")
    assert len(c) == 24
    # ranks are 0..q-1 by distance inside every cluster
    for _, g in a.groupby("cluster"):
        assert list(g["rank_in_cluster"]) == list(range(len(g)))
        assert (np.diff(g["distance"].to_numpy()) >= 0).all()


def test_picks_near_centroid_users_and_prefers_long_histories():
    reprs, users, lens, truth, noise = clustered()
    # pool_factor 1: exactly the users nearest the centroid -> the least noisy ones of each true cluster
    sel = select_typical_users(reprs, users, lens, n_clusters=4, budget=20, seed=1, pool_factor=1.0)
    assert sel.groupby("cluster").size().tolist() == [5, 5, 5, 5]  # equal clusters -> equal quotas
    pos = {u: i for i, u in enumerate(users)}
    for _, g in sel.groupby("cluster"):
        idx = [pos[u] for u in g["user"]]
        assert len(set(truth[idx])) == 1  # one selected cluster = one true cluster
        assert noise[idx].max() < 0.3  # among the ~15 least noisy of 60

    # a very long history far from the centroid must not win; long ones near it must
    lens2 = lens.copy()
    far = [i for i in range(len(users)) if truth[i] == 0 and noise[i] > 0.9]
    lens2[far] = 10_000
    near = [i for i in range(len(users)) if truth[i] == 0 and noise[i] < 0.15]
    lens2[near[-1]] = 5_000  # a near user (not the nearest) with a long history
    sel = select_typical_users(reprs, users, lens2, n_clusters=4, budget=20, seed=1, pool_factor=3.0)
    chosen = set(sel["user"])
    assert not chosen & set(users[far])
    assert users[near[-1]] in chosen
    # exactly: per cluster, the pool is the 15 nearest (quota 5 x pool_factor 3), the chosen its 5 longest
    assign, dist, _ = cluster_users(reprs, 4, seed=1)
    for k, g in sel.groupby("cluster"):
        members = np.nonzero(assign == k)[0]
        pool = members[np.lexsort((users[members], dist[members]))][:15]
        expect = pool[np.lexsort((np.arange(15), -lens2[pool]))][:5]
        assert set(g["user"]) == set(users[expect])
        assert np.allclose(np.sort(g["distance"]), np.sort(dist[expect]))


def test_min_history_len_and_random_ablation():
    reprs, users, lens, _, _ = clustered()
    sel = select_typical_users(reprs, users, lens, 4, budget=0.5, seed=0, min_history_len=60)
    assert (sel["history_len"] >= 60).all()
    r1 = select_random_users(users, lens, 0.1, seed=3)
    r2 = select_random_users(users, lens, 0.1, seed=3)
    pd.testing.assert_frame_equal(r1, r2)
    assert len(r1) == 24 and (r1["cluster"] == -1).all() and list(r1.columns) == SELECTION_COLUMNS
    assert not r1.equals(select_random_users(users, lens, 0.1, seed=4))
    cfg = SemanticConfig(selection="random", budget=5)
    assert len(select_users(cfg, reprs, users, lens)) == 5
    cfg = SemanticConfig(selection="typical", budget=5, n_clusters=3)
    assert len(select_users(cfg, reprs, users, lens)) == 5


def test_more_clusters_than_users_and_empty():
    reprs, users, lens, _, _ = clustered(n_clusters=2, per=3)
    sel = select_typical_users(reprs, users, lens, n_clusters=50, budget=4, seed=0)
    assert len(sel) == 4
    assert len(select_typical_users(reprs, users, lens, 4, budget=0, seed=0)) == 0


def test_user_representations_from_training_part():
    from eimf.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=8, num_interests=3, maxlen=5), n_items=30)
    train = pd.DataFrame({"user": [5, 6, 7], "items": [list(range(1, 13)), [3, 4, 5], list(range(10, 30))]})
    users, reprs, lens = user_representations(model, train, maxlen=5, batch_size=2)
    assert list(users) == [5, 6, 7] and reprs.shape == (3, 3, 8) and list(lens) == [12, 3, 20]
    with torch.no_grad():
        h = torch.tensor([[8, 9, 10, 11, 12]])
        ref = model.interests(h, torch.ones_like(h, dtype=torch.bool)).numpy()
    assert np.allclose(reprs[0], ref[0], atol=1e-5)  # the last maxlen items of the training sequence
    _, _, lens_cut = user_representations(model, train, maxlen=5, cut=[4, 2, 20])
    assert list(lens_cut) == [4, 2, 20]
    assert model.training  # the mode is restored
