"""EOT-PGD against random precision inference: each step averages the input gradient
over K precisions drawn from the defender's precision set.

Papers: Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of Security",
ICML 2018 (Expectation over Transformation); the defense attacked is Random Precision
Inference from Fu et al., "Double-Win Quant", ICML 2021 (METHODS section 2).
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn

from .. import quant
from ..models.state import prepared
from .base import active_for, ce_loss, check_batch, expected_score, input_grad, iterate, precision_support
from .threat import ThreatModel

OPTIONS: dict = {}


def eot_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """PGD whose gradient at every step is the mean over K = `threat.eot_samples`
    (default 10) precisions b drawn uniformly (with replacement) from the support of the
    random policy, each applied explicitly (`quant.switching`: what `quant.using(model,
    Fixed(b))` sets, without its cost); the
    attacker, not the model's forward hook, controls the draws (seeded by `threat.seed`).

    Policy attacked: `threat.policy` if given, else the model's current policy
    (`quant.current(model)`). A non-random policy is used as it is for all K samples
    (K forward passes: EOT over any other randomness of the forward pass); when nothing
    else is random (`base.deterministic`) the active set of `pgd` applies.
    Distance: linf or l2. Other arguments as `pgd` (eps, steps, step_size, restarts,
    seed). Restarts keep, per example, the higher misclassification rate over the
    support, then the higher expected loss.

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x_adv (B, C, H, W) in [0, 1].

    Example:
        >>> quant.apply(model, quant.RandomPrecision((4, 5, 6, 7, 8)))
        >>> x_adv = eot_pgd(model, x, y, ThreatModel("eot_pgd", eps=0.1, steps=20, eot=10))
    """
    x, y = check_batch(model, x, y, threat)
    support = precision_support(model, threat.policy)  # [Fixed(b) for b in the set]
    rng = random.Random(threat.seed)

    with prepared(model), quant.switching(model, support) as switch:  # switch(p) = using(model, p), cheaper
        def grad_fn(xa, ya=y, logits=False):
            g = torch.zeros_like(xa)
            for p in (rng.choice(support) for _ in range(threat.eot_samples)):
                switch(p)
                g_p, out = input_grad(model, xa, ya, ce_loss, logits=True)
                g += g_p
            return (g / threat.eot_samples, out) if logits else g / threat.eot_samples

        # a deterministic policy (one precision, nothing else random): the active set of `pgd`
        active = active_for(model, y, lambda xa, ya: grad_fn(xa, ya, logits=True)) if len(support) == 1 else None
        return iterate(x, threat, grad_fn, lambda xa: expected_score(model, xa, y, support, switch=switch),
                       active=active)
