"""BPDA: PGD whose gradients pass the quantizers through a smooth surrogate.

Paper: Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of Security:
Circumventing Defenses to Adversarial Examples", ICML 2018 (Backward Pass Differentiable
Approximation). METHODS sections 6 and 8: the forward as it is, the backward of sign or
round replaced by a smooth surrogate, recorded.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import quant
from ..models.state import prepared
from ..validate import check_choice, check_float
from .base import active_for, ce_loss, check_batch, input_grad, iterate, margin_loss, score
from .threat import ThreatModel

LOSSES = {"ce": ce_loss, "margin": margin_loss}
OPTIONS = {"surrogate": "tanh", "k": quant.SURROGATE_K_DEFAULT, "loss": "ce"}


def check_options(options: dict) -> dict:
    """The options with defaults filled in, validated (ThreatModel calls this, so the
    record always says which surrogate and k were used)."""
    out = {**OPTIONS, **options}
    out["surrogate"] = check_choice(str(out["surrogate"]).lower(), "surrogate", quant.SURROGATE_KINDS)
    out["k"] = check_float(out["k"], "k", 0.0, None, lo_open=True)
    out["loss"] = check_choice(str(out["loss"]).lower(), "loss", tuple(LOSSES))
    return out


def bpda(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """PGD (`attacks.base.iterate`: random start, restarts, each example's worst case,
    no early stop) whose input gradients are taken inside `quant.surrogate_backward`:
    every quantizer computes its usual forward, and its backward is
        sign (b = 1): "tanh" k (1 - tanh(k x)^2), or "identity" 1;
        round and clamp (b >= 2): 1 (the plain STE, no clamp mask).
    Restarts are scored on the true forward pass. On a full-precision model it is PGD.

    Distance: linf (sign steps) or l2 (normalised steps), `threat.norm`. Arguments as
    `pgd` (eps, steps default 20, step_size by the ThreatModel rule, restarts, eot, seed,
    policy), and `threat.options`: surrogate "tanh" (default) | "identity"; k (default
    1.0: tanh(x) spans sign's [-1, 1] with the STE's slope 1 at 0; larger k hugs sign
    more closely but vanishes faster away from 0); loss "ce" (default) | "margin".

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x_adv (B, C, H, W) in [0, 1] with
    ||x_adv - x|| <= eps.

    Example:
        >>> threat = ThreatModel("bpda", eps=0.1, steps=20, options={"surrogate": "tanh", "k": 1.0})
        >>> x_adv = bpda(model, x, y, threat)
    """
    x, y = check_batch(model, x, y, threat)
    loss_fn = LOSSES[threat.option("loss")]

    def grad_fn(xa, ya=y, logits=False):
        with quant.surrogate_backward(threat.option("surrogate"), threat.option("k")):
            return input_grad(model, xa, ya, loss_fn, threat.eot_samples, logits=logits)

    with prepared(model, threat.policy):  # active set (deterministic models): as `pgd`
        return iterate(x, threat, grad_fn=grad_fn, score_fn=lambda xa: score(model, xa, y, loss_fn),
                       active=active_for(model, y, lambda xa, ya: grad_fn(xa, ya, logits=True)))
