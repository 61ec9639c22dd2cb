"""Negative samplers and the sampled softmax, checked against direct computations."""
import math

import pytest
import torch

from eimf.config import ModelConfig, NegativesConfig
from eimf.models.negatives import (
    LogUniformSampler, Negatives, SampledSoftmaxLoss, UniformSampler, build_loss,
)


def log_uniform_p(i, n):
    return (math.log(i + 1) - math.log(i)) / math.log(n + 1)


@pytest.mark.parametrize("cls", [LogUniformSampler, UniformSampler])
def test_log_prob_is_a_distribution_over_1_to_n(cls):
    s = cls(50)
    assert math.isclose(s.log_prob(torch.arange(1, 51)).exp().sum().item(), 1.0, rel_tol=1e-9)
    ids = s.draw(5000, torch.Generator().manual_seed(0))
    assert ids.dtype == torch.int64 and ids.min() >= 1 and ids.max() <= 50  # 0 is padding: never drawn


def test_log_uniform_empirical_frequencies_match_formula():
    n, draws = 20, 400_000
    ids = LogUniformSampler(n).draw(draws, torch.Generator().manual_seed(1))
    freq = torch.bincount(ids, minlength=n + 1)[1:].double() / draws
    for i in range(1, n + 1):
        p = log_uniform_p(i, n)
        assert abs(freq[i - 1].item() - p) < 5 * math.sqrt(p * (1 - p) / draws), i
    assert torch.allclose(LogUniformSampler(n).log_prob(torch.arange(1, n + 1)).exp(),
                          torch.tensor([log_uniform_p(i, n) for i in range(1, n + 1)], dtype=torch.float64))


def test_unique_sampling_and_expected_counts():
    s = LogUniformSampler(300, unique=True)
    neg = s.sample(100, generator=torch.Generator().manual_seed(2))
    assert len(neg.ids) == 100 and len(set(neg.ids.tolist())) == 100 and neg.num_tries >= 100
    p = s.log_prob(neg.ids).exp()
    torch.testing.assert_close(s.log_q(neg.ids, neg.num_tries).double(),
                               torch.log(1 - (1 - p) ** neg.num_tries), rtol=1e-5, atol=1e-6)
    # num_tries is the draw at which the 100th distinct id appeared: replay the same stream to check
    stream = LogUniformSampler(300).draw(10 * int(neg.num_tries), torch.Generator().manual_seed(2))
    seen, order = set(), []
    for t, i in enumerate(stream.tolist()):
        if i not in seen:
            seen.add(i)
            order.append(i)
            if len(order) == 100:
                break
    assert order == neg.ids.tolist() and t + 1 == neg.num_tries
    # asking for the whole catalogue returns it, each item surely included (log expected count 0)
    every = s.sample(300)
    assert sorted(every.ids.tolist()) == list(range(1, 301))
    assert torch.all(s.log_q(every.ids, every.num_tries) == 0)
    # with replacement: log(num * p)
    r = LogUniformSampler(300)
    neg = r.sample(100, generator=torch.Generator().manual_seed(3))
    assert neg.num_tries == 100
    torch.testing.assert_close(r.log_q(neg.ids, 100).double(), torch.log(100 * r.log_prob(neg.ids).exp()),
                               rtol=1e-6, atol=1e-6)


def test_unique_sampling_inclusion_probability_is_close_to_expected_count():
    # TF's 1-(1-p)^tries is an approximation of the inclusion probability; check it is a good one.
    s, runs, hits, tries = LogUniformSampler(30, unique=True), 2000, torch.zeros(31), []
    g = torch.Generator().manual_seed(4)
    for _ in range(runs):
        neg = s.sample(10, generator=g)
        hits[neg.ids] += 1
        tries.append(neg.num_tries)
    ids = torch.tensor([1, 2, 5, 10, 30])
    predicted = sum(s.log_q(ids, t).exp() for t in tries) / runs
    torch.testing.assert_close(hits[ids] / runs, predicted.float(), atol=0.04, rtol=0.1)


def direct_loss(user, target, table, neg_ids, log_q_neg, log_q_pos, remove_hits, beta=0.0):
    """Per-example sampled softmax with explicit loops."""
    total = 0.0
    for b in range(len(target)):
        pos = float(user[b] @ table[target[b]]) - log_q_pos[b]
        negs = []
        for j, i in enumerate(neg_ids):
            if remove_hits and i == target[b]:
                continue
            negs.append(float(user[b] @ table[i]) - log_q_neg[j])
        if beta == 0:
            z = math.exp(pos) + sum(math.exp(x) for x in negs)
        else:  # REMI: M * sum_j softmax(beta x)_j exp(x_j)
            w = [math.exp(beta * x) for x in negs]
            z = math.exp(pos) + len(negs) * sum(wj * math.exp(x) for wj, x in zip(w, negs)) / sum(w)
        total += -(pos - math.log(z))
    return total / len(target)


@pytest.mark.parametrize("unique", [False, True])
@pytest.mark.parametrize("logq", [False, True])
@pytest.mark.parametrize("remove_hits", [False, True])
@pytest.mark.parametrize("beta", [0.0, 1.5])
def test_sampled_softmax_matches_direct_computation(unique, logq, remove_hits, beta):
    torch.manual_seed(0)
    n, d = 6, 3
    table = torch.randn(n + 1, d, dtype=torch.float64)
    user = torch.randn(4, d, dtype=torch.float64)
    target = torch.tensor([1, 3, 3, 6])
    neg_ids = torch.tensor([2, 3, 5, 1]) if unique else torch.tensor([2, 3, 2, 5, 1])  # hits for 1 and 3
    tries = 9.0 if unique else float(len(neg_ids))
    sampler = LogUniformSampler(n, unique=unique)
    loss = SampledSoftmaxLoss(sampler, len(neg_ids), logq_correction=logq, remove_accidental_hits=remove_hits,
                              hard_negative_beta=beta)
    got = loss(user.float(), target, table.float(), negatives=Negatives(neg_ids, tries))

    def lq(ids):
        p = [log_uniform_p(int(i), n) for i in ids]
        if not logq:
            return [0.0] * len(ids)
        return [math.log(1 - (1 - q) ** tries) if unique else math.log(tries * q) for q in p]

    want = direct_loss(user, target.tolist(), table, neg_ids.tolist(), lq(neg_ids), lq(target), remove_hits, beta)
    assert math.isclose(got.item(), want, rel_tol=1e-5)


