"""Quantizer behaviour pinned against hand-computed grids and STE cases (METHODS section 1)."""
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rqlab.quant import functional as Fq


def grad_of(fn, x):
    x = x.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


# ---- hand-computed grids -------------------------------------------------------------

def test_range_grid_two_bits_by_hand():
    # range [-1, 2], 2 bits: scale = 3/3 = 1, zero_point = round(1/1) = 1 -> grid {-1, 0, 1, 2}
    x = torch.tensor([-3.0, -1.0, -0.6, -0.4, 0.0, 0.49, 0.51, 1.5, 2.0, 2.6, 9.0])
    q = Fq.quantize_range(x, torch.tensor(-1.0), torch.tensor(2.0), 2)
    # round-half-to-even at 1.5 -> 2 (std::nearbyint)
    expected = torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    assert torch.equal(q, expected)


def test_range_grid_widened_to_contain_zero():
    # range [0.5, 1.0] becomes [0, 1]: 3 bits -> step 1/7, zero exactly representable
    x = torch.tensor([0.0, 0.07, 0.08, 0.45, 1.0])
    q = Fq.quantize_range(x, torch.tensor(0.5), torch.tensor(1.0), 3)
    expected = torch.round(x * 7) / 7
    assert torch.allclose(q, expected, atol=1e-7)
    assert q[0] == 0.0


def test_per_channel_uses_each_filters_own_range():
    # channel 0 range [0, 3] (2 bits -> step 1), channel 1 range [-0.3, 0] (step 0.1)
    w = torch.tensor([[0.0, 1.4, 3.0, 2.6], [-0.3, -0.04, -0.16, 0.0]])
    q = Fq.quantize_per_channel(w, 2)
    expected = torch.tensor([[0.0, 1.0, 3.0, 3.0], [-0.3, 0.0, -0.2, 0.0]])
    assert torch.allclose(q, expected, atol=1e-6)


def test_per_channel_conv_weight_axis0():
    w = torch.randn(4, 3, 3, 3)
    w[2] *= 100  # one filter with a far larger range must not coarsen the others
    q = Fq.quantize_per_channel(w, 4)
    for c in range(4):
        lo, hi = min(w[c].min().item(), 0), max(w[c].max().item(), 0)
        step = (hi - lo) / 15
        assert (q[c] - w[c]).abs().max() <= step / 2 + 1e-6


def test_symmetric_grid_by_hand():
    # max|w| = 1.4, 3 bits -> levels -3..3, step 1.4/3
    w = torch.tensor([-1.4, -0.3, 0.0, 0.25, 1.0, 1.4])
    q = Fq.quantize_symmetric(w, 3)
    step = 1.4 / 3
    assert torch.allclose(q, torch.round(w / step) * step, atol=1e-6)


def test_binary_weight_is_sign_times_mean_abs_per_channel():
    w = torch.tensor([[1.0, -3.0, 0.0, 2.0], [-0.5, 0.5, 0.5, 0.5]])
    q = Fq.binarize_weight(w)
    assert torch.allclose(q, torch.tensor([[1.5, -1.5, 1.5, 1.5], [-0.5, 0.5, 0.5, 0.5]]))


def test_binary_activation_sign_and_masked_ste():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    assert torch.equal(Fq.binarize_activation(x), torch.sign(x))
    g = grad_of(Fq.binarize_activation, x)
    assert torch.equal(g, torch.tensor([0.0, 1, 1, 1, 1, 1, 0]))


def test_fp_bits_is_identity():
    w = torch.randn(5, 7)
    assert Fq.quantize_weight(w, 32) is w


# ---- straight-through estimators at and beyond the clamp boundaries ------------------

@pytest.mark.parametrize("ste", ["clipped", "plain"])
def test_ste_gradients_inside_at_and_beyond_range(ste):
    lo, hi = torch.tensor(-1.0), torch.tensor(2.0)  # 2 bits: grid -1, 0, 1, 2
    x = torch.tensor([-5.0, -1.6, -1.0, -0.2, 0.7, 1.9, 2.0, 2.4, 2.6, 7.0])
    g = grad_of(lambda t: Fq.quantize_range(t, lo, hi, 2, ste), x)
    if ste == "plain":
        assert torch.equal(g, torch.ones_like(x))
    else:
        # inside, and up to half a step beyond the ends (rounds onto the end point): 1;
        # clamped (more than half a step outside): 0
        assert torch.equal(g, torch.tensor([0.0, 0, 1, 1, 1, 1, 1, 1, 0, 0]))


@pytest.mark.parametrize("ste", ["clipped", "plain"])
def test_weight_ste_passes_gradient_everywhere_in_range(ste):
    w = torch.randn(6, 10)
    g = grad_of(lambda t: Fq.quantize_per_channel(t, 3, ste), w)
    assert torch.equal(g, torch.ones_like(w))  # the range is the weights' own min..max


# ---- property tests ------------------------------------------------------------------

floats = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, min_side=2, max_side=40),
                    elements=st.floats(-100, 100, width=32))


@settings(max_examples=60, deadline=None)
@given(floats, st.integers(2, 8))
def test_idempotent(a, bits):
    x = torch.from_numpy(a)
    lo, hi = x.min(), x.max()
    q = Fq.quantize_range(x, lo, hi, bits)
    assert torch.allclose(Fq.quantize_range(q, lo, hi, bits), q, atol=1e-5)
    w = Fq.quantize_per_channel(x.reshape(x.shape[0], -1), bits)
    assert torch.allclose(Fq.quantize_per_channel(w, bits), w, atol=1e-4 * (1 + w.abs().max().item()))


@settings(max_examples=60, deadline=None)
@given(floats, st.integers(2, 12))
def test_error_at_most_half_step_inside_range(a, bits):
    x = torch.from_numpy(a).double().float()
    lo, hi = x.min().item(), x.max().item()
    q = Fq.quantize_range(x, torch.tensor(lo), torch.tensor(hi), bits)
    step = Fq.grid_step(lo, hi, bits)
    assert (q - x).abs().max().item() <= step / 2 * (1 + 1e-4) + 1e-6


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["normal", "uniform", "laplace"]))
def test_error_non_increasing_in_bits(seed, dist):
    g = torch.Generator().manual_seed(seed)
    x = {"normal": lambda: torch.randn(4000, generator=g),
         "uniform": lambda: torch.rand(4000, generator=g) * 3 - 1,
         "laplace": lambda: torch.log(torch.rand(4000, generator=g)) * torch.sign(torch.randn(4000, generator=g))}[dist]()
    lo, hi = x.min(), x.max()
    errs = [((Fq.quantize_range(x, lo, hi, b) - x) ** 2).mean().item() for b in range(2, 11)]
    worst = [(Fq.quantize_range(x, lo, hi, b) - x).abs().max().item() for b in range(2, 11)]
    assert all(e2 <= e1 for e1, e2 in zip(errs, errs[1:]))
    assert all(w2 <= w1 * (1 + 1e-6) for w1, w2 in zip(worst, worst[1:]))
