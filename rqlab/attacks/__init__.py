"""Attacks: one per module, one signature `attack(model, x, y, threat) -> x_adv`
(METHODS section 6). x and x_adv are (B, C, H, W) in [0, 1]; x_adv lies in the
threat's eps-ball around x.

    >>> from rqlab import attacks
    >>> threat = attacks.ThreatModel("pgd", norm="linf", eps=0.1, steps=20)
    >>> x_adv = attacks.get("pgd")(model, x, y, threat)     # or attacks.run(model, x, y, threat)
    >>> attacks.names()
    ['fgsm', 'pgd', 'cw', 'eot_pgd', 'expectation', 'transfer', 'autoattack', 'square', 'bpda']

Binary and STE-quantized networks: `bpda` (PGD with the quantizers' backward replaced by
a smooth surrogate, `quant.surrogate_backward`) beside Square and AutoAttack.

Attacks run on the model as its precision policy configures it (or at `threat.policy`),
in eval mode and with parameter gradients off; both are restored afterwards. `with
attacks.active_set():` lets the gradient attacks drop examples of a deterministic model
once fooled (`base.iterate`); `with attacks.arithmetic("bf16"):` runs their forward and backward in
bf16 (every final score stays fp32; docs/performance.md).
"""
from .autoattack import autoattack, autoattack_stages
from .base import active_set, arithmetic, arithmetic_in_use
from .bpda import bpda
from .cw import cw
from .eot_pgd import eot_pgd
from .expectation import expectation
from .fgsm import fgsm
from .pgd import pgd
from .registry import canonical, get, names, options
from .square import square
from .threat import NORMS, ThreatModel
from .transfer import transfer


def run(model, x, y, threat: ThreatModel):
    """Run the attack the threat names: `get(threat.attack)(model, x, y, threat)`."""
    return get(threat.attack)(model, x, y, threat)


__all__ = ["ThreatModel", "NORMS", "active_set", "arithmetic", "arithmetic_in_use", "get", "names", "canonical", "options", "run", "fgsm", "pgd", "cw",
           "eot_pgd", "expectation", "transfer", "autoattack", "autoattack_stages", "square", "bpda"]
