"""Defenses: training-time methods of the four papers, as hooks for `rqlab.training.fit`,
and configuration-time bit selection.

    >>> hooks = defenses.build("rpt-pgd-at", eps=0.1, bits=(4, 5, 6, 7, 8))
    >>> fit(model, loader, cfg, hooks=hooks)

Names (`rqlab train --defense NAME`):
    natural      plain cross-entropy
    pgd-at       PGD-AT (Madry et al. 2018), PGD-`steps` (default 7)
    fgsm-rs      FGSM with random start (Wong et al. 2020), alpha 1.25 eps
    dq           Defensive Quantization's orthogonality regulariser (Lin et al. 2019), beta
    dq-pgd-at    DQ on top of PGD-AT
    rpt          random precision training over `bits` (Fu et al. 2021), natural
    rpt-pgd-at   RPT with PGD-AT at the drawn precision (Double-Win Quant's main recipe)
    rpt-fgsm-rs  RPT with FGSM-RS
    odgq         ODG-Q, online domain generalization (Tao & Wong 2022; rqlab's construction)
"""
from __future__ import annotations

from ..training import Hooks
from ..validate import RqlabError, check_choice
from .adversarial import FGSMRS, PGDTraining, ensure_act_ranges
from .dq import DefensiveQuantization, orthogonality_penalty
from .odgq import ODGQ
from .rpt import RandomPrecisionTraining

NAMES = ("natural", "pgd-at", "fgsm-rs", "dq", "dq-pgd-at", "rpt", "rpt-pgd-at", "rpt-fgsm-rs", "odgq")
_ALIASES = {"pgd": "pgd-at", "pgd7": "pgd-at", "madry": "pgd-at", "fgsm_rs": "fgsm-rs", "fast": "fgsm-rs",
            "rpt-pgd7": "rpt-pgd-at", "rpt-pgd": "rpt-pgd-at", "odg-q": "odgq", "none": "natural"}


def canonical(name: str) -> str:
    key = str(name).strip().lower()
    return check_choice(_ALIASES.get(key, key), "defense", NAMES)


def needs_bits_set(name: str) -> bool:
    """RPT defenses train over a precision set (and the model needs switchable BN for it)."""
    return canonical(name).startswith("rpt")


def build(name: str, eps: float = 0.1, steps: int = 7, step_size: float | None = None, beta: float = 1e-3,
          lam: float = 1.0, bits=None, seed: int = 0) -> Hooks:
    """The training hooks of defense `name` (see the module docstring).

    eps: linf radius; steps, step_size: PGD-AT's (step_size default 2.5 eps / steps);
    beta: DQ's regulariser weight; lam: ODG-Q's variance weight; bits: RPT's precision
    set (required for rpt*); seed: the defense's own randomness.
    """
    name = canonical(name)
    attack = {"pgd-at": lambda: PGDTraining(eps, steps, step_size, seed),
              "fgsm-rs": lambda: FGSMRS(eps, seed=seed)}
    if name == "natural":
        return Hooks()
    if name in attack:
        return attack[name]()
    if name.startswith("dq"):
        return DefensiveQuantization(beta, inner=attack[name[3:]]() if name != "dq" else None)
    if name.startswith("rpt"):
        if not bits or len(tuple(bits)) < 2:
            raise RqlabError(f"defense={name!r} trains over a precision set: give bits such as 4-8 (got {bits!r})")
        inner = attack[name[4:]]() if name != "rpt" else None
        return RandomPrecisionTraining(bits, inner=inner, seed=seed)
    return ODGQ(eps, lam=lam, seed=seed)


__all__ = ["NAMES", "canonical", "build", "needs_bits_set", "PGDTraining", "FGSMRS", "DefensiveQuantization",
           "orthogonality_penalty", "RandomPrecisionTraining", "ODGQ", "ensure_act_ranges"]
