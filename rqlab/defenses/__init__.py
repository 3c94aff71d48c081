"""Defenses: the training-time methods of the four papers, as hooks for the training
loop (`rqlab.training.fit`), each registered by name (`registry.register`).

    >>> hooks = defenses.build("rpt-pgd-at", eps=0.1, bits=(4, 5, 6, 7, 8))
    >>> defenses.resolve_params("pgd-at")          # {'eps': 0.1, 'steps': 7, 'step_size': None}

Names (`rqlab train --defense NAME`, `RunSpec(defense=NAME)`):
    natural      plain cross-entropy
    pgd-at       PGD-AT (Madry et al. 2018), PGD-`steps` (default 7), step eps / 4
    fgsm-rs      FGSM with random start (Wong et al. 2020), alpha 1.25 eps
    dq           Defensive Quantization's orthogonality regulariser (Lin et al. 2019), beta
    dq-pgd-at    DQ on top of PGD-AT
    rpt          random precision training over `bits` (Fu et al. 2021), natural
    rpt-pgd-at   RPT with PGD-AT at the drawn precision (Double-Win Quant's main recipe)
    rpt-fgsm-rs  RPT with FGSM-RS
    odgq         ODG-Q, online domain generalization (Tao & Wong 2022; rqlab's construction)

A new defense: one module with its Hooks subclass and a `@register(...)` factory, plus
its import below.
"""
from __future__ import annotations

from ..training import Hooks
from .registry import Defense, build, canonical, get, names, needs_bits_set, register, resolve_params


@register("natural", aliases=("none",), summary="plain cross-entropy")
def build_natural(seed, bits=None) -> Hooks:
    return Hooks()


# Each module registers its defenses on import; the order is the order of `names()`.
from .adversarial import FGSMRS, PGDTraining, ensure_act_ranges, pgd_train_step  # noqa: E402
from .dq import DefensiveQuantization, orthogonality_penalty  # noqa: E402
from .rpt import RandomPrecisionTraining  # noqa: E402
from .odgq import ODGQ  # noqa: E402

NAMES = names()

__all__ = ["NAMES", "Defense", "register", "names", "canonical", "get", "build", "resolve_params", "needs_bits_set",
           "pgd_train_step", "PGDTraining", "FGSMRS", "DefensiveQuantization", "orthogonality_penalty",
           "RandomPrecisionTraining", "ODGQ", "ensure_act_ranges"]
