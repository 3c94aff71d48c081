"""What every attack shares: input checks, losses, the norm-ball geometry and the
projected-gradient loop with restarts (METHODS section 6). The model's state during an
attack (`prepared`, `eval_mode`) lives in `rqlab.models.state`.

Conventions: x, x_adv are (B, C, H, W) in [0, 1]; y is (B,) int64; gradients are taken
with respect to the input only (parameters are frozen for the attack's duration).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import quant
from ..validate import RqlabError, check_images
from .threat import ThreatModel

GradFn = Callable[[torch.Tensor], torch.Tensor]                       # x_adv -> d loss / d x_adv
ScoreFn = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]  # x_adv -> (loss, wrong rate)


def check_batch(model: nn.Module, x, y, threat=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate an attack's inputs; returns (x, y) detached, y as int64 on x's device, and x
    (float64 or float32) in the dtype of the model's weights."""
    if threat is not None and not isinstance(threat, ThreatModel):
        raise RqlabError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    check_images(x, getattr(model, "input_shape", None), "x")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.is_complex():
        raise RqlabError(f"y must be a 1-D integer tensor of labels (B,), got "
                         f"{type(y).__name__}{tuple(y.shape) if isinstance(y, torch.Tensor) else ''}")
    if len(y) != len(x):
        raise RqlabError(f"y has {len(y)} labels but x has {len(x)} images: give one label per image")
    n_cls = getattr(model, "num_classes", None)
    if len(y) and (y.min() < 0 or (n_cls is not None and y.max() >= n_cls)):
        raise RqlabError(f"y has labels in [{y.min().item()}, {y.max().item()}]: use 0..{n_cls - 1}"
                         if n_cls else f"y has a negative label {y.min().item()}")
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None and x.dtype != weight.dtype and x.dtype in (torch.float64, torch.float32):
        x = x.to(weight.dtype)  # e.g. float64 images for a float32 model: x_adv comes back in the model's dtype
    return x.detach(), y.detach().to(device=x.device, dtype=torch.long)


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example: (B, K), (B,) -> (B,)."""
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin max_{j != y} z_j - z_y per example (> 0: misclassified). (B,)"""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def input_grad(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               loss_fn=ce_loss, samples: int = 1) -> torch.Tensor:
    """Gradient of sum(loss_fn(forward(x), y)) w.r.t. x, averaged over `samples` forward
    passes (EOT over the forward pass's own randomness). (B, C, H, W)."""
    grad = torch.zeros_like(x)
    for _ in range(samples):
        xg = x.detach().requires_grad_(True)
        loss = loss_fn(forward(xg), y).sum()
        grad += torch.autograd.grad(loss, xg)[0]
    return grad / samples


def score(forward, x: torch.Tensor, y: torch.Tensor, loss_fn=ce_loss) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, misclassified as 0./1.) per example, without gradients. Used to pick restarts."""
    with torch.no_grad():
        logits = forward(x)
        return loss_fn(logits, y), (logits.argmax(1) != y).float()


# ---- norm-ball geometry ---------------------------------------------------------------

def _norms(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (v.dim() - 1))  # (B, 1, 1, 1)


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Nearest point of {x' in [0, 1]: ||x' - x|| <= eps} (linf exactly; l2 ball then box)."""
    d = x_adv - x
    if norm == "linf":
        d = d.clamp(-eps, eps)
    else:
        d = d * (eps / _norms(d)).clamp(max=1.0)
    return (x + d).clamp(0.0, 1.0)


def ascend(x_adv: torch.Tensor, grad: torch.Tensor, norm: str, size: float) -> torch.Tensor:
    """One steepest-ascent step of length `size` in the given norm (sign step for linf)."""
    if norm == "linf":
        return x_adv + size * grad.sign()
    return x_adv + size * grad / _norms(grad)


def random_start(x: torch.Tensor, norm: str, eps: float, gen: torch.Generator) -> torch.Tensor:
    """A uniform point of the eps-ball around x (clamped to [0, 1])."""
    if norm == "linf":
        d = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    else:  # uniform in the l2 ball: Gaussian direction, radius eps * U^(1/d)
        g = torch.randn(x.shape, generator=gen)
        r = torch.rand(x.shape[0], generator=gen) ** (1.0 / x[0].numel())
        d = g / _norms(g) * (eps * r).view(-1, *[1] * (x.dim() - 1))
    return project(x + d.to(x.device, x.dtype), x, norm, eps)


def iterate(x: torch.Tensor, threat: ThreatModel, grad_fn: GradFn, score_fn: ScoreFn,
            random_init: bool = True) -> torch.Tensor:
    """Projected gradient ascent with restarts.

    Every example takes all `threat.steps` steps in every restart (no early stop once it
    is misclassified); across restarts each example keeps its worst case: the higher
    misclassification rate, then the higher loss.
    """
    gen = torch.Generator().manual_seed(threat.seed)
    best = x.clone()
    best_wrong = torch.full((len(x),), -1.0, device=x.device)
    best_loss = torch.full((len(x),), float("-inf"), device=x.device)
    for _ in range(threat.restarts):
        x_adv = random_start(x, threat.norm, threat.eps, gen) if random_init else x.clone()
        for _ in range(threat.steps):
            x_adv = project(ascend(x_adv, grad_fn(x_adv), threat.norm, threat.alpha), x, threat.norm, threat.eps)
        if threat.restarts == 1:
            return x_adv.detach()
        loss, wrong = score_fn(x_adv)
        better = (wrong > best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
        best[better], best_wrong[better], best_loss[better] = x_adv[better], wrong[better], loss[better]
    return best.detach()


# ---- random precision: the attacker's view of the defender's set ------------------------

def precision_support(model: nn.Module, policy=None) -> list:
    """Fixed policies to average over: Fixed(b) for each b of a random policy, else the
    policy itself. `policy` defaults to the model's current one."""
    policy = policy if policy is not None else quant.current(model)
    if isinstance(policy, quant.RandomPrecision):
        return [quant.Fixed(b) for b in policy.support()]
    return [policy]


def expected_score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, support: list,
                   loss_fn=ce_loss, switch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, misclassification rate) per example over the policies of `support`.
    `switch`: from `quant.switching(model, support)`, to set each policy cheaply."""
    loss, wrong = torch.zeros(len(x), device=x.device), torch.zeros(len(x), device=x.device)
    for p in support:
        if switch is not None:
            switch(p)
            lo, wr = score(model, x, y, loss_fn)
        else:
            with quant.using(model, p):
                lo, wr = score(model, x, y, loss_fn)
        loss, wrong = loss + lo / len(support), wrong + wr / len(support)
    return loss, wrong


# ---- scoring: how many forward passes get an example right --------------------------

@torch.no_grad()
def correct_passes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """How many of `passes` forward passes classify each example correctly. (B,) int64."""
    hits = torch.zeros(len(x), dtype=torch.long, device=x.device)
    for _ in range(passes):
        hits += (model(x).argmax(1) == y).long()
    return hits


@torch.no_grad()
def paired_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
                    passes: int = 1) -> float:
    """Robust accuracy of crafted examples: the mean over `passes` forward passes of the
    share of examples with x and x_adv both correct in that pass (x, x_adv (B, C, H, W), y (B,))."""
    total = 0.0
    for _ in range(passes):
        total += ((model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)).float().mean().item()
    return total / passes

