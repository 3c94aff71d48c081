"""FGSM: one gradient-sign step of size eps.

Paper: Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples",
ICLR 2015.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.state import prepared
from .base import ascend, ce_loss, check_batch, input_grad, project
from .threat import ThreatModel

OPTIONS: dict = {}


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """x_adv = clip(x + eps * sign(grad_x CE(f(x), y))) for linf; for l2 the step is
    eps * grad / ||grad||_2.

    Distance: linf or l2, `threat.norm`. Arguments (from `threat`): eps; eot (default 1:
    gradient averaged over that many forward passes); policy. steps, step_size and
    restarts are ignored: FGSM is one step of length eps from x, no random start.

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x_adv (B, C, H, W) in [0, 1].

    Example:
        >>> x_adv = fgsm(model, x, y, ThreatModel("fgsm", eps=0.1))
    """
    x, y = check_batch(model, x, y, threat)
    with prepared(model, threat.policy):
        grad = input_grad(model, x, y, ce_loss, threat.eot_samples)
        return project(ascend(x, grad, threat.norm, threat.eps), x, threat.norm, threat.eps).detach()
