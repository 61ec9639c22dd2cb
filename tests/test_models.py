"""Backbones: shapes, masking, hard readout, gradients, reference routing semantics, REMI terms, seeds."""
import pytest
import torch

from eimf.config import ModelConfig, NegativesConfig
from eimf.models import MODELS, MultiInterestModel, build_model
from eimf.models.negatives import build_loss
from eimf.models.remi import routing_regularization
from eimf.modules.capsule import CapsuleRouting, squash

N_ITEMS, B, L, D, K = 40, 6, 12, 8, 3
BACKBONES = sorted(MODELS)


def make(backbone, seed=0, **kw) -> MultiInterestModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=backbone, dim=D, num_interests=K, maxlen=L, **kw)
    return build_model(cfg, N_ITEMS)


def batch(seed=1, T=L):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, 3, T // 2, T - 1, T, 5])[:B]
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    hist = torch.randint(1, N_ITEMS + 1, (B, T), generator=g) * mask
    target = torch.randint(1, N_ITEMS + 1, (B,), generator=g)
    return hist, mask, target


def loss_fn(num=20):
    return build_loss(NegativesConfig(num_negatives=num), N_ITEMS, B)


def encode(model, hist, mask, seed=123):
    torch.manual_seed(seed)  # MIND draws its routing logits per forward
    return model.encode(hist, mask)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shapes_and_loss(backbone):
    model = make(backbone)
    hist, mask, target = batch()
    assert model.interests(hist, mask).shape == (B, K, D)
    assert model.item_embeddings().shape == (N_ITEMS + 1, D)
    assert torch.all(model.item_embeddings()[0] == 0)  # padding row
    assert model.readout(model.interests(hist, mask), target).shape == (B, D)
    out = model.loss(hist, mask, target, loss_fn())
    assert {"loss", "rec"} <= set(out) and out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    torch.manual_seed(0)
    via_forward = model(hist, mask)  # forward() without a target = interests (what DDP/DeepSpeed call)
    torch.manual_seed(0)
    assert torch.equal(via_forward, model.interests(hist, mask))
    torch.manual_seed(0)
    via_forward = model(hist, mask, target, loss_fn())
    torch.manual_seed(0)
    assert torch.equal(via_forward["loss"], model.loss(hist, mask, target, loss_fn())["loss"])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_padded_ids_and_extra_padding_do_not_change_interests(backbone):
    model = make(backbone).eval()
    hist, mask, _ = batch(T=8)
    ref, aux = encode(model, hist, mask)
    garbage = torch.where(mask, hist, torch.randint(1, N_ITEMS + 1, hist.shape))
    torch.testing.assert_close(encode(model, garbage, mask)[0], ref)
    padded_hist = torch.cat([hist, torch.zeros(B, L - 8, dtype=hist.dtype)], 1)
    padded_mask = torch.cat([mask, torch.zeros(B, L - 8, dtype=torch.bool)], 1)
    torch.testing.assert_close(encode(model, padded_hist, padded_mask)[0], ref, rtol=1e-5, atol=1e-6)
    weights = next(iter(aux.values()))  # attention (SA/REMI) or routing weights (DR/MIND): [B, K, T]
    assert weights.shape == (B, K, 8)
    assert torch.all(weights[~mask.unsqueeze(1).expand_as(weights)] == 0)


def test_self_attention_is_a_distribution_over_real_positions():
    model = make("comirec_sa")
    hist, mask, _ = batch()
    interests, aux = model.encode(hist, mask)
    torch.testing.assert_close(aux["attention"].sum(-1), torch.ones(B, K))
    # V = A H with H the plain (position-free) item embeddings
    torch.testing.assert_close(interests, aux["attention"] @ model.item_emb(hist))


def test_hard_readout_picks_argmax_interest():
    model = make("comirec_sa")
    hist, mask, target = batch()
    interests = torch.randn(B, K, D)
    out = model.readout(interests, target)
    for b in range(B):
        scores = [float(interests[b, k] @ model.item_emb.weight[target[b]].detach()) for k in range(K)]
        assert torch.equal(out[b], interests[b, max(range(K), key=scores.__getitem__)])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradients_reach_every_weight(backbone):
    model = make(backbone, reg_lambda=1.0 if backbone == "remi" else 0.0)
    hist, mask, target = batch()
    model.loss(hist, mask, target, loss_fn())["loss"].backward()
    for name, p in model.named_parameters():
        if name == "extractor.w2.bias":  # a per-head constant cancels in the softmax over positions
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.all(model.item_emb.weight.grad[0] == 0)


