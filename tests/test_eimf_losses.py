"""EIMF multi-task training: matching, the two auxiliary losses, the typical-user sampler, the training-step hook,
checkpoints, interest labels; and a short run on real MovieLens-100K with metadata-annotator annotations."""
from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eimf.config import load_config
from eimf.data.sampling import SemanticBatch, SemanticTrainSampler, TrainSampler
from eimf.modules.alignment import EIMFHead, alignment_loss, match_interests, semantic_prediction_loss

DATA_DIR = os.environ.get("EIMF_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_ml100k = pytest.mark.skipif(not Path(DATA_DIR, "ml-100k").exists(), reason="ml-100k not in EIMF_DATA_DIR")


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------- losses
def test_semantic_prediction_loss_by_hand():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(5, 7)), _unit(rng.normal(size=(5, 7)))
    expected = np.mean([1 - p @ t / (np.linalg.norm(p) * np.linalg.norm(t)) for p, t in zip(pred, target)])
    got = semantic_prediction_loss(torch.tensor(pred), torch.tensor(target))
    assert float(got) == pytest.approx(expected, rel=1e-9)
    assert float(semantic_prediction_loss(torch.zeros(0, 7), torch.zeros(0, 7))) == 0.0


def _info_nce_by_hand(b, s, tau, drop=()):
    n = len(b)
    logits = _unit(b) @ _unit(s).T / tau
    keep = np.ones((n, n), dtype=bool)
    for i, j in drop:
        keep[i, j] = False

    def ce(mat, keep_mat):
        return np.mean([-(mat[i, i] - math.log(sum(math.exp(mat[i, j]) for j in range(n) if keep_mat[i, j])))
                        for i in range(n)])

    return 0.5 * (ce(logits, keep) + ce(logits.T, keep.T))


def test_alignment_loss_by_hand_symmetric_info_nce():
    rng = np.random.default_rng(1)
    b, s = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    got = alignment_loss(torch.tensor(b), torch.tensor(s), temperature=0.1)
    assert float(got) == pytest.approx(_info_nce_by_hand(b, s, 0.1), rel=1e-9)
    # the two directions differ, so a one-sided loss would not pass
    one_sided = F.cross_entropy(F.normalize(torch.tensor(b), dim=-1) @ F.normalize(torch.tensor(s), dim=-1).t() / 0.1,
                                torch.arange(4))
    assert float(one_sided) != pytest.approx(float(got), rel=1e-6)
    # false negatives are left out of both softmaxes; the positive itself never is
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 2] = mask[2, 0] = mask[1, 1] = True
    got = alignment_loss(torch.tensor(b), torch.tensor(s), temperature=0.5, not_negative=mask)
    assert float(got) == pytest.approx(_info_nce_by_hand(b, s, 0.5, drop=[(0, 2), (2, 0)]), rel=1e-9)


def _brute_force(sim, mask):
    """Best injective map of real semantic interests to behaviour interests (all of them when M_u <= K)."""
    K, M = sim.shape
    cols = [m for m in range(M) if mask[m]]
    best, best_map = -np.inf, None
    n = min(len(cols), K)
    for chosen in itertools.combinations(cols, n):
        for rows in itertools.permutations(range(K), n):
            total = sum(sim[k, m] for k, m in zip(rows, chosen))
            if total > best:
                best, best_map = total, dict(zip(chosen, rows))
    return best, best_map or {}


@pytest.mark.parametrize("K,M", [(4, 4), (4, 2), (3, 5), (2, 1)])
def test_hungarian_matches_brute_force(K, M):
    rng = np.random.default_rng(K * 10 + M)
    b = 40
    sim = rng.normal(size=(b, K, M))
    mask = rng.random((b, M)) < 0.8
    mask[0] = False  # a user with no real semantic interest
    m = match_interests(torch.tensor(sim), torch.tensor(mask), "hungarian")
    assert m.behaviour.shape == m.matched.shape == (b, M)
    for u in range(b):
        best, best_map = _brute_force(sim[u], mask[u])
        got = {j: int(m.behaviour[u, j]) for j in range(M) if m.matched[u, j]}
        assert got == best_map, u
        assert not (m.matched[u] & ~torch.tensor(mask[u])).any()


def _greedy_by_hand(sim, mask):
    sim = np.where(mask[None, :], sim, -np.inf)
    out = {}
    while np.isfinite(sim).any():
        k, m = np.unravel_index(np.argmax(sim), sim.shape)
        out[int(m)] = int(k)
        sim[k, :], sim[:, m] = -np.inf, -np.inf
    return out


