"""quant.fused(): the fake quantization of training compiled by torch.compile into one
kernel gives the eager loss and gradients within float tolerance, and falls back to the
vectorised path (with one warning) where compilation is not available."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rqlab import models, quant
from rqlab.quant import functional

FMNIST = dict(input_shape=(1, 28, 28), mean=(0.286,), std=(0.353,))


def train_step(model, x, y):
    quant.apply(model, quant.Fixed(4))
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def fresh():
    torch.manual_seed(0)
    m = models.create("smallcnn", **FMNIST).train()
    g = torch.Generator().manual_seed(1)
    return m, torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_fused_training_step_matches_eager():
    pytest.importorskip("torch._inductor")
    m, x, y = fresh()
    eager_loss, eager_grads = train_step(m, x, y)
    m, x, y = fresh()  # same weights and fresh activation ranges
    with quant.fused():
        loss, grads = train_step(m, x, y)
    if functional._fused_kernel is False:
        pytest.skip("torch.compile is not available on this machine")
    assert loss == pytest.approx(eager_loss, rel=1e-5, abs=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)
    assert not functional.FUSED  # the block restored the default


def test_fused_falls_back_where_compilation_is_unavailable(monkeypatch):
    def no_compile(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(functional, "_fused_kernel", None)
    monkeypatch.setattr(torch, "compile", no_compile)
    m, x, y = fresh()
    eager_loss, eager_grads = train_step(m, x, y)
    m, x, y = fresh()
    with quant.fused(), pytest.warns(UserWarning, match="torch.compile is not available"):
        loss, grads = train_step(m, x, y)
    assert loss == eager_loss and all(torch.equal(g, e) for g, e in zip(grads, eager_grads))
    # and a compiler failing at its first call (as inductor does without cc) falls back too
    monkeypatch.setattr(functional, "_fused_kernel", lambda *a: (_ for _ in ()).throw(RuntimeError("cc failed")))
    m, x, y = fresh()
    with quant.fused(), pytest.warns(UserWarning, match="cc failed"):
        loss2, _ = train_step(m, x, y)
    assert loss2 == eager_loss and functional._fused_kernel is False
