"""Transfer attack: craft on a surrogate model, or on the target at another precision,
and hand the examples to the target unchanged (a grey/black-box baseline).

Papers: Papernot, McDaniel, Goodfellow, "Transferability in Machine Learning", 2016;
precision-to-precision transfer as in Fu et al., "Double-Win Quant", ICML 2021
(METHODS section 2).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..validate import RqlabError
from . import registry
from .base import check_batch
from .threat import ThreatModel

OPTIONS = {"base": "pgd"}


def transfer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """Run the attack `threat.options["base"]` (default "pgd") on `threat.surrogate`
    (default: the target model itself) under the attacker's precision `threat.policy`
    (default: the surrogate as configured), with the threat's eps, norm, steps, step
    size, restarts, eot and seed. The target `model` is never queried.

    Typical uses: surrogate = the FP model and the target a quantized copy; or no
    surrogate and policy = Fixed(a) while the target runs at b (the transfer matrix).
    Distance: linf or l2, `threat.norm`.

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x_adv (B, C, H, W) in [0, 1].

    Example:
        >>> threat = ThreatModel("transfer", eps=0.1, surrogate=fp_model, options={"base": "pgd"})
        >>> x_adv = transfer(quantized_model, x, y, threat)
    """
    x, y = check_batch(model, x, y, threat)
    base = registry.canonical(threat.option("base"))
    if base == "transfer":
        raise RqlabError('options["base"]="transfer" would recurse: use pgd, fgsm, cw, ...')
    source = threat.surrogate if threat.surrogate is not None else model
    return registry.get(base)(source, x, y, threat.replace(attack=base, surrogate=None, options={}))