def test_greedy_option():
    sim = torch.tensor([[[0.9, 0.8], [0.85, 0.1]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # greedy takes 0.9 first (total 1.0); the optimum pairs the other way (total 1.65)
    assert match_interests(sim, mask, "greedy").behaviour.tolist() == [[0, 1]]
    assert match_interests(sim, mask, "hungarian").behaviour.tolist() == [[1, 0]]
    rng = np.random.default_rng(3)
    sims, masks = rng.normal(size=(30, 4, 5)), rng.random((30, 5)) < 0.7
    m = match_interests(torch.tensor(sims), torch.tensor(masks), "greedy")
    for u in range(30):
        assert {j: int(m.behaviour[u, j]) for j in range(5) if m.matched[u, j]} == _greedy_by_hand(sims[u], masks[u])
    with pytest.raises(ValueError):
        match_interests(torch.tensor(sims), torch.tensor(masks), "argmax")


def test_head_loss_is_the_direct_computation_on_brute_force_pairs():
    torch.manual_seed(0)
    b, K, M, d, D = 3, 4, 3, 6, 5
    head = EIMFHead(d, D, predictor_hidden=8, temperature=0.2, lambda_sp=0.3, lambda_ma=0.7)
    interests = torch.randn(b, K, d)
    sem = F.normalize(torch.randn(b, M, D), dim=-1)
    sem_mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    sem = sem * sem_mask[..., None]  # padding rows are zeros, as the sampler pads them
    sem[2, 1] = sem[0, 2]  # the same phrase for two users: not a negative of each other
    out = head(interests, sem, sem_mask)

    with torch.no_grad():
        sim = (torch.einsum("bkd,bmd->bkm", F.normalize(interests, dim=-1), F.normalize(head.projection(sem), dim=-1))
               + torch.einsum("bkd,bmd->bkm", F.normalize(head.predictor(interests), dim=-1), sem)).numpy()
    pairs = []
    for u in range(b):
        _, mapping = _brute_force(sim[u], sem_mask[u].numpy())
        pairs += [(u, mapping[j], j) for j in sorted(mapping)]
    assert len(pairs) == 6
    v = torch.stack([interests[u, k] for u, k, _ in pairs]).double()
    s = torch.stack([sem[u, j] for u, _, j in pairs]).double()
    with torch.no_grad():
        pred, proj = head.predictor(v.float()).double(), head.projection(s.float()).double()
    sp = np.mean([1 - float(F.cosine_similarity(p, t, dim=0)) for p, t in zip(pred, s)])
    dup = [(i, j) for i in range(6) for j in range(6)
           if i != j and pairs[i][0] != pairs[j][0] and torch.allclose(s[i], s[j])]
    assert len(dup) == 2
    ma = _info_nce_by_hand(v.numpy(), proj.numpy(), 0.2, drop=dup)
    assert float(out["semantic_prediction"].detach()) == pytest.approx(sp, rel=1e-5)
    assert float(out["alignment"].detach()) == pytest.approx(ma, rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(0.3 * sp + 0.7 * ma, rel=1e-5)


# ---------------------------------------------------------------------------------------------- sampler
def _seqs(lengths):
    # item value encodes (user index, position): 1000 * (i + 1) + p
    return [np.arange(n, dtype=np.int64) + 1000 * (i + 1) for i, n in enumerate(lengths)]


def test_sampler_share_and_semantics_per_row():
    lengths = [10, 3, 12, 20, 8, 30, 15, 9]
    seqs, users = _seqs(lengths), np.arange(len(lengths)) + 500  # ids differ from positions
    rng = np.random.default_rng(0)
    # users 500, 501 (too short: len 3 <= min_cut), 503, 505 annotated, with 3, 2, 1, 2 interests
    semantics = {int(u): _unit(rng.normal(size=(m, 6))).astype(np.float32) for u, m in
                 [(500, 3), (501, 2), (503, 1), (505, 2)]}
    semantics[999] = _unit(rng.normal(size=(2, 6))).astype(np.float32)  # not a training user here
    s = SemanticTrainSampler(seqs, users, semantics, maxlen=5, batch_size=40, typical_share=0.3, min_cut=4, seed=1)
    assert s.n_typical_rows == 12 and sorted(s.typical_users.tolist()) == [500, 503, 505]
    seen = set()
    for batch in itertools.islice(iter(s), 20):
        assert isinstance(batch, SemanticBatch)
        assert batch.hist.shape == (40, 5) and batch.target.shape == (40,)
        assert batch.sem.shape == (12, 3, 6) and batch.sem_mask.shape == (12, 3)
        row_user = users[batch.target // 1000 - 1]
        assert batch.sem_rows.tolist() == list(range(12))
        assert set(row_user[:12]) <= {500, 503, 505}
        assert not set(row_user[12:]) & {500, 501, 503, 505, 999}
        assert 501 not in row_user  # too short to cut, annotated or not
        for r, u in zip(batch.sem_rows, row_user[batch.sem_rows]):
            m = len(semantics[int(u)])
            assert batch.sem_mask[r].tolist() == [True] * m + [False] * (3 - m)
            assert np.array_equal(batch.sem[r, :m], semantics[int(u)]) and not batch.sem[r, m:].any()
            seen.add(int(u))
        k = batch.target % 1000  # every row is still a ComiRec random cut of its own user
        assert (k >= 4).all() and (k < np.array(lengths)[batch.target // 1000 - 1]).all()
    assert seen == {500, 503, 505}
    first, again = (SemanticTrainSampler(seqs, users, semantics, maxlen=5, batch_size=40, typical_share=0.3,
                                         min_cut=4, seed=1).sample() for _ in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # seeded


def test_sampler_edge_shares_and_errors():
    seqs, users = _seqs([10, 10, 10]), [1, 2, 3]
    sem = {1: np.eye(2, 4, dtype=np.float32)}
    only_typical = SemanticTrainSampler(seqs[:1], users[:1], sem, maxlen=4, batch_size=8, typical_share=1.0)
    assert len(only_typical.sample().sem_rows) == 8
    none = SemanticTrainSampler(seqs, users, sem, maxlen=4, batch_size=8, typical_share=0.0).sample()
    assert len(none.sem_rows) == 0 and len(none.target) == 8 and (none.target // 1000 != 1).all()
    everyone = SemanticTrainSampler(seqs[:1], users[:1], sem, maxlen=4, batch_size=8, typical_share=0.5)
    assert everyone.n_typical_rows == 8 and len(everyone.sample().sem_rows) == 8  # all annotated: all typical
    with pytest.raises(ValueError, match="no annotated user"):
        SemanticTrainSampler(seqs, users, {}, maxlen=4, batch_size=8, typical_share=0.5)
    with pytest.raises(ValueError):
        SemanticTrainSampler(seqs, users, sem, maxlen=4, batch_size=8, typical_share=1.5)
    # a worker's shard (users 2, 3) without the annotated user 1: plain batches instead of an error
    for mode in SemanticTrainSampler.MODES:
        shard = SemanticTrainSampler(seqs[1:], users[1:], sem, maxlen=4, batch_size=8, typical_share=0.5,
                                     mode=mode, require_typical=False).sample()
        assert len(shard.sem_rows) == 0 and len(shard.target) == 8 and (shard.target // 1000 != 1).all()
        assert shard.rec_rows in (-1, 8)
    with pytest.raises(ValueError, match="no annotated user"):
        SemanticTrainSampler(seqs[1:], users[1:], sem, maxlen=4, batch_size=8, typical_share=0.5)


def test_extra_sampling_keeps_the_backbones_batch_and_appends_aux_rows():
    lengths = [10, 3, 12, 20, 8, 30, 15, 9]
    seqs, users = _seqs(lengths), np.arange(len(lengths)) + 500
    rng = np.random.default_rng(0)
    semantics = {int(u): _unit(rng.normal(size=(2, 6))).astype(np.float32) for u in (503,)}  # one typical user
    s = SemanticTrainSampler(seqs, users, semantics, maxlen=5, batch_size=40, typical_share=0.25, min_cut=4,
                             seed=1, mode="extra")
    counts = np.zeros(len(lengths))
    for batch in itertools.islice(iter(s), 50):
        assert batch.hist.shape == (50, 5) and batch.rec_rows == 40
        assert batch.sem_rows.tolist() == list(range(40, 50)) and batch.sem.shape == (10, 2, 6)
        row_user = users[batch.target // 1000 - 1]
        assert set(row_user[40:]) == {503}  # the aux rows: typical users only
        np.add.at(counts, batch.target[:40] // 1000 - 1, 1)
    # the recommendation rows: every eligible user, annotated or not, about equally often (as the backbone's)
    eligible = np.array(lengths) > 4
    assert (counts[eligible] > 0).all() and counts[~eligible].sum() == 0
    assert counts[3] / counts[eligible].mean() < 1.5  # the typical user is not over-sampled there
    with pytest.raises(ValueError, match="typical_sampling"):
        SemanticTrainSampler(seqs, users, semantics, maxlen=5, batch_size=8, typical_share=0.25, mode="nope")


def test_trainer_extra_rows_feed_only_the_auxiliary_losses():
    """With ``extra`` rows, the recommendation loss is the one of the first rec_rows rows alone."""
    cfg = load_config()
    model, loss_fn, runner = _tiny_setup(head=True)
    b = _tiny_batch(B=11)
    extra = SemanticBatch(b.hist, b.mask, b.target, np.array([8, 9, 10]), b.sem, b.sem_mask, 8)
    torch.manual_seed(5)
    m = _trainer(cfg, model, loss_fn, runner).train_step(extra)
    model2, loss_fn2, _ = _tiny_setup(head=True)
    torch.manual_seed(5)
    hist, mask, target = (torch.as_tensor(x[:8]) for x in b[:3])
    assert m["rec"] == pytest.approx(float(model2(hist, mask, target, loss_fn2)["rec"]), rel=1e-6)


def test_train_sampler_stream_is_unchanged_by_the_refactor():
    # The same draws as before sample_users() existed: users, then cuts, from the one generator.
    seqs = _seqs([6, 9, 30])
    s = TrainSampler(seqs, maxlen=5, batch_size=16, seed=4)
    rng = np.random.default_rng(4)
    u = rng.integers(0, 3, size=16)
    k = rng.integers(4, np.array([6, 9, 30])[u])
    hist, mask, target = s.sample()
    assert np.array_equal(target, 1000 * (u + 1) + k)


# ---------------------------------------------------------------------------------------------- training hook
def _tiny_setup(seed=0, head=False, n_items=30, K=3, d=8):
    from eimf.models import ComiRecSA
    from eimf.models.negatives import SampledSoftmaxLoss, UniformSampler
    from eimf.training.loop import StepRunner

    torch.manual_seed(seed)
    model = ComiRecSA(n_items, dim=d, num_interests=K, maxlen=6)
    loss_fn = SampledSoftmaxLoss(UniformSampler(n_items), 10)
    runner = StepRunner(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    if head:
        runner.attach_head(EIMFHead(d, 5, predictor_hidden=4, lambda_sp=1.0, lambda_ma=1.0))
    return model, loss_fn, runner


def _tiny_batch(seed=0, B=8, b=3, M=2, D=5, n_items=30):
    rng = np.random.default_rng(seed)
    hist = rng.integers(1, n_items + 1, size=(B, 6))
    mask = np.ones((B, 6), dtype=bool)
    mask[:, 4:] = False
    hist[~mask] = 0
    target = rng.integers(1, n_items + 1, size=B)
    sem = _unit(rng.normal(size=(b, M, D))).astype(np.float32)
    sem_mask = np.ones((b, M), dtype=bool)
    sem_mask[1, 1] = False
    sem[1, 1] = 0
    return SemanticBatch(hist, mask, target, np.array([0, 2, 5]), sem, sem_mask)


def _trainer(cfg, model, loss_fn, runner, batches=None):
    from eimf.training.multitask import EIMFTrainer

    return EIMFTrainer(cfg, model, loss_fn, runner, batches, None, None)


def test_gradients_reach_projection_predictor_and_backbone():
    model, loss_fn, runner = _tiny_setup(head=True)
    ids = {id(p) for g in runner.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in ids for p in runner.head.parameters())  # P and g are trained...
    assert not any(k.startswith(("projection", "predictor")) for k in model.state_dict())  # ...not exported
    batch = _tiny_batch()
    hist, mask, target = (torch.as_tensor(x) for x in batch[:3])
    out = model(hist, mask, target, loss_fn, True)
    rows = torch.as_tensor(batch.sem_rows)
    aux = runner.head(out["interests"][rows], torch.as_tensor(batch.sem), torch.as_tensor(batch.sem_mask))
    for name in ("semantic_prediction", "alignment"):
        runner.optimizer.zero_grad(set_to_none=True)
        aux[name].backward(retain_graph=True)
        own = runner.head.predictor if name == "semantic_prediction" else runner.head.projection
        other = runner.head.projection if name == "semantic_prediction" else runner.head.predictor
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own.parameters()), name
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in other.parameters()), name
        # the backbone learns from both auxiliary tasks: extractor and the item table of the typical rows
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.extractor.parameters()), name
        assert model.item_emb.weight.grad[torch.as_tensor(batch.hist[batch.sem_rows])].abs().sum() > 0


def test_alignment_through_a_behaviour_projection_trains_h_and_reaches_v_only_through_it():
    """ma_projection=mlp: the InfoNCE acts on h(v); h is trained with P, and v still gets the gradient (via h)."""
    torch.manual_seed(0)
    head = EIMFHead(8, 5, predictor_hidden=4, ma_projection="mlp")
    plain = EIMFHead(8, 5, predictor_hidden=4)
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("behaviour_projection")})
    v = torch.randn(3, 3, 8, requires_grad=True)
    sem = torch.as_tensor(_tiny_batch().sem)
    mask = torch.ones(3, 2, dtype=torch.bool)
    out = head(v, sem, mask)
    out["alignment"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.behaviour_projection.parameters())
    assert v.grad.abs().sum() > 0
    assert not torch.isclose(out["alignment"], plain(v, sem, mask)["alignment"])  # a different objective
    assert out["semantic_prediction"].item() == pytest.approx(plain(v, sem, mask)["semantic_prediction"].item())
    with pytest.raises(ValueError, match="ma_projection"):
        EIMFHead(8, 5, ma_projection="deep")


def test_own_interests_and_near_duplicates_are_not_negatives():
    """One user with two interests: masking the row's own other interest leaves each positive alone (loss 0).
    Two users whose interests are near-copies (cos 0.95) are each other's negative only above duplicate_cos."""
    torch.manual_seed(0)
    v = torch.randn(1, 2, 6)
    sem = torch.as_tensor(_unit(np.random.default_rng(0).normal(size=(1, 2, 5))), dtype=torch.float32)
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert EIMFHead(6, 5)(v, sem, mask)["alignment"].item() > 0
    assert EIMFHead(6, 5, mask_own_interests=True)(v, sem, mask)["alignment"].item() == pytest.approx(0.0, abs=1e-6)

    a = np.array([1.0, 0.0, 0.0, 0.0, 0.0])
    b = np.array([0.95, np.sqrt(1 - 0.95 ** 2), 0.0, 0.0, 0.0])  # cos(a, b) = 0.95
    two = torch.as_tensor(np.stack([a, b])[:, None, :], dtype=torch.float32)  # 2 users, 1 interest each
    vv, one = torch.randn(2, 1, 6), torch.ones(2, 1, dtype=torch.bool)
    assert EIMFHead(6, 5)(vv, two, one)["alignment"].item() > 0
    assert EIMFHead(6, 5, duplicate_cos=0.9)(vv, two, one)["alignment"].item() == pytest.approx(0.0, abs=1e-6)


def test_evidence_matching_follows_the_cited_items_not_the_random_head():
    """matching_space=evidence: semantic interest m goes to the behaviour interest nearest the mean embedding of
    its cited items; an interest with no citation falls back to the head's similarity."""
    v = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # [1, K=3, d=3]
    sem = torch.as_tensor(_unit(np.random.default_rng(1).normal(size=(1, 2, 5))), dtype=torch.float32)
    mask = torch.ones(1, 2, dtype=torch.bool)
    grounding = torch.tensor([[[0.1, 0.0, 2.0], [0.0, 3.0, 0.2]]])  # interest 0 ~ v_2, interest 1 ~ v_1
    for seed in range(3):  # whatever the head's random weights
        torch.manual_seed(seed)
        head = EIMFHead(3, 5, matching_space="evidence")
        assert head.needs_evidence
        m = head.match(v, sem, mask, grounding)
        assert m.behaviour[0].tolist() == [2, 1] and m.matched.all()
    with pytest.raises(ValueError, match="grounding"):
        head.match(v, sem, mask)
    uncited = grounding.clone()
    uncited[0, 1] = 0  # interest 1 cites nothing: matched by the head, still one-to-one
    m = head.match(v, sem, mask, uncited)
    assert m.behaviour[0, 0].item() == 2 and m.behaviour[0, 1].item() != 2


def test_sampler_carries_each_typical_rows_cited_items():
    from eimf.formats.annotations import semantic_evidence
    import pandas as pd

    ann = pd.DataFrame({"user": [7, 7, 9, 9], "interest_idx": [1, 0, 0, -1], "status": ["ok", "ok", "ok", "failed"],
                        "evidence_items": [[5], [3, 4], [], []], "vector": [np.ones(2)] * 4})
    ev = semantic_evidence(ann)
    assert ev[7].tolist() == [[3, 4], [5, 0]] and ev[9].tolist() == [[0]]
    seqs = [np.arange(1, 11), np.arange(1, 11), np.arange(1, 11)]
    sem = {7: _unit(np.ones((2, 4))).astype(np.float32), 9: _unit(np.ones((1, 4))).astype(np.float32)}
    s = SemanticTrainSampler(seqs, [7, 8, 9], sem, maxlen=5, batch_size=8, typical_share=0.5, seed=0, evidence=ev)
    batch = s.sample()
    assert batch.evidence.shape == (4, 2, 2)
    for i in range(4):
        typical = int(s.typical_users[np.flatnonzero(
            [(s.sem[j] == batch.sem[i]).all() for j in range(len(s.sem))])[0]])
        assert batch.evidence[i].tolist() == ([[3, 4], [5, 0]] if typical == 7 else [[0, 0], [0, 0]])
    assert SemanticTrainSampler(seqs, [7, 8, 9], sem, maxlen=5, batch_size=8, typical_share=0.5).sample().evidence is None


def test_trainer_step_with_evidence_matching_looks_up_the_cited_rows():
    cfg = load_config(None, ["eimf.experimental.matching_space=evidence"])
    model, loss_fn, runner = _tiny_setup()
    runner.attach_head(EIMFHead.from_config(load_config(None, ["eimf.experimental.matching_space=evidence", "model.dim=8",
                                                                "eimf.predictor_hidden=4"]), 5))
    batch = _tiny_batch()
    evidence = np.zeros((3, 2, 2), dtype=np.int64)
    evidence[0, 0] = [4, 5]
    trainer = _trainer(cfg, model, loss_fn, runner)
    m = trainer.train_step(batch._replace(evidence=evidence))
    assert math.isfinite(m["loss/alignment"]) and math.isfinite(m["loss/semantic_prediction"])
    with pytest.raises(ValueError, match="no evidence items"):
        trainer.train_step(batch)
    assert runner.item_rows(torch.tensor([[4, 5]])).shape == (1, 2, 8)


def test_trainer_step_with_semantics_reports_and_adds_aux_losses():
    cfg = load_config()
    model, loss_fn, runner = _tiny_setup(head=True)
    before = {n: p.detach().clone() for n, p in runner.head.named_parameters()}
    torch.manual_seed(5)
    m = _trainer(cfg, model, loss_fn, runner).train_step(_tiny_batch())
    assert set(m) == {"rec", "loss", "loss/main", "loss/semantic_prediction", "loss/alignment"}
    assert m["loss/main"] == pytest.approx(m["rec"])
    assert m["loss"] == pytest.approx(m["loss/main"] + m["loss/semantic_prediction"] + m["loss/alignment"], rel=1e-6)
    assert all(not torch.equal(before[n], p) for n, p in runner.head.named_parameters())  # P and g stepped

    # reference: the same step written out by hand, from the same initial weights and negatives
    model2, loss_fn2, runner2 = _tiny_setup(head=True)
    torch.manual_seed(5)
    batch = _tiny_batch()
    hist, mask, target = (torch.as_tensor(x) for x in batch[:3])
    out = model2(hist, mask, target, loss_fn2, True)
    aux = runner2.head(out["interests"][torch.as_tensor(batch.sem_rows)], torch.as_tensor(batch.sem),
                       torch.as_tensor(batch.sem_mask))
    runner2.optimizer.zero_grad()
    (out["loss"] + aux["loss"]).backward()
    runner2.optimizer.step()
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_trainer_without_eimf_is_unchanged(caplog):
    cfg = load_config()

    def reference():
        model, loss_fn, runner = _tiny_setup()
        torch.manual_seed(9)
        hist, mask, target = (torch.as_tensor(x) for x in _tiny_batch()[:3])
        out = model(hist, mask, target, loss_fn)
        runner.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        runner.optimizer.step()
        return model.state_dict(), {k: float(v) for k, v in out.items()}

    ref_state, ref_metrics = reference()
    plain = tuple(_tiny_batch()[:3])
    cases = [(False, plain), (False, _tiny_batch()), (True, plain)]  # no head; semantics but no head; head, no semantics
    for with_head, batch in cases:
        model, loss_fn, runner = _tiny_setup(head=with_head)
        torch.manual_seed(9)
        with caplog.at_level(logging.WARNING, logger="eimf.training.loop"):
            m = _trainer(cfg, model, loss_fn, runner).train_step(batch)
        assert m == pytest.approx(ref_metrics) and set(m) == {"rec", "loss"}
        for (n, a), b in zip(model.state_dict().items(), ref_state.values()):
            assert torch.equal(a, b), n
        assert ("no auxiliary loss" in caplog.text) == with_head
        caplog.clear()


def test_fit_reports_aux_metrics_only_with_eimf():
    cfg = load_config(None, ["train.max_steps=4", "train.log_every=2", "train.eval_every=1000"])
    reports = {}
    for with_head in (False, True):
        model, loss_fn, runner = _tiny_setup(head=with_head)
        batches = itertools.repeat(_tiny_batch())
        got = []
        _trainer(cfg, model, loss_fn, runner, batches).fit(report=lambda m, s, e: got.append(dict(m)))
        reports[with_head] = got
    assert len(reports[False]) == 2 and set(reports[False][0]) == {"train/loss", "train/examples_per_s",
                                                                   "train/input_share"}
    aux = {"train/loss/main", "train/loss/semantic_prediction", "train/loss/alignment"}
    assert all(aux <= set(r) for r in reports[True])
    r = reports[True][1]
    assert r["train/loss"] == pytest.approx(r["train/loss/main"] + r["train/loss/semantic_prediction"]
                                            + r["train/loss/alignment"], rel=1e-5)


def test_head_is_checkpointed_but_not_in_the_best_model(tmp_path):
    from eimf.formats.checkpoints import HEAD as HEAD_FILE
    from eimf.training.loop import LoopState, load_best_head, load_training_state, save_training_state

    cfg = load_config(None, ["model.dim=8", "model.num_interests=3", "model.maxlen=6"])
    model, loss_fn, runner = _tiny_setup(head=True)
    trainer = _trainer(cfg, model, loss_fn, runner)
    for _ in range(2):
        trainer.train_step(_tiny_batch())
    best = trainer.best_model()  # a plain backbone: loads with strict keys, so no head parameter can be in it
    assert not any(k.startswith(("projection", "predictor")) for k in trainer.best_state)
    save_training_state(tmp_path, runner, LoopState(step=2), trainer.best_state)
    assert (tmp_path / HEAD_FILE).exists()
    assert set(torch.load(tmp_path / "best_model.pt")) == set(best.state_dict())

    _, _, other = _tiny_setup(seed=1, head=True)
    load_training_state(tmp_path, other)
    for (n, a), b in zip(runner.head.state_dict().items(), other.head.state_dict().values()):
        assert torch.equal(a, b), n
    assert other.optimizer.state_dict()["state"].keys() == runner.optimizer.state_dict()["state"].keys()
    with pytest.raises(RuntimeError):
        runner.attach_head(EIMFHead(8, 5))
    # the best evaluation's head travels with the checkpoint, so a resumed run exports the matching g
    assert load_best_head(tmp_path) is None
    best_head = {k: v.clone() for k, v in runner.head.state_dict().items()}
    save_training_state(tmp_path, runner, LoopState(step=2), trainer.best_state, best_head_state=best_head)
    restored = load_best_head(tmp_path)
    assert restored.keys() == best_head.keys() and all(torch.equal(restored[k], best_head[k]) for k in best_head)


# ---------------------------------------------------------------------------------------------- explanations
def test_labels_are_the_nearest_phrases_through_g():
    import pandas as pd

    from eimf.serving.explain import PhraseTable, label_interests

    D = 4
    head = EIMFHead(D, D, predictor_hidden=0)
    with torch.no_grad():  # g = a known rotation-free map: diag(1, 2, 1, 1)
        head.predictor.weight.copy_(torch.diag(torch.tensor([1.0, 2.0, 1.0, 1.0])))
        head.predictor.bias.zero_()
    vec = _unit(np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]], dtype=np.float32))
    df = pd.DataFrame({"user": [1, 1, 2, 2, 3], "status": ["ok"] * 4 + ["failed"],
                       "name": ["Drama", "Comedy", "Horror", "Drama", None],
                       "description": ["d", "c", "h", "d2", None], "vector": list(vec) + [None]})
    table = PhraseTable.from_annotations(df)
    assert table.names == ["Drama", "Comedy", "Horror", "Drama"] and table.vectors.shape == (4, D)
    v = torch.tensor([[1.0, 0.0, 0.1, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    labels = label_interests(head, v, table, topk=2)
    # g(v_2) = (0.5, 1, 0, 0): nearest (1,1,0,0)/sqrt2 with cos 1.5/sqrt(2.5), then (0,1,0,0) with 1/sqrt(1.25)
    assert [[n for n, _ in lab] for lab in labels] == [["Drama", "Drama"], ["Drama", "Comedy"], ["Horror", "Drama"]]
    assert labels[1][0][1] == pytest.approx(1.5 / math.sqrt(2 * 1.25), rel=1e-6)
    assert labels[1][1][1] == pytest.approx(1 / math.sqrt(1.25), rel=1e-6)
    batched = label_interests(head, v.unsqueeze(0).repeat(2, 1, 1), table)
    assert len(batched) == 2 and [lab[0][0] for lab in batched[1]] == ["Drama", "Drama", "Horror"]


# ---------------------------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def ml100k_annotated(tmp_path_factory):
    """Prepared ML-100K plus metadata-annotator annotations (packaged MiniLM) for 20 long training users."""
    from eimf.data.preprocess import prepare
    from eimf.semantic.annotate import annotate_users
    from eimf.semantic.annotators.metadata import MetadataAnnotator
    from eimf.semantic.encoder import SemanticEncoder

    out = tmp_path_factory.mktemp("eimf")
    cfg = load_config(None, ["data.dataset=ml-100k", f"data.data_dir={DATA_DIR}", f"data.output_dir={out / 'data'}"])
    data = prepare(cfg.data, engine="local")
    lens = data.train["items"].map(len).to_numpy()
    users = np.asarray(data.train["user"])[np.argsort(-lens, kind="stable")[:20]]
    encoder = SemanticEncoder()
    df, stats = annotate_users(data, users, MetadataAnnotator(embed=encoder), None, encoder, K=4, token_budget=512,
                               out_dir=str(out / "ann"))
    assert stats["failures"] == 0 and stats["interests"] >= 40
    return cfg, data, str(out / "ann"), df


@pytest.mark.timeout(900)
@needs_ml100k
def test_eimf_trains_on_ml100k_and_aux_losses_decrease(ml100k_annotated):
    from eimf.serving.explain import PhraseTable, label_interests
    from eimf.training.loop import seed_everything
    from eimf.training.multitask import EIMFTrainer, build_eimf, eimf_batches
    from eimf.training.components import build_components

    base, data, ann_dir, df = ml100k_annotated
    cfg = load_config(None, ["eimf.enabled=true", f"eimf.annotations={ann_dir}", "eimf.typical_share=0.25",
                             "train.batch_size=64", "train.max_steps=120", "train.log_every=20",
                             "train.eval_every=100000"])
    seed_everything(cfg.train.seed)
    model, loss_fn, runner, _ = build_components(cfg, data.n_items)
    semantics = build_eimf(cfg, runner)
    assert runner.head is not None and len(semantics) == 20
    assert next(iter(semantics.values())).shape[1] == 384
    batches = eimf_batches(cfg, data.train["user"], list(data.train["items"]), semantics, 64, seed=0)
    assert batches.n_typical_rows == 16
    reports = []
    trainer = EIMFTrainer(cfg, model, loss_fn, runner, iter(batches), data.valid, data.test)
    state = trainer.fit(report=lambda m, s, e: reports.append(dict(m)))
    assert state.step == 120 and len(reports) == 6
    # (the main loss is logged but barely moves in 120 steps; seen: SP 0.42 -> 0.24, MA 4.3 -> 2.3)
    assert all(math.isfinite(r["train/loss/main"]) for r in reports)
    for key in ("train/loss/semantic_prediction", "train/loss/alignment"):
        curve = [r[key] for r in reports]
        assert all(math.isfinite(x) for x in curve), key
        assert np.mean(curve[-2:]) < np.mean(curve[:2]), (key, curve)
    sp = [r["train/loss/semantic_prediction"] for r in reports]
    assert sp[-1] < 0.8 * sp[0], sp  # g learns the text space, not just noise
    assert not any(k.startswith(("projection", "predictor")) for k in trainer.best_model().state_dict())

    # every interest of an annotated user gets a label from the annotated phrases, no LLM
    table = PhraseTable.from_annotations(df)
    u = int(next(iter(semantics)))
    seq = np.asarray(data.train.set_index("user").loc[u, "items"])[-cfg.model.maxlen:]
    with torch.no_grad():
        v = trainer.model.interests(torch.as_tensor(seq)[None], torch.ones(1, len(seq), dtype=torch.bool))
    labels = label_interests(runner.head, v[0], table, topk=3)
    assert len(labels) == cfg.model.num_interests
    assert all(len(lab) == 3 and lab[0][0] in table.names and lab[0][1] >= lab[1][1] for lab in labels)


@pytest.mark.timeout(600)
@needs_ml100k
def test_exported_eimf_model_serves_the_same_without_the_annotation_files(ml100k_annotated, tmp_path):
    """Inference is IBIM alone: deleting every annotation file and the checkpoint, and dropping the head and the
    phrase table from the model folder, changes no recommendation."""
    import json
    import shutil

    from eimf.data.sampling import eval_batches
    from eimf.serving.folder import ModelFolder
    from eimf.training.loop import save_training_state, seed_everything
    from eimf.training.multitask import EIMFTrainer, build_eimf, eimf_batches
    from eimf.steps.export import export_checkpoint
    from eimf.training.components import build_components

    base, data, shared_ann, _ = ml100k_annotated
    ann_dir = tmp_path / "ann"
    shutil.copytree(shared_ann, ann_dir)  # our own copy: this test deletes it
    cfg = load_config(None, ["eimf.enabled=true", f"eimf.annotations={ann_dir}", "train.batch_size=64",
                             "train.max_steps=40", "train.eval_every=20", "train.log_every=20"])
    seed_everything(cfg.train.seed)
    model, loss_fn, runner, _ = build_components(cfg, data.n_items)
    semantics = build_eimf(cfg, runner)
    batches = eimf_batches(cfg, data.train["user"], list(data.train["items"]), semantics, 64, seed=0)
    trainer = EIMFTrainer(cfg, model, loss_fn, runner, iter(batches), data.valid.iloc[:50], data.test)
    state = trainer.fit()
    ckpt = tmp_path / "ckpt"
    save_training_state(ckpt, runner, state, trainer.best_state, best_head_state=trainer.best_head_state)
    (ckpt / "metrics.json").write_text(json.dumps({"step": state.step}))
    export = tmp_path / "export"
    export_checkpoint(ckpt, str(export), cfg, str(data.path))
    # g and the phrases label interests; they sit beside the model, never inside it
    assert {"eimf_head.pt", "phrases.parquet"} <= set(os.listdir(export))

    _, hist, mask, _, _ = next(eval_batches(data.test, cfg.model.maxlen, 64))

    def recs(path):
        folder = ModelFolder.load(str(path))
        assert not any(k.startswith(("projection", "predictor")) for k in folder.model.state_dict())
        with torch.no_grad():
            v = folder.model.interests(torch.as_tensor(hist), torch.as_tensor(mask)).numpy()
        return folder.index.search_multi(v, 50)

    ids_before, scores_before = recs(export)
    shutil.rmtree(ann_dir)
    shutil.rmtree(ckpt)
    backbone_only = ModelFolder.load(str(export))
    backbone_only.head = backbone_only.phrases = None
    backbone_only.write(str(tmp_path / "backbone_only"))
    assert "eimf_head.pt" not in os.listdir(tmp_path / "backbone_only")
    ids_after, scores_after = recs(tmp_path / "backbone_only")
    assert ids_before.shape == (len(hist), 50)
    np.testing.assert_array_equal(ids_before, ids_after)
    np.testing.assert_array_equal(scores_before, scores_after)


def test_window_overlap_and_the_aligned_cut():
    from eimf.data.sampling import aligned_cut_low, window_overlap

    # a 100-item sequence whose prompt showed positions [80, 100); histories of up to 10 items
    assert window_overlap(np.array([50, 85, 90, 95]), 10, 80, 100).tolist() == [0.0, 0.5, 1.0, 1.0]
    assert aligned_cut_low(100, 10, 80, 100, 0.5, min_cut=4) == 85
    assert aligned_cut_low(100, 10, 80, 100, 1.0, min_cut=4) == 90
    assert aligned_cut_low(100, 10, 0, 100, 1.0, min_cut=4) == 4  # the whole sequence was annotated
    assert aligned_cut_low(12, 10, 0, 5, 0.9, min_cut=4) == 4  # unreachable share: the best overlap there is


def test_aligned_sampler_draws_typical_cuts_inside_the_annotated_window():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 50, 100) for _ in range(3)]
    sem = {7: _unit(np.ones((2, 4))).astype(np.float32)}
    windows = {7: (80, 100)}
    free = SemanticTrainSampler(seqs, [7, 8, 9], sem, maxlen=10, batch_size=40, typical_share=0.5, seed=0,
                                windows=windows)
    aligned = SemanticTrainSampler(seqs, [7, 8, 9], sem, maxlen=10, batch_size=40, typical_share=0.5, seed=0,
                                   windows=windows, window_overlap_share=0.5)
    assert free.overlap_share < 0.2 and aligned.overlap_share == pytest.approx(0.9)  # cuts 85..99
    seq = seqs[0]
    for _ in range(20):
        b = aligned.sample()
        for row in b.sem_rows:  # the target is seq[cut]: its position says where the cut fell
            pos = [i for i in range(4, 100) if seq[i] == b.target[row]
                   and list(seq[max(0, i - 10):i]) == list(b.hist[row][b.mask[row]])]
            assert pos and min(pos) >= 85
    with pytest.raises(ValueError, match="window_overlap"):
        SemanticTrainSampler(seqs, [7, 8, 9], sem, maxlen=10, batch_size=8, typical_share=0.5, windows=windows,
                             window_overlap_share=2.0)


def test_annotations_record_the_prompted_window(tmp_path):
    from eimf.formats.annotations import annotations_table, semantic_windows
    from eimf.semantic.annotate import annotations_frame
    from eimf.semantic.annotators.base import AnnotationRequest, AnnotationResult
    import pandas as pd

    req = AnnotationRequest(user=3, messages=[], history_hash="h", n_items=2, item_ids=[5, 6], window_start=8,
                            window_end=10)
    res = AnnotationResult(user=3, interests=[{"name": "a", "description": "b", "evidence": [1]}], raw_text=None,
                           status="ok", attempts=1, model="m")
    df = annotations_frame([req], [res], lambda texts: np.ones((len(texts), 4)))
    table = annotations_table(df)
    assert table.column("window_start").to_pylist() == [8] and table.column("window_end").to_pylist() == [10]
    assert semantic_windows(table.to_pandas()) == {3: (8, 10)}
    with pytest.raises(ValueError, match="re-run the annotation step"):
        semantic_windows(pd.DataFrame({"user": [3], "status": ["ok"]}))


def test_item_alignment_pulls_the_target_rows_toward_their_texts():
    """lambda_item > 0: every EIMF step adds InfoNCE(item rows of the distinct targets, q(their texts)); the
    table's target rows and q get its gradient, items without text take no part."""
    cfg = load_config(None, ["eimf.experimental.lambda_item=0.5"])
    model, loss_fn, runner = _tiny_setup()
    head = EIMFHead(8, 5, predictor_hidden=4, lambda_sp=1.0, lambda_ma=1.0, lambda_item=0.5)
    runner.attach_head(head)
    text = _unit(np.random.default_rng(3).normal(size=(31, 5))).astype(np.float32)
    text[0] = 0
    text[7] = 0  # item 7 has no text
    with pytest.raises(RuntimeError, match="set_item_text"):
        head.item_alignment(torch.zeros(2, 8), torch.tensor([1, 2]))
    head.set_item_text(text)
    assert not any(k.startswith("item_text") for k in head.state_dict())  # frozen, never saved
    ids = torch.tensor([1, 2, 7, 9])
    rows = model.item_emb(ids)
    loss = head.item_alignment(rows, ids)
    loss.backward()
    assert loss.item() > 0 and all(p.grad.abs().sum() > 0 for p in head.item_projection.parameters())
    grad = model.item_emb.weight.grad
    assert grad[[1, 2, 9]].abs().sum(1).min() > 0 and grad[7].abs().sum() == 0

    model.zero_grad(set_to_none=True)
    m = _trainer(cfg, model, loss_fn, runner).train_step(_tiny_batch())
    assert m["loss"] == pytest.approx(m["loss/main"] + m["loss/semantic_prediction"] + m["loss/alignment"]
                                      + 0.5 * m["loss/item_alignment"], rel=1e-5)
