"""BPDA: the quantizers' surrogate backward (`quant.surrogate_backward`) and the attack
(`attacks.bpda`). Forward values are compared bit for bit with the default path;
gradients with hand-computed derivatives k (1 - tanh(k x)^2); the attack with plain PGD
on a network whose STE gradient is zero almost everywhere (gradient masking).
"""
import math

import pytest
import torch
import torch.nn as nn

from rqlab import attacks, models, quant
from rqlab.attacks import ThreatModel
from rqlab.quant import functional as qf
from rqlab.validate import RqlabError

POINTS = [-2.0, -0.5, 0.0, 0.3, 1.5]


def grad_of(fn, x):
    x = x.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


# ---- the quantizers' surrogate backward --------------------------------------------------

@pytest.mark.parametrize("k", [1.0, 2.5])
def test_sign_backward_is_the_tanh_derivative(k):
    x = torch.tensor(POINTS)
    with quant.surrogate_backward("tanh", k=k):
        g_act = grad_of(quant.binarize_activation, x)
        g_w = grad_of(lambda w: quant.binarize_weight(w[None], axis=0), x)  # one channel of 5
    hand = torch.tensor([k * (1 - math.tanh(k * v) ** 2) for v in POINTS])
    assert torch.allclose(g_act, hand, rtol=1e-6, atol=0) and torch.allclose(g_w, hand, rtol=1e-6, atol=0)
    # outside |x| <= 1 the clipped STE gives 0; the surrogate does not
    assert grad_of(quant.binarize_activation, x).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert g_act[0] > 0 and g_act[-1] > 0


def test_identity_surrogate_passes_gradient_one_everywhere():
    x = torch.tensor(POINTS)
    lo, hi = torch.tensor(0.0), torch.tensor(1.0)  # -2, -0.5, 1.5 are clamped on the 4-bit grid
    with quant.surrogate_backward("identity"):
        assert grad_of(quant.binarize_activation, x).tolist() == [1.0] * 5
        assert grad_of(lambda v: quant.quantize_range(v, lo, hi, 4), x).tolist() == [1.0] * 5
    assert grad_of(lambda v: quant.quantize_range(v, lo, hi, 4), x).tolist() == [0, 0, 1, 1, 0]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["tanh", "identity"])
def test_layer_forward_is_unchanged_bit_for_bit(bits, kind):
    torch.manual_seed(bits)
    conv, lin = quant.QuantConv2d(3, 8, 3, padding=1), quant.QuantLinear(48, 5)
    x, h = torch.randn(4, 3, 6, 6) * 2, torch.randn(4, 48) * 2
    for m, inp in ((conv, x), (lin, h)):
        m.set_bits(bits)
        m.train()(inp)  # one batch sets the activation range of `bits`
        m.eval()
        ref = m(inp)
        with quant.frozen_weights(m):
            ref_cached = m(inp)
        xg = inp.clone().requires_grad_(True)
        with quant.surrogate_backward(kind, k=3.0):
            out = m(xg)
            with quant.frozen_weights(m):
                out_cached = m(xg)
            g = torch.autograd.grad(out.sum(), xg)[0]
        assert torch.equal(out, ref) and torch.equal(out_cached, ref_cached) and torch.equal(ref, ref_cached)
        assert g.abs().sum() > 0


def test_setting_is_restored_after_the_block_and_after_an_exception():
    assert quant.surrogate() is None
    with quant.surrogate_backward("tanh", k=2.0) as s:
        assert s == ("tanh", 2.0) == quant.surrogate()
        with quant.surrogate_backward("identity"):
            assert quant.surrogate()[0] == "identity"
        assert quant.surrogate() == ("tanh", 2.0)
    assert quant.surrogate() is None
    with pytest.raises(ValueError):
        with quant.surrogate_backward("tanh"):
            raise ValueError("inside")
    assert quant.surrogate() is None and qf._SURROGATE is None
    x = torch.tensor(POINTS)
    assert grad_of(quant.binarize_activation, x).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("kw,match", [
    (dict(kind="sigmoid"), "surrogate='sigmoid' is unknown: choose one of tanh, identity"),
    (dict(k=0.0), "k=0.0"), (dict(k=-1), "k=-1"), (dict(k=float("nan")), "k=nan"),
])
def test_surrogate_backward_rejects_bad_settings(kw, match):
    with pytest.raises(RqlabError, match=match):
        with quant.surrogate_backward(**kw):
            pass
    assert quant.surrogate() is None