def test_accidental_hits_are_ignored():
    torch.manual_seed(1)
    table, user, target = torch.randn(9, 4), torch.randn(3, 4), torch.tensor([2, 4, 7])
    loss = SampledSoftmaxLoss(UniformSampler(8), 3)
    base = loss(user, target, table, negatives=Negatives(torch.tensor([1, 5, 8]), 3.0))
    with_hits = loss(user, target, table, negatives=Negatives(torch.tensor([1, 5, 8, 2, 4, 7]), 3.0))
    # each row sees its own target among the extra negatives only once; the other two are real negatives,
    # so compare against a set where the row's own target was replaced by nothing
    for b in range(3):
        others = [i for i in [1, 5, 8, 2, 4, 7] if i != int(target[b])]
        one = loss(user[b:b + 1], target[b:b + 1], table, negatives=Negatives(torch.tensor(others), 3.0))
        full = loss(user[b:b + 1], target[b:b + 1], table,
                    negatives=Negatives(torch.tensor([1, 5, 8, 2, 4, 7]), 3.0))
        torch.testing.assert_close(one, full)
    assert with_hits > base  # the remaining extra negatives still count
    keep = SampledSoftmaxLoss(UniformSampler(8), 3, remove_accidental_hits=False)
    assert keep(user, target, table, negatives=Negatives(torch.tensor([1, 5, 8, 2, 4, 7]), 3.0)) > with_hits


def test_hard_negatives_tilt_towards_the_hardest():
    torch.manual_seed(2)
    table, user, target = torch.randn(31, 5), torch.randn(4, 5), torch.tensor([1, 2, 3, 4])
    neg = Negatives(torch.arange(10, 30), 20.0)
    plain = SampledSoftmaxLoss(UniformSampler(30), 20)(user, target, table, negatives=neg)
    zero = SampledSoftmaxLoss(UniformSampler(30), 20, hard_negative_beta=0.0)(user, target, table, negatives=neg)
    hard = SampledSoftmaxLoss(UniformSampler(30), 20, hard_negative_beta=200.0)(user, target, table, negatives=neg)
    assert torch.equal(plain, zero) and hard > plain
    # beta -> inf: the negative mass becomes M * exp(max logit)
    s_pos = (user * table[target]).sum(1)
    s_max = (user @ table[10:30].t()).max(1).values
    limit = (torch.logaddexp(s_pos, math.log(20) + s_max) - s_pos).mean()
    torch.testing.assert_close(hard, limit, rtol=1e-4, atol=1e-4)
    # uniform negatives (constant log-Q): exactly REMI's NCELoss.sampled_softmax_loss, transcribed
    beta = 1.5
    ori = torch.cat([s_pos.unsqueeze(1), user @ table[10:30].t()], 1)
    x = ori - ori.max(-1, keepdim=True).values
    imp = (beta * x[:, 1:] - (beta * x[:, 1:]).max(-1, keepdim=True).values).exp()
    ng = (imp * x[:, 1:].exp()).sum(-1) / imp.mean(-1)
    remi = (-(x[:, 0] - torch.log(x[:, 0].exp() + ng))).mean()
    ours = SampledSoftmaxLoss(UniformSampler(30), 20, hard_negative_beta=beta)(user, target, table, negatives=neg)
    torch.testing.assert_close(ours, remi)


def test_gradients_and_seeded_negatives():
    table = torch.randn(101, 8, requires_grad=True)
    user = torch.randn(5, 8, requires_grad=True)
    target = torch.randint(1, 101, (5,))
    for beta in (0.0, 1.0):
        loss = SampledSoftmaxLoss(LogUniformSampler(100, unique=True), 30, hard_negative_beta=beta)
        loss(user, target, table).backward()
        assert torch.isfinite(user.grad).all() and user.grad.abs().sum() > 0
        assert table.grad[target].abs().sum() > 0 and torch.all(table.grad[0] == 0)
    a = LogUniformSampler(100, unique=True).sample(30, torch.Generator().manual_seed(9))
    b = LogUniformSampler(100, unique=True).sample(30, torch.Generator().manual_seed(9))
    assert torch.equal(a.ids, b.ids) and a.num_tries == b.num_tries


def test_build_loss_from_config():
    f = build_loss(NegativesConfig(), 3500, 128)
    assert isinstance(f.sampler, LogUniformSampler) and f.num_negatives == 1280 and f.sampler.unique
    assert f.logq_correction and f.remove_accidental_hits and f.hard_negative_beta == 0.0
    f = build_loss(NegativesConfig(sampler="uniform", num_negatives=64, unique=False), 3500, 128,
                   ModelConfig(backbone="remi", beta=0.5))
    assert isinstance(f.sampler, UniformSampler) and f.num_negatives == 64 and not f.sampler.unique
    assert f.hard_negative_beta == 0.5
    with pytest.raises(ValueError):
        build_loss(NegativesConfig(sampler="zipf"), 10, 4)
