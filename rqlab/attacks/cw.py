"""CW-linf: PGD on the Carlini-Wagner margin loss.

Paper: Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P
2017 (the margin objective f6); used under PGD as in Madry et al., ICLR 2018.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.state import prepared
from .base import active_for, check_batch, input_grad, iterate, margin_loss, score
from .threat import ThreatModel

OPTIONS: dict = {}


def cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """PGD ascent on the margin max_{j != y} z_j - z_y of the logits z (not clamped, so
    examples already misclassified keep being pushed: no early stop; on a deterministic
    model the active set of `pgd` applies).

    Distance: linf (the usual CW-linf) or l2, `threat.norm`. Arguments as `pgd`: eps,
    steps (default 20), step_size (default: ThreatModel rule), restarts (default 1,
    worst case kept), eot (default 1), seed, policy.
    The margin is scale-free in the softmax sense: it does not saturate the way
    cross-entropy does on very confident models, which is why it is a useful second
    white-box attack.

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x_adv (B, C, H, W) in [0, 1].

    Example:
        >>> x_adv = cw(model, x, y, ThreatModel("cw", eps=0.1, steps=30))
    """
    x, y = check_batch(model, x, y, threat)
    with prepared(model, threat.policy):
        return iterate(x, threat,
                       grad_fn=lambda xa: input_grad(model, xa, y, margin_loss, threat.eot_samples),
                       score_fn=lambda xa: score(model, xa, y, margin_loss),
                       active=active_for(model, y, lambda xa, ya: input_grad(model, xa, ya, margin_loss,
                                                                             threat.eot_samples, logits=True)))
