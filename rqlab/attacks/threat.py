"""The threat model: everything that defines an attack, validated and recorded with results.

    >>> t = ThreatModel("pgd", norm="linf", eps=0.1, steps=20)
    >>> t.alpha                      # step size: 0.01, the METHODS default for linf 0.1
    >>> t.to_dict()                  # JSON, goes into every evaluation record

Default step size (`step_size=None`), METHODS section 0:
    linf eps 0.1   -> 0.01   (Fashion-MNIST PGD-20)
    linf eps 8/255 -> 2/255  (CIFAR-10/100, SVHN)
    any other eps  -> 2.5 * eps / steps  (Madry et al. 2018: from a random start the
                      attack can still cross the whole ball within `steps`).
Default EOT samples (`eot=None`): 10 for eot_pgd, 1 for every other attack.

`policy` is the precision the *attacker* crafts at (the defender's precision is set on
the model or passed to `evaluate`): None means "the model as it is configured". For
eot_pgd / expectation it is the random set averaged over (default: the model's own
RandomPrecision); for transfer it is the source precision.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..validate import RqlabError, check_choice, check_float, check_int

NORMS = ("linf", "l2")
L2_EPS_MAX = 100.0  # sqrt(d) for d = 10^4 pixels: any l2 eps above it is a typo
_DEFAULT_STEP = {("linf", 0.1): 0.01, ("linf", round(8 / 255, 6)): 2 / 255}
EOT_DEFAULT = 10


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker may do and how hard it tries.

    attack: registry name (`rqlab.attacks.names()`); "eot-pgd" is read as "eot_pgd".
    norm: "linf" | "l2". eps: radius in pixel units ([0, 1] for linf, [0, 100] for l2).
    steps: gradient steps (>= 1; FGSM takes one whatever it says). step_size: None for
        the rule in the module docstring. restarts: random restarts (>= 1), the worst case
        of each example is kept. eot: gradient samples per step (None: attack default).
    seed: seeds the random start and the attacker's precision draws.
    policy: the attacker's precision policy (see module docstring), or None.
    surrogate: the model a transfer attack crafts on (None: the target itself).
    options: attack-specific settings, e.g. {"version": "rand"} for autoattack; the
        attack's module lists those it knows (`OPTIONS`), anything else is an error.
    """

    attack: str = "pgd"
    norm: str = "linf"
    eps: float = 0.1
    steps: int = 20
    step_size: float | None = None
    restarts: int = 1
    eot: int | None = None
    seed: int = 0
    policy: Any = field(default=None, hash=False)
    surrogate: nn.Module | None = field(default=None, repr=False, compare=False, hash=False)
    options: dict = field(default_factory=dict, hash=False)

    def __post_init__(self):
        from . import registry  # late: the registry imports the attack modules

        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("attack", registry.canonical(self.attack))
        set_("norm", check_choice(str(self.norm).lower(), "norm", NORMS))
        hi = 1.0 if self.norm == "linf" else L2_EPS_MAX
        try:
            set_("eps", check_float(self.eps, "eps", 0.0, hi))
        except RqlabError as e:
            raise RqlabError(f"{e} (norm={self.norm!r}: pixels live in [0, 1])") from None
        set_("steps", check_int(self.steps, "steps", 1))
        if self.step_size is not None:
            set_("step_size", check_float(self.step_size, "step_size", 0.0, hi, lo_open=True))
        set_("restarts", check_int(self.restarts, "restarts", 1))
        if self.eot is not None:
            set_("eot", check_int(self.eot, "eot", 1))
        set_("seed", check_int(self.seed, "seed", 0))
        if self.policy is not None:
            set_("policy", _check_policy(self.policy))
        if self.surrogate is not None and not isinstance(self.surrogate, nn.Module):
            raise RqlabError(f"surrogate must be a torch.nn.Module (the model to craft on), "
                             f"got {type(self.surrogate).__name__}")
        if not isinstance(self.options, dict):
            raise RqlabError(f"options={self.options!r} must be a dict of attack settings")
        known = registry.options(self.attack)
        unknown = sorted(set(self.options) - set(known))
        if unknown:
            raise RqlabError(f"options {unknown} are unknown for attack={self.attack!r}: "
                             f"known: {sorted(known) or 'none'}")
        set_("options", registry.check_options(self.attack, self.options))

    @property
    def alpha(self) -> float:
        """The step size in use: `step_size`, or the default rule (module docstring)."""
        if self.step_size is not None:
            return self.step_size
        rule = _DEFAULT_STEP.get((self.norm, round(self.eps, 6)))
        return rule if rule is not None else 2.5 * self.eps / self.steps

    @property
    def eot_samples(self) -> int:
        """Gradient samples per step in use: `eot`, or 10 for eot_pgd and 1 otherwise."""
        if self.eot is not None:
            return self.eot
        return EOT_DEFAULT if self.attack == "eot_pgd" else 1

    def option(self, key: str):
        """`options[key]`, or the attack's default for it."""
        from . import registry

        return self.options.get(key, registry.options(self.attack)[key])

    def replace(self, **changes) -> "ThreatModel":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        s = self.surrogate
        return {
            "attack": self.attack, "norm": self.norm, "eps": self.eps, "steps": self.steps,
            "step_size": self.alpha, "step_size_rule": "given" if self.step_size is not None else "default",
            "restarts": self.restarts, "eot": self.eot_samples, "seed": self.seed,
            "attacker_policy": self.policy.to_dict() if self.policy is not None else None,
            "surrogate": None if s is None else getattr(getattr(s, "config", None), "name", type(s).__name__),
            "options": {k: _jsonable(v) for k, v in self.options.items()},
        }

    def __str__(self) -> str:
        eps = f"{self.eps * 255:.4g}/255" if self.norm == "linf" and self.eps < 0.1 else f"{self.eps:.4g}"
        extra = f" x{self.restarts}" if self.restarts > 1 else ""
        extra += f" eot{self.eot_samples}" if self.eot_samples > 1 else ""
        return f"{self.attack}-{self.steps} {self.norm} eps={eps} step={self.alpha:.4g}{extra}"


def _check_policy(policy):
    from .. import quant

    if isinstance(policy, str):
        return quant.parse_policy(policy)
    if not isinstance(policy, (quant.Fixed, quant.PerLayer, quant.RandomPrecision)):
        raise RqlabError(f"policy={policy!r} must be a precision policy (Fixed, PerLayer, RandomPrecision), "
                         "a spelling such as '4' or '4-8', or None")
    return policy


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(u) for u in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(u) for k, u in v.items()}
    return str(v)