# ---- the attack ---------------------------------------------------------------------------

class SignNet(nn.Module):
    """A linear classifier on sign features: logits = W2 sign(W1 (x - 0.5)). Every
    pre-sign value is moved 2 away from 0 (its sign kept), outside |u| <= 1, so the
    clipped STE passes no gradient at all: plain PGD is blind (gradient masking), while
    the function itself is easy to fool."""

    input_shape, num_classes = (1, 4, 4), 2

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(64, 16, generator=g) * 20)  # (H, d): huge pre-activations
        self.w2 = nn.Parameter(torch.randn(2, 64, generator=g))

    def forward(self, x):  # (B, 1, 4, 4) -> (B, 2)
        a = (x.flatten(1) - 0.5) @ self.w1.t()  # (B, 64)
        u = a + 2 * torch.sign(a).detach()  # same sign, |u| >= 2: outside the STE's |u| <= 1
        return quant.binarize_activation(u) @ self.w2.t()


@pytest.fixture(scope="module")
def masked():
    model = SignNet()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(400, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels: the model's own predictions (clean accuracy 100%)
    return model, x, y


def acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("surrogate,k", [("tanh", 0.05), ("identity", 1.0)])
def test_bpda_breaks_a_masked_sign_network_that_pgd_cannot(masked, surrogate, k):
    model, x, y = masked
    eps = 0.1
    x_pgd = attacks.pgd(model, x, y, ThreatModel("pgd", eps=eps, steps=10, step_size=0.025))
    # PGD sees a zero gradient: its sign steps are 0 and it ends at its random start
    start = attacks.pgd(model, x, y, ThreatModel("pgd", eps=eps, steps=1, step_size=0.025))
    assert torch.equal(x_pgd, start)
    threat = ThreatModel("bpda", eps=eps, steps=10, step_size=0.025, options={"surrogate": surrogate, "k": k})
    x_adv = attacks.get("bpda")(model, x, y, threat)
    assert acc(model, x_adv, y) < acc(model, x_pgd, y) - 0.3
    d = (x_adv - x).flatten(1)
    assert d.abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert quant.surrogate() is None  # the setting does not leak out of the attack


def test_bpda_l2_and_restarts_stay_in_the_ball(masked):
    model, x, y = masked
    x, y = x[:50], y[:50]
    threat = ThreatModel("bpda", norm="l2", eps=0.5, steps=5, restarts=2, options={"loss": "margin"})
    x_adv = attacks.bpda(model, x, y, threat)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_bpda_on_a_full_precision_model_is_pgd():
    torch.manual_seed(0)
    model = models.create("smallcnn", input_shape=(1, 28, 28), mean=(0.3,), std=(0.3,)).eval()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    a = attacks.pgd(model, x, y, ThreatModel("pgd", eps=0.1, steps=3))
    b = attacks.bpda(model, x, y, ThreatModel("bpda", eps=0.1, steps=3))
    assert torch.equal(a, b)


def test_registry_threat_and_record():
    assert "bpda" in attacks.names() and attacks.get("BPDA") is attacks.bpda
    assert attacks.options("bpda") == {"surrogate": "tanh", "k": 1.0, "loss": "ce"}
    t = ThreatModel("bpda", eps=0.1)
    assert t.to_dict()["options"] == {"surrogate": "tanh", "k": 1.0, "loss": "ce"}  # defaults recorded
    t = ThreatModel("bpda", options={"surrogate": "Identity", "k": 4})
    assert t.to_dict()["options"] == {"surrogate": "identity", "k": 4.0, "loss": "ce"}


@pytest.mark.parametrize("options,match", [
    ({"surrogate": "sigmoid"}, "surrogate='sigmoid' is unknown: choose one of tanh, identity"),
    ({"k": 0}, "k=0"), ({"k": -2.0}, "k=-2.0"), ({"k": "big"}, "k='big'"),
    ({"loss": "dlr"}, "loss='dlr' is unknown: choose one of ce, margin"),
    ({"kappa": 1}, r"options \['kappa'\] are unknown for attack='bpda'"),
])
def test_bpda_options_are_validated_when_the_threat_is_built(options, match):
    with pytest.raises(RqlabError, match=match):
        ThreatModel("bpda", options=options)
