"""Defensive Quantization's orthogonality regulariser."""
import torch
import torch.nn as nn

from rqlab.defenses.dq import DefensiveQuantization, gram_residual, orthogonality_penalty


def test_zero_for_orthogonal_weights():
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    lin = nn.Linear(16, 16).double()
    lin.weight.data = q.clone()
    assert orthogonality_penalty(lin).item() < 1e-20
    # a conv whose reshaped kernel (8, 2*3*3) has orthonormal rows: Gram on the smaller side
    conv = nn.Conv2d(2, 8, 3).double()
    rows, _ = torch.linalg.qr(torch.randn(18, 8, dtype=torch.float64))
    conv.weight.data = rows.t().reshape(8, 2, 3, 3).clone()
    assert orthogonality_penalty(conv).item() < 1e-20
    # wide case: 4 filters of 2*3*3 = 18 weights, orthonormal rows -> W W^T = I (4x4)
    conv2 = nn.Conv2d(2, 4, 3).double()
    conv2.weight.data = rows.t()[:4].reshape(4, 2, 3, 3).clone()
    assert gram_residual(conv2.weight).shape == (4, 4)
    assert orthogonality_penalty(conv2).item() < 1e-20


def test_gradient_matches_hand_derivation():
    # d/dW ||W W^T - I||_F^2 = 4 (W W^T - I) W   (for W with fewer rows than columns)
    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=False).double()
    penalty = orthogonality_penalty(lin)
    penalty.backward()
    w = lin.weight.detach()
    expected = 4 * (w @ w.t() - torch.eye(3, dtype=torch.float64)) @ w
    assert torch.allclose(lin.weight.grad, expected, atol=1e-12)
    # the hand value of the penalty itself
    assert torch.isclose(penalty, ((w @ w.t() - torch.eye(3, dtype=torch.float64)) ** 2).sum())


def test_loss_adds_half_beta_times_penalty():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.rand(6, 1, 3, 4), torch.randint(0, 4, (6,))
    plain, _ = DefensiveQuantization(beta=0.0).loss(model, x, y)
    reg, _ = DefensiveQuantization(beta=0.2).loss(model, x, y)
    assert torch.isclose(reg - plain, 0.1 * orthogonality_penalty(model))
