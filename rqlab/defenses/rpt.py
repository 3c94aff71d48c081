"""Random Precision Training (Double-Win Quant, Fu et al., ICML 2021; METHODS section 2).

Each SGD step draws a precision b uniformly from a set; the adversarial example is made
at b (by the `inner` hooks, e.g. PGD-7 or FGSM-RS) and the cross-entropy update is taken
at b, through b's switchable-BN branch. The model must be built with `sbn_bits` equal to
the set. Random Precision Inference is then the policy `quant.RandomPrecision(set)`.

    >>> model = models.create("smallcnn", sbn_bits=(4, 5, 6, 7, 8), ...)
    >>> quant.apply(model, quant.RandomPrecision((4, 5, 6, 7, 8)))     # evaluated with RPI
    >>> fit(model, loader, cfg, hooks=RandomPrecisionTraining((4, 5, 6, 7, 8), inner=PGDTraining()))

The draw of step t comes from a generator seeded with (seed, t): resumed runs draw the
same precisions, and no RNG state needs saving.
"""
from __future__ import annotations

import random

from .. import quant
from ..training import Hooks
from ..validate import check_bits_set, check_int
from .adversarial import build_fgsm_rs, build_pgd_at
from .registry import get, register


class RandomPrecisionTraining(Hooks):
    """Sets Fixed(b) for each step, b uniform over `bits`, then runs `inner`'s hooks."""

    def __init__(self, bits, inner: Hooks | None = None, seed: int = 0):
        self.bits = check_bits_set(bits, "bits")
        self.inner = inner or Hooks()
        self.seed = check_int(seed, "seed", 0)
        self.name = "rpt" if type(self.inner) is Hooks else f"rpt-{self.inner.name}"
        self.drawn: list[int] = []  # precisions of the steps of the current epoch
        self._policy = None

    def config(self) -> dict:
        return {"bits": list(self.bits), "seed": self.seed, "inner": self.inner.config()}

    def draw(self, step: int) -> int:
        return random.Random(self.seed * 1_000_003 + step).choice(self.bits)

    def precision(self, model, step):
        if self._policy is None:
            self._policy = quant.current(model)  # restored at the end of every epoch
        b = self.draw(step)
        quant.apply(model, quant.Fixed(b))
        self.drawn.append(b)
        self.inner.precision(model, step)

    def batch(self, model, x, y):
        return self.inner.batch(model, x, y)

    def loss(self, model, x, y):
        return self.inner.loss(model, x, y)

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state.get("inner", {}))

    def epoch_end(self, model, epoch, metrics):
        self.inner.epoch_end(model, epoch, metrics)
        metrics["rpt_bits_drawn"] = {str(b): self.drawn.count(b) for b in self.bits}
        self.drawn = []
        if self._policy is not None:
            quant.apply(model, self._policy)


@register("rpt", trains_over_set=True, summary="random precision training over `bits` (Fu et al. 2021), natural")
def build_rpt(seed, bits) -> RandomPrecisionTraining:
    return RandomPrecisionTraining(bits, seed=seed)


@register("rpt-pgd-at", params=get("pgd-at").params, trains_over_set=True, aliases=("rpt-pgd7", "rpt-pgd"),
          summary="RPT with PGD-AT at the drawn precision (Double-Win Quant's main recipe)")
def build_rpt_pgd_at(seed, bits, **pgd) -> RandomPrecisionTraining:
    return RandomPrecisionTraining(bits, inner=build_pgd_at(seed=seed, **pgd), seed=seed)


@register("rpt-fgsm-rs", params=get("fgsm-rs").params, trains_over_set=True, summary="RPT with FGSM-RS")
def build_rpt_fgsm_rs(seed, bits, **fgsm) -> RandomPrecisionTraining:
    return RandomPrecisionTraining(bits, inner=build_fgsm_rs(seed=seed, **fgsm), seed=seed)