@pytest.mark.parametrize("bilinear", ["per_position", "shared"])
def test_routing_matches_reference_semantics(bilinear):
    torch.manual_seed(0)
    caps = CapsuleRouting(D, K, L, bilinear=bilinear, iters=3)
    h = torch.randn(B, L, D, requires_grad=True)
    mask = batch()[1]
    torch.manual_seed(5)
    interests, c = caps(h, mask)
    # stop_gradient on item_hat before the last iteration: the routing weights carry no gradient and
    # the output is exactly squash(c . item_hat) with c constant.
    assert not c.requires_grad
    hat = caps._item_hat(h * mask.unsqueeze(-1)).expand(B, K, L, D)
    torch.testing.assert_close(interests, squash((c.unsqueeze(2) @ hat).squeeze(2)))
    # softmax over interests: at every real position the weights sum to 1
    torch.testing.assert_close(c.sum(1), mask.float())
    if bilinear == "per_position":  # logits start at 0: one iteration = squash(sum_t item_hat / K)
        one = CapsuleRouting(D, K, L, bilinear=bilinear, iters=1)
        one.load_state_dict(caps.state_dict())
        hat1 = one._item_hat(h * mask.unsqueeze(-1))
        torch.testing.assert_close(one(h, mask)[0], squash(hat1.sum(2) / K))


def test_mind_routing_logits_are_random_and_dr_deterministic():
    hist, mask, _ = batch()
    mind, dr = make("mind"), make("comirec_dr")
    assert not torch.allclose(mind.interests(hist, mask), mind.interests(hist, mask))
    torch.testing.assert_close(dr.interests(hist, mask), dr.interests(hist, mask))
    assert mind.routing.proj is not None and dr.routing.proj is None  # ReLU layer only for MIND


@pytest.mark.parametrize("backbone", BACKBONES)
def test_seed_makes_model_deterministic(backbone):
    a, b = make(backbone, seed=7), make(backbone, seed=7)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na
    hist, mask, target = batch()
    torch.manual_seed(3)
    la = a.loss(hist, mask, target, loss_fn())["loss"]
    torch.manual_seed(3)
    lb = b.loss(hist, mask, target, loss_fn())["loss"]
    assert torch.equal(la, lb)
    assert not torch.equal(make(backbone, seed=8).item_emb.weight, a.item_emb.weight)


def test_remi_terms_on_and_off():
    hist, mask, target = batch()
    off = make("remi", reg_lambda=0.0)
    torch.manual_seed(0)
    out = off.loss(hist, mask, target, loss_fn())
    assert "reg" not in out and torch.equal(out["loss"], out["rec"])

    on = make("remi", reg_lambda=100.0)
    torch.manual_seed(0)
    out = on.loss(hist, mask, target, loss_fn())
    attn = on.encode(hist, mask)[1]["attention"]
    # REMI.calculate_atten_loss, transcribed
    c = attn - attn.mean(dim=2, keepdim=True)
    c = torch.bmm(c, c.transpose(1, 2)) / D
    expected = 100.0 * (torch.norm(torch.diagonal(c, dim1=-2, dim2=-1), dim=1) ** 2).sum()
    torch.testing.assert_close(out["reg"], expected)
    torch.testing.assert_close(out["loss"], out["rec"] + out["reg"])
    torch.testing.assert_close(routing_regularization(attn, D) * 100.0, expected)

    # beta is a loss option built from the model config
    cfg = ModelConfig(backbone="remi", beta=2.0)
    assert build_loss(NegativesConfig(), N_ITEMS, B, cfg).hard_negative_beta == 2.0
    assert build_loss(NegativesConfig(), N_ITEMS, B, ModelConfig()).hard_negative_beta == 0.0


def test_registry_and_learning_rates():
    assert set(MODELS) == {"comirec_sa", "comirec_dr", "mind", "remi"}
    assert make("comirec_dr").default_lr == 5e-3
    assert {make(b).default_lr for b in ("comirec_sa", "mind", "remi")} == {1e-3}
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model(ModelConfig(backbone="sasrec"), N_ITEMS)
    with pytest.raises(ValueError, match="maxlen"):
        make("comirec_sa").interests(torch.ones(2, L + 1, dtype=torch.long), torch.ones(2, L + 1, dtype=torch.bool))
