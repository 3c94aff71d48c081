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
