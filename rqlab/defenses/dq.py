"""Defensive Quantization (Lin, Gan, Han, ICLR 2019): Lipschitz control by an
orthogonality regulariser (METHODS section 3).

    loss = CE + (beta / 2) * sum_l ||W_l W_l^T - I||_F^2

over every conv and linear layer, a conv kernel reshaped to (c_out, c_in * k * k) and the
Gram matrix taken on the smaller side. The paper's beta was not available: rqlab's
notebooks sweep it (0, 3e-4, 1e-3, 3e-3, 1e-2). The regulariser acts on the float
weights, whatever precision the forward pass runs at.

    >>> hooks = DefensiveQuantization(beta=1e-3)                    # natural + DQ
    >>> hooks = DefensiveQuantization(beta=1e-3, inner=PGDTraining(threat))  # PGD-AT + DQ
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..training import Hooks
from ..validate import check_float
from .adversarial import build_pgd_at
from .registry import get, register


def gram_residual(w: torch.Tensor) -> torch.Tensor:
    """W W^T - I (or W^T W - I, on the smaller side) for a weight reshaped to (c_out, -1)."""
    m = w.reshape(w.shape[0], -1)                      # (c_out, c_in k k)
    g = m @ m.t() if m.shape[0] <= m.shape[1] else m.t() @ m
    return g - torch.eye(g.shape[0], device=w.device, dtype=w.dtype)


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """sum over conv/linear layers of ||W W^T - I||_F^2 (a scalar tensor with gradient)."""
    terms = [gram_residual(m.weight).pow(2).sum() for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    return torch.stack(terms).sum()


class DefensiveQuantization(Hooks):
    """Adds (beta / 2) * orthogonality_penalty to the loss of `inner` (natural by default)."""

    name = "dq"

    def __init__(self, beta: float = 1e-3, inner: Hooks | None = None):
        self.beta = check_float(beta, "beta", 0.0)
        self.inner = inner or Hooks()
        self.name = "dq" if type(self.inner) is Hooks else f"dq-{self.inner.name}"

    def config(self) -> dict:
        return {"beta": self.beta, "inner": self.inner.config()}

    def precision(self, model, step):
        self.inner.precision(model, step)

    def batch(self, model, x, y):
        return self.inner.batch(model, x, y)

    def loss(self, model, x, y):
        loss, logits = self.inner.loss(model, x, y)
        return loss + 0.5 * self.beta * orthogonality_penalty(model), logits

    def state_dict(self):
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state.get("inner", {}))

    def epoch_end(self, model, epoch, metrics):
        self.inner.epoch_end(model, epoch, metrics)
        metrics["orthogonality"] = float(orthogonality_penalty(model).detach())


@register("dq", params={"beta": 1e-3}, summary="Defensive Quantization's orthogonality regulariser (Lin et al. 2019)")
def build_dq(beta, seed, bits=None) -> DefensiveQuantization:
    return DefensiveQuantization(beta)


@register("dq-pgd-at", params={"beta": 1e-3, **get("pgd-at").params}, summary="DQ on top of PGD-AT")
def build_dq_pgd_at(beta, seed, bits=None, **pgd) -> DefensiveQuantization:
    return DefensiveQuantization(beta, inner=build_pgd_at(seed=seed, **pgd))
