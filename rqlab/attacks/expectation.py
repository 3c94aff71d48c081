"""Expectation attack over a precision set: every step follows the gradient of the loss
averaged over *all* precisions of the defender's set (exact expectation, no sampling).

Papers: the exact-expectation form of EOT (Athalye et al., ICML 2018) against Random
Precision Inference (Fu et al., "Double-Win Quant", ICML 2021; METHODS section 2).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import quant
from ..models.state import prepared
from .base import ce_loss, check_batch, expected_score, input_grad, iterate, precision_support
from .threat import ThreatModel

OPTIONS: dict = {}


def expectation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """PGD on E_b[CE(f_b(x), y)], b uniform over the support of the random policy: one
    forward/backward pass per precision per step (|support| times the cost of PGD).

    Policy attacked: `threat.policy` if given, else `quant.current(model)`; each b is
    applied as `quant.using(model, Fixed(b))` would (through `quant.switching`, which
    costs less per switch). `threat.eot` is ignored (the expectation
    is exact). Distance: linf or l2. Other arguments as `pgd` (eps, steps, step_size,
    restarts, seed); restarts keep the higher misclassification rate over the support,
    then the higher expected loss.

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x_adv (B, C, H, W) in [0, 1].

    Example:
        >>> threat = ThreatModel("expectation", eps=0.1, steps=20, policy="4-8")
        >>> x_adv = expectation(model, x, y, threat)
    """
    x, y = check_batch(model, x, y, threat)
    support = precision_support(model, threat.policy)  # [Fixed(b) for b in the set]

    with prepared(model), quant.switching(model, support) as switch:  # switch(p) = using(model, p), cheaper
        def grad_fn(xa):
            g = torch.zeros_like(xa)
            for p in support:
                switch(p)
                g += input_grad(model, xa, y, ce_loss)
            return g / len(support)

        return iterate(x, threat, grad_fn, lambda xa: expected_score(model, xa, y, support, switch=switch))
