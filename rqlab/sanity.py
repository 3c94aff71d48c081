"""Sanity checks for a robustness evaluation (METHODS section 6), after Carlini et al.,
"On Evaluating Adversarial Robustness" (2019), and AutoAttack's runtime flags.

Each check returns {"check", "passed", "detail"} (plus numbers) and a failed one warns
(`SanityWarning`) in plain words. They run on a small subset, on the model as the caller
configured it (`evaluate(..., sanity=True)` runs them under the evaluated policy):

    eps_monotone        robust accuracy at eps/2, eps, 2 eps must not rise (slack `tol`)
    large_eps           at linf eps 0.5 (l2: 0.5 sqrt(d)) every image can be moved to the
                        same gray image, so at most the share of the most common label
                        may stay correct (+ `large_eps_slack`)
    whitebox_vs_blackbox  the white-box attack must do at least as well as Square (score-
                        based black box) and, for a quantized policy, as transfer from FP
    zero_gradient       share of examples whose input gradient of the cross-entropy is
                        exactly zero (gradient masking): at most `zero_grad_share`
    random_forward      two forward passes on the same input differ, but the attack uses
                        no EOT (eot = 1 and not eot_pgd / expectation / autoattack rand)
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import attacks, quant
from .attacks.base import ce_loss, paired_accuracy
from .attacks.threat import L2_EPS_MAX, ThreatModel
from .models.state import prepared
from .validate import RqlabError, check_float, check_int

ADAPTIVE = ("eot_pgd", "expectation")


class SanityWarning(UserWarning):
    """A robustness evaluation failed a sanity check: its numbers may overstate robustness."""


@dataclass(frozen=True)
class SanityConfig:
    """n: examples checked (the first n evaluated); square_queries: Square's budget;
    tol: slack in accuracy (fraction) for "no weaker" and "non-increasing" comparisons
    (covers the noise of random defenses); large_eps_slack: slack over the largest label
    share at huge eps; zero_grad_share: largest acceptable share of zero gradients."""

    n: int = 100
    square_queries: int = 1000
    tol: float = 0.02
    large_eps_slack: float = 0.05
    zero_grad_share: float = 0.05

    def __post_init__(self):
        check_int(self.n, "n", 1)
        check_int(self.square_queries, "square_queries", 1)
        for k in ("tol", "large_eps_slack", "zero_grad_share"):
            check_float(getattr(self, k), k, 0.0, 1.0)


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, passes: int = 1,
               robust_accuracy: float | None = None, cfg: SanityConfig | None = None) -> list[dict]:
    """All checks on (x, y) (already on the model's device); warns for each failure.
    `robust_accuracy`: the evaluation's own robust accuracy on exactly these examples
    (recomputed if None)."""
    cfg = cfg or SanityConfig()
    if robust_accuracy is None:
        robust_accuracy = robust_acc(model, x, y, threat, passes)
    results = [eps_monotone(model, x, y, threat, passes, cfg), large_eps(model, x, y, threat, passes, cfg),
               whitebox_vs_blackbox(model, x, y, threat, passes, robust_accuracy, cfg),
               zero_gradient(model, x, y, cfg), random_forward(model, x, threat)]
    for r in results:
        if not r["passed"]:
            warnings.warn(f"sanity check {r['check']} failed: {r['detail']} (see docs/flags/sanity-"
                          f"{r['check'].replace('_', '-')}.md)", SanityWarning, stacklevel=3)
    return results


def robust_acc(model: nn.Module, x, y, threat: ThreatModel, passes: int = 1) -> float:
    """Mean over passes of the share of examples with x and x_adv both correct."""
    return paired_accuracy(model, x, y, attacks.get(threat.attack)(model, x, y, threat), passes)


def _at_eps(threat: ThreatModel, eps: float) -> ThreatModel:
    step = None if threat.step_size is None else min(threat.step_size * eps / threat.eps, eps)
    return threat.replace(eps=eps, step_size=step)


def _check(name: str, passed: bool, detail: str, **numbers) -> dict:
    return {"check": name, "passed": bool(passed), "detail": detail, **numbers}


def eps_monotone(model, x, y, threat: ThreatModel, passes: int, cfg: SanityConfig) -> dict:
    if threat.eps == 0:
        return _check("eps_monotone", True, "eps = 0: nothing to compare")
    cap = 1.0 if threat.norm == "linf" else L2_EPS_MAX
    epss = [threat.eps / 2, threat.eps, min(2 * threat.eps, cap)]
    accs = [robust_acc(model, x, y, _at_eps(threat, e), passes) for e in epss]
    ok = all(b <= a + cfg.tol for a, b in zip(accs, accs[1:]))
    pairs = ", ".join(f"{100 * a:.1f}% at eps={e:.4g}" for e, a in zip(epss, accs))
    detail = (f"robust accuracy falls with eps: {pairs}" if ok else
              f"robust accuracy rises with eps ({pairs}): the attack is not finding the worst case; "
              "use more steps, restarts or a different loss")
    return _check("eps_monotone", ok, detail, eps=epss, accuracy=accs)


def large_eps(model, x, y, threat: ThreatModel, passes: int, cfg: SanityConfig) -> dict:
    eps = 0.5 if threat.norm == "linf" else min(0.5 * math.sqrt(x[0].numel()), L2_EPS_MAX)
    acc = robust_acc(model, x, y, _at_eps(threat, eps), passes)
    share = torch.bincount(y.cpu()).max().item() / len(y)
    ok = acc <= share + cfg.large_eps_slack
    detail = (f"at {threat.norm} eps={eps:.4g} every image can be turned into the same gray image, so at most "
              f"{100 * share:.0f}% (the most common label) can stay correct; the attack left {100 * acc:.1f}%")
    if not ok:
        detail += ": the attack fails where it cannot fail, a sign of gradient masking or a broken attack"
    return _check("large_eps", ok, detail, eps=eps, accuracy=acc, largest_label_share=share)


def whitebox_vs_blackbox(model, x, y, threat: ThreatModel, passes: int, white: float, cfg: SanityConfig) -> dict:
    others = {"square": threat.replace(attack="square", policy=None, surrogate=None,
                                       options={"n_queries": cfg.square_queries})}
    policy = quant.current(model)
    if not (isinstance(policy, quant.Fixed) and policy.bits == policy.a_bits == 32):
        others["transfer_from_fp"] = threat.replace(attack="transfer", policy=quant.Fixed(32), surrogate=None,
                                                    options={"base": "pgd"}, eot=None)
    accs = {}
    for name, t in others.items():
        try:
            accs[name] = robust_acc(model, x, y, t, passes)
        except RqlabError:  # e.g. switchable BN without an FP branch: no transfer from FP
            continue
    worst = min(accs.values())
    ok = white <= worst + cfg.tol
    rest = ", ".join(f"{k} {100 * v:.1f}%" for k, v in accs.items())
    detail = f"white-box {threat.attack} leaves {100 * white:.1f}%, {rest}"
    if not ok:
        detail += ": a weaker attack does better than the white-box one, so its gradients mislead it " \
                  "(gradient masking or obfuscation); report the strongest attack"
    return _check("whitebox_vs_blackbox", ok, detail, whitebox=white, others=accs)


def zero_gradient(model, x, y, cfg: SanityConfig) -> dict:
    with prepared(model):
        xg = x.detach().clone().requires_grad_(True)
        out = ce_loss(model(xg), y).sum()
        grad = torch.autograd.grad(out, xg, allow_unused=True)[0] if out.requires_grad else None
    zero = (torch.ones(len(x)) if grad is None else (grad.flatten(1).abs().sum(1) == 0).float().cpu())
    share = zero.mean().item()
    ok = share <= cfg.zero_grad_share
    detail = f"{100 * share:.1f}% of examples have an exactly zero input gradient (limit {100 * cfg.zero_grad_share:.0f}%)"
    if not ok:
        detail += ": gradient-based attacks cannot move these examples (gradient masking, e.g. rounding " \
                  "without a straight-through estimator); use a black-box attack or BPDA"
    return _check("zero_gradient", ok, detail, share=share)


@torch.no_grad()
def random_forward(model, x, threat: ThreatModel, tries: int = 4) -> dict:
    with prepared(model):
        outs = [model(x) for _ in range(tries)]
    diff = max((o - outs[0]).abs().max().item() for o in outs[1:])
    random = diff > 1e-5 * max(1.0, outs[0].abs().max().item())
    adaptive = (threat.eot_samples > 1 or threat.attack in ADAPTIVE
                or (threat.attack == "autoattack" and threat.option("version") == "rand"))
    ok = not random or adaptive
    if not random:
        detail = "the forward pass is deterministic"
    elif adaptive:
        detail = f"the forward pass is random (logits differ by up to {diff:.3g}); the attack averages over it"
    else:
        detail = (f"the forward pass is random (logits differ by up to {diff:.3g} between two passes on the same "
                  "input) but the attack uses one sample per step: use eot_pgd, expectation, eot > 1 or "
                  "AutoAttack version='rand'")
    return _check("random_forward", ok, detail, max_logit_difference=diff)
