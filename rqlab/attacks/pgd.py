"""PGD: projected gradient descent on the cross-entropy, linf or l2.

Paper: Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant
to Adversarial Attacks", ICLR 2018.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.state import prepared
from .base import active_for, ce_loss, check_batch, input_grad, iterate, score
from .threat import ThreatModel

OPTIONS: dict = {}


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """PGD with a uniform random start in the eps-ball and `threat.restarts` restarts.

    Distance: linf (sign steps) or l2 (normalised-gradient steps), `threat.norm`.
    Arguments (from `threat`): eps; steps (default 20); step_size (default: see
    ThreatModel); restarts (default 1; each example keeps its worst case, misclassified
    first, then highest loss); eot (default 1: gradient averaged over that many forward
    passes, for models whose forward pass is random); seed; policy (attacker's precision,
    default: the model as configured).
    Every example takes every step: no early stop once misclassified (METHODS section
    6). Inside `attacks.active_set()`, on a deterministic model (`base.deterministic`),
    examples misclassified at x or at an iterate leave the batch with that point kept and
    the others go on packed (`base.iterate`): fewer passes, and a robust accuracy that
    can only be lower (an example fooled once and correct again at the last step counts
    as fooled).

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x_adv (B, C, H, W) in [0, 1] with
    ||x_adv - x|| <= eps.

    Example:
        >>> threat = ThreatModel("pgd", norm="linf", eps=0.1, steps=20)   # step 0.01
        >>> x_adv = pgd(model, x, y, threat)
    """
    x, y = check_batch(model, x, y, threat)
    with prepared(model, threat.policy):
        return iterate(x, threat,
                       grad_fn=lambda xa: input_grad(model, xa, y, ce_loss, threat.eot_samples),
                       score_fn=lambda xa: score(model, xa, y, ce_loss),
                       active=active_for(model, y, lambda xa, ya: input_grad(model, xa, ya, ce_loss,
                                                                             threat.eot_samples, logits=True)))
