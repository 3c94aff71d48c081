"""What every attack shares: input checks, losses, the norm-ball geometry and the
projected-gradient loop with restarts (METHODS section 6). The model's state during an
attack (`prepared`, `eval_mode`) lives in `rqlab.models.state`.

Conventions: x, x_adv are (B, C, H, W) in [0, 1]; y is (B,) int64; gradients are taken
with respect to the input only (parameters are frozen for the attack's duration).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import quant
from ..validate import RqlabError, check_choice, check_images
from .threat import ThreatModel

GradFn = Callable[[torch.Tensor], torch.Tensor]                       # x_adv -> d loss / d x_adv
ScoreFn = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]  # x_adv -> (loss, wrong rate)

# ---- how attacks compute (docs/performance.md) -----------------------------------------------

# Active set: under a deterministic model, examples misclassified at x or at any iterate
# leave the batch with that iterate kept (see `iterate`). Off by default: an example
# fooled at some step can be classified correctly again at the last one, so the active
# set's robust accuracy can be lower than the full attack's (docs/performance.md has the
# measured gap); `active_set()` turns it on.
ACTIVE_SET = False
# Attack arithmetic: "fp32", or "bf16" (the attack's forward and backward under bf16
# autocast; quantizer grids, restarts' scores, the active set's fooled test and every
# final score stay fp32), or "auto" (bf16 where the hardware has it: CUDA, or a CPU
# with AVX512-BF16 / AMX; fp32 elsewhere). Binary policies always run in fp32.
ARITHMETICS = ("fp32", "bf16", "auto")
ARITHMETIC = "fp32"


@contextlib.contextmanager
def arithmetic(kind: str = "bf16") -> Iterator[str]:
    """Attacks inside the block compute their input gradients in `kind` ("fp32" | "bf16"
    | "auto"); evaluation records say which was used (extra["attack_settings"]).

        >>> with attacks.arithmetic("bf16"):
        ...     rec = evaluate(model, test_set, threat)
    """
    global ARITHMETIC
    kind = check_choice(str(kind).lower(), "arithmetic", ARITHMETICS)
    old, ARITHMETIC = ARITHMETIC, kind
    try:
        yield kind
    finally:
        ARITHMETIC = old


@contextlib.contextmanager
def active_set(on: bool = True) -> Iterator[bool]:
    """Inside the block, PGD, CW, BPDA and EOT-PGD on deterministic models use the active
    set (`iterate`); random models never do. Records say so (extra["attack_settings"]).

        >>> with attacks.active_set():
        ...     rec = evaluate(model, test_set, ThreatModel("pgd", eps=0.1))
    """
    global ACTIVE_SET
    if not isinstance(on, bool):
        raise RqlabError(f"active_set(on={on!r}): on must be True or False")
    old, ACTIVE_SET = ACTIVE_SET, on
    try:
        yield on
    finally:
        ACTIVE_SET = old


def bf16_supported(device) -> bool:
    """bf16 arithmetic that pays: CUDA with bf16, or a CPU whose oneDNN has bf16 kernels
    (AVX512-BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _binary(policy) -> bool:
    return policy is not None and 1 in policy.support()


def arithmetic_in_use(device, policy=None) -> str:
    """"fp32" or "bf16": what attacks on `device` against a model at `policy` compute in
    under the current setting. Binary policies (1 bit in the support) always get fp32:
    bf16 attacks on the binary zoo model failed the strength check (docs/performance.md).
    RqlabError for "bf16" where the hardware has no bf16 arithmetic."""
    if ARITHMETIC == "fp32" or _binary(policy):
        return "fp32"
    if bf16_supported(device):
        return "bf16"
    if ARITHMETIC == "bf16":
        raise RqlabError(f"arithmetic='bf16' needs CUDA or a CPU with AVX512-BF16/AMX, not {device}: "
                         f"choose one of fp32, auto")
    return "fp32"


def settings(device, policy=None) -> dict:
    """How attacks on `device` against `policy` compute now, for records: {"arithmetic",
    "active_set"} (active_set: whether deterministic models get the active set; random
    ones never do)."""
    return {"arithmetic": arithmetic_in_use(device, policy), "active_set": ACTIVE_SET}


def _bf16(device, model=None) -> bool:
    """Whether an attack's pass through `model` on `device` runs under bf16 autocast."""
    policy = quant.current(model) if isinstance(model, nn.Module) else None
    return arithmetic_in_use(device, policy) == "bf16"


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
               loss_fn=ce_loss, samples: int = 1, logits: bool = False):
    """Gradient of sum(loss_fn(forward(x), y)) w.r.t. x, averaged over `samples` forward
    passes (EOT over the forward pass's own randomness). (B, C, H, W). With logits=True,
    (gradient, the last pass's logits, detached (B, K)).

    Under `arithmetic("bf16")` the forward and backward run under bf16 autocast (the
    loss is taken in fp32 from the logits; the gradient comes back fp32)."""
    grad = torch.zeros_like(x)
    bf16 = ARITHMETIC != "fp32" and _bf16(x.device, forward)
    for _ in range(samples):
        xg = x.detach().requires_grad_(True)
        with (torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            out = forward(xg)
        loss = loss_fn(out.float(), y).sum()
        grad += torch.autograd.grad(loss, xg)[0]
    grad = grad / samples
    return (grad, out.detach()) if logits else grad


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


@dataclass
class ActiveSet:
    """What `iterate` needs to drop fooled examples (built by `active_set`):
    y (B,); grad(x_adv, y) -> (input gradient, logits at x_adv) on any subset of the
    batch; fooled(x_adv, y, logits or None) -> (b,) bool, misclassified in fp32."""
    y: torch.Tensor
    grad: Callable
    fooled: Callable


def deterministic(model: nn.Module) -> bool:
    """The model's forward is a function of its input: no random precision policy, no
    module in training mode, and no `random_forward = True` attribute (the flag for a
    custom model with its own randomness)."""
    if isinstance(quant.current(model), quant.RandomPrecision) or getattr(model, "random_forward", False):
        return False
    return not any(m.training for m in model.modules())


def active_for(model: nn.Module, y: torch.Tensor, grad: Callable) -> ActiveSet | None:
    """An ActiveSet for `iterate` when the model is deterministic and the active set is on,
    else None (the full attack). Call it where the attack's policy is applied."""
    if not ACTIVE_SET or not deterministic(model):
        return None

    @torch.no_grad()
    def fooled(xa, ya, logits=None):
        if logits is not None and logits.dtype == torch.float32:
            return logits.argmax(1) != ya
        wrong = torch.ones(len(xa), dtype=torch.bool, device=xa.device) if logits is None \
            else logits.argmax(1) != ya  # lower-precision logits only nominate; fp32 decides
        idx = wrong.nonzero().squeeze(1)
        if len(idx):
            with torch.autocast(xa.device.type, enabled=False):
                wrong[idx] = model(xa[idx]).argmax(1) != ya[idx]
        return wrong

    return ActiveSet(y, grad, fooled)


def iterate(x: torch.Tensor, threat: ThreatModel, grad_fn: GradFn, score_fn: ScoreFn,
            random_init: bool = True, active: ActiveSet | None = None) -> torch.Tensor:
    """Projected gradient ascent with restarts.

    Without `active` (random models, METHODS section 6): every example takes all
    `threat.steps` steps in every restart (no early stop once it is misclassified);
    across restarts each example keeps its worst case: the higher misclassification
    rate, then the higher loss.

    With `active` (deterministic models, `active_set`): an example misclassified at x,
    or at an iterate (the random start and each step's point, tested in fp32 on the
    logits of the gradient pass itself), leaves the batch with that point as its x_adv;
    the others are packed into a smaller batch and go on. Later restarts run only on
    examples not yet fooled. An example that is fooled is then exactly one that the full
    attack misclassifies at x or at some iterate (same seed, same random start), so the
    per-example outcome can only be at least as strong as the full attack's last iterate.
    """
    gen = torch.Generator().manual_seed(threat.seed)
    best = x.clone()
    best_wrong = torch.full((len(x),), -1.0, device=x.device)
    best_loss = torch.full((len(x),), float("-inf"), device=x.device)
    if active is not None and len(x):
        best_wrong[active.fooled(x, active.y)] = 1.0  # misclassified at x: x itself is kept
    for _ in range(threat.restarts):
        x_adv = random_start(x, threat.norm, threat.eps, gen) if random_init else x.clone()
        if active is not None:
            todo = (best_wrong < 1).nonzero().squeeze(1)
            x_adv, fooled = _active_steps(x, x_adv, todo, threat, active)
            best[fooled], best_wrong[fooled] = x_adv[fooled], 1.0
            todo = todo[~fooled[todo]]
            if len(todo) and threat.restarts > 1:
                loss, wrong = score_fn(x_adv)  # scores the whole batch: the attack's own score_fn
                better = torch.zeros_like(fooled)
                better[todo] = (wrong[todo] > best_wrong[todo]) | ((wrong[todo] == best_wrong[todo]) &
                                                                  (loss[todo] > best_loss[todo]))
                best[better], best_wrong[better], best_loss[better] = x_adv[better], wrong[better], loss[better]
            elif threat.restarts == 1:
                best[todo] = x_adv[todo]
            continue
        for _ in range(threat.steps):
            x_adv = project(ascend(x_adv, grad_fn(x_adv), threat.norm, threat.alpha), x, threat.norm, threat.eps)
        if threat.restarts == 1:
            return x_adv.detach()
        loss, wrong = score_fn(x_adv)
        better = (wrong > best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
        best[better], best_wrong[better], best_loss[better] = x_adv[better], wrong[better], loss[better]
    return best.detach()


def _active_steps(x, x_adv, todo, threat: ThreatModel, active: ActiveSet):
    """The steps of one restart on the examples `todo` (indices), packed: returns
    (x_adv (B, ...) with each example's fooling point or last iterate, fooled (B,) bool:
    fooled at an iterate before the last; the last one is not tested here)."""
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    out = x_adv.clone()
    xa, x0, ya = x_adv[todo], x[todo], active.y[todo]
    for _ in range(threat.steps):
        if not len(todo):
            break
        grad, logits = active.grad(xa, ya)
        hit = active.fooled(xa, ya, logits)
        if hit.any():
            out[todo[hit]], fooled[todo[hit]] = xa[hit], True
            keep = ~hit
            todo, xa, x0, ya, grad = todo[keep], xa[keep], x0[keep], ya[keep], grad[keep]
        xa = project(ascend(xa, grad, threat.norm, threat.alpha), x0, threat.norm, threat.eps)
    out[todo] = xa  # the last iterate of the others (restarts score it with score_fn)
    return out.detach(), fooled


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

