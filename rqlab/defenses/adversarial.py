"""Adversarial training: PGD-AT and FGSM-RS, as training hooks for `rqlab.training.fit`.

Papers: Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant
to Adversarial Attacks", ICLR 2018 (PGD-AT); Wong, Rice, Kolter, "Fast is better than
free: Revisiting adversarial training", ICLR 2020 (FGSM-RS).

    >>> fit(model, loader, cfg, hooks=PGDTraining(eps=0.1, steps=7, step_size=0.025))
    >>> fit(model, loader, cfg, hooks=FGSMRS(eps=0.1))          # alpha = 1.25 eps

The adversarial batch is crafted on the model as the training step sees it: at the
precision the policy (or a defense such as RPT) set for this step, with eval-mode batch
norm (running statistics are not touched by the attack's forward passes) and frozen
parameters; the weight update then runs in train mode on the adversarial batch only.
Each step's random start is seeded by (seed, step), so resumed runs stay exact.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import quant
from ..attacks import ThreatModel, pgd
from ..attacks.base import ascend, ce_loss, input_grad, project
from ..models.state import eval_mode, prepared
from ..quant.layers import ActQuant
from ..training import Hooks
from ..validate import FP_BITS, check_float, check_int
from .registry import register


def pgd_train_step(eps: float) -> float:
    """The PGD-AT step size when none is given: eps / 4, whatever the number of steps.

    METHODS section 0 fixes 0.025 at eps 0.1 (Fashion-MNIST) and 2/255 at eps 8/255
    (CIFAR, Double-Win Quant): both are eps / 4, so PGD-7 can travel 1.75 eps and reach
    the boundary of the ball from any random start. The library, `rqlab train`, the
    zoo's recipes and RunSpec all take the step from here.
    """
    return check_float(eps, "eps", 0.0, 1.0) / 4


@torch.no_grad()
def ensure_act_ranges(model: nn.Module, x: torch.Tensor) -> None:
    """Give every activation quantizer a range for its current precision before an
    eval-mode attack: a precision met for the first time takes its range from this clean
    batch (as its first training forward would), batch norm untouched.

    The forward is skipped when every quantized layer already has a range for its
    current input precision (after the first steps, nearly always): it would change
    nothing. It is kept under a random policy, whose forward hook draws a precision.
    """
    fresh = [a for a in model.modules() if isinstance(a, ActQuant)]
    if not fresh or _has_ranges(model):
        return
    with eval_mode(model):
        for a in fresh:
            a.training = True  # observe: only ranges never seen are initialised below
        saved = [(a, a.seen.clone(), a.ranges.clone()) for a in fresh]
        model(x)
        for a, seen, ranges in saved:  # keep ranges that already existed as they were
            known = seen > 0
            a.ranges[known], a.seen[known] = ranges[known], seen[known]


def _has_ranges(model: nn.Module) -> bool:
    """True when a forward would use only existing activation ranges and draw nothing."""
    return not isinstance(quant.current(model), quant.RandomPrecision) and all(
        not 1 < layer.a_bits < FP_BITS or layer.act.seen[layer.a_bits - 1] > 0
        for _, layer in quant.quant_layers(model, include_fp=True))


class PGDTraining(Hooks):
    """Madry PGD-AT: train on PGD-`steps` examples (linf ball, random start).

    eps: radius in [0, 1] pixels; steps: PGD steps (7 in Double-Win Quant); step_size:
    None takes `pgd_train_step(eps)` = eps / 4 (METHODS: 0.025 at eps 0.1, 2/255 at
    8/255); seed: random starts.
    """

    name = "pgd-at"

    def __init__(self, eps: float = 0.1, steps: int = 7, step_size: float | None = None, seed: int = 0):
        self.threat = ThreatModel("pgd", norm="linf", eps=eps, steps=check_int(steps, "steps", 1),
                                  step_size=pgd_train_step(eps) if step_size is None else step_size,
                                  seed=check_int(seed, "seed", 0))
        self._step = 0

    def config(self) -> dict:
        return {"eps": self.threat.eps, "steps": self.threat.steps, "step_size": self.threat.alpha,
                "seed": self.threat.seed}

    def precision(self, model, step):
        self._step = step

    def batch(self, model, x, y):
        ensure_act_ranges(model, x)
        return pgd(model, x, y, self.threat.replace(seed=self.threat.seed + self._step)), y


class FGSMRS(Hooks):
    """FGSM with a random start (fast adversarial training):
    delta ~ U(-eps, eps), delta <- clip(delta + alpha sign(grad_x CE), -eps, eps).

    One extra forward/backward per step. alpha defaults to 1.25 eps (Wong et al.).
    """

    name = "fgsm-rs"

    def __init__(self, eps: float = 0.1, alpha: float | None = None, seed: int = 0):
        self.eps = check_float(eps, "eps", 0.0, 1.0)
        self.alpha = check_float(1.25 * self.eps if alpha is None else alpha, "alpha", 0.0)
        self.seed = check_int(seed, "seed", 0)
        self._step = 0

    def config(self) -> dict:
        return {"eps": self.eps, "alpha": self.alpha, "seed": self.seed}

    def precision(self, model, step):
        self._step = step

    def batch(self, model, x, y):
        ensure_act_ranges(model, x)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._step)
        delta = ((torch.rand(x.shape, generator=gen) * 2 - 1) * self.eps).to(x)
        x0 = (x + delta).clamp(0, 1)
        with prepared(model):
            grad = input_grad(model, x0, y, ce_loss)
        return project(ascend(x0, grad, "linf", self.alpha), x, "linf", self.eps).detach(), y


@register("pgd-at", params={"eps": 0.1, "steps": 7, "step_size": None}, aliases=("pgd", "pgd7", "madry"),
          summary="PGD-AT (Madry et al. 2018): PGD-`steps` examples, step eps / 4 unless given")
def build_pgd_at(eps, steps, step_size, seed, bits=None) -> PGDTraining:
    return PGDTraining(eps, steps, step_size, seed)


@register("fgsm-rs", params={"eps": 0.1, "alpha": None}, aliases=("fgsm_rs", "fast"),
          summary="FGSM with random start (Wong et al. 2020), alpha 1.25 eps unless given")
def build_fgsm_rs(eps, alpha, seed, bits=None) -> FGSMRS:
    return FGSMRS(eps, alpha, seed)
