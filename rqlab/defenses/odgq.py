"""ODG-Q (Tao & Wong, arXiv 2210.08701): robust quantization trained as online domain
generalization (METHODS section 5).

The paper's algorithm box was not available; this is rqlab's documented construction.
Every batch is split into four parts, each a *domain*:

    clean   x
    free    x + delta, where delta is carried from step to step and updated with
            eps * sign(grad_x) from this step's own backward pass (free adversarial
            training with one replay: no extra forward/backward pass)
    fgsm_rs x + clip(eta + alpha * sign(g_prev)), eta ~ U(-r, r)^d with a random radius
            r ~ U(0, eps], g_prev the input gradient of this slot at the previous step
    noise   x + eps * random sign

The objective is risk extrapolation (V-REx): mean of the four domain risks + lambda *
their variance, which also trains for the worst unseen domain. One forward and one
backward pass per step, whatever b (b = 1 gives binary networks); the input gradients
come out of the same backward as the weight update.

The perturbations ascend each domain's own risk: the objective's input gradient on
domain k is that domain's cross-entropy gradient times (1 + 2 lambda (R_k - mean R)) / 4,
whose sign flips when R_k lies more than 1 / (2 lambda) below the mean, so the free and
FGSM-RS updates use the objective's gradient times the sign of that factor (before the
fix of issue 14 they took the objective's gradient as it was, and a domain far below the
mean risk was then stepped *down* its own loss).

    >>> fit(model, loader, cfg, hooks=ODGQ(eps=0.1, lam=1.0))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..training import Hooks
from ..validate import check_float, check_int
from .registry import register

DOMAINS = ("clean", "free", "fgsm_rs", "noise")


class ODGQ(Hooks):
    """ODG-Q training hooks. eps: linf radius; alpha: FGSM-RS step (default 1.25 eps);
    lam: weight of the variance of the domain risks."""

    name = "odgq"

    def __init__(self, eps: float = 0.1, alpha: float | None = None, lam: float = 1.0, seed: int = 0):
        self.eps = check_float(eps, "eps", 0.0, 1.0)
        self.alpha = check_float(1.25 * self.eps if alpha is None else alpha, "alpha", 0.0)
        self.lam = check_float(lam, "lam", 0.0)
        self.seed = check_int(seed, "seed")
        self._gen = torch.Generator().manual_seed(self.seed)
        self._delta: torch.Tensor | None = None   # (P, C, H, W) carried free perturbation
        self._g_prev: torch.Tensor | None = None  # (P, C, H, W) last input-gradient sign, fgsm_rs slot
        self.last_risks: dict[str, float] = {}

    def config(self) -> dict:
        return {"eps": self.eps, "alpha": self.alpha, "lam": self.lam, "seed": self.seed}

    # -- one step: batch() builds the four domains, loss() scores them ------------------

    def _rand(self, shape, device) -> torch.Tensor:
        return torch.rand(shape, generator=self._gen).to(device)

    def batch(self, model, x, y):
        p = x.shape[0] // len(DOMAINS)
        if p == 0:  # a batch too small to split: train on it clean
            self._parts = None
            return x, y
        shape, dev = (p,) + tuple(x.shape[1:]), x.device
        if self._delta is None or self._delta.shape != shape:
            self._delta = (self._rand(shape, dev) * 2 - 1) * self.eps
            self._g_prev = torch.zeros(shape, device=dev)
        xs = x[: 4 * p].reshape(4, p, *x.shape[1:])  # (4, P, C, H, W)
        r = self._rand((p,) + (1,) * (x.dim() - 1), dev) * self.eps             # radius in (0, eps]
        eta = (self._rand(shape, dev) * 2 - 1) * r
        rs = torch.clamp(eta + self.alpha * self._g_prev.to(dev), -self.eps, self.eps)
        noise = torch.where(self._rand(shape, dev) < 0.5, -self.eps, self.eps)
        parts = [xs[0], xs[1] + self._delta.to(dev), xs[2] + rs, xs[3] + noise]
        x_train = torch.cat([t.clamp(0, 1) for t in parts]).detach()
        self._parts = p
        return x_train, y[: 4 * p]

    def loss(self, model, x, y):
        if self._parts is None:
            logits = model(x)
            return F.cross_entropy(logits, y), logits
        p = self._parts
        x = x.detach().requires_grad_(True)
        x.register_hook(self._take_input_grad)
        logits = model(x)
        per_example = F.cross_entropy(logits, y, reduction="none").reshape(len(DOMAINS), p)
        risks = per_example.mean(dim=1)                                      # (4,)
        loss = risks.mean() + self.lam * risks.var(unbiased=False)
        self.last_risks = dict(zip(DOMAINS, risks.detach().tolist()))
        # d loss / d R_k = (1 + 2 lam (R_k - mean R)) / 4: its sign turns the objective's
        # input gradient on domain k back into the domain's own ascent direction
        r = risks.detach()
        self._ascent = torch.sign(1 + 2 * self.lam * (r - r.mean()))
        return loss, logits

    @torch.no_grad()
    def _take_input_grad(self, grad: torch.Tensor) -> None:
        """Called during fit's backward: update the free perturbation and the FGSM-RS sign."""
        p = self._parts
        g = grad.reshape(len(DOMAINS), p, *grad.shape[1:])
        up = self._ascent.to(g.device)
        self._delta = torch.clamp(self._delta.to(g.device) + self.eps * up[1] * torch.sign(g[1]), -self.eps, self.eps)
        self._g_prev = up[2] * torch.sign(g[2])

    # -- exact resume -------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"gen": self._gen.get_state(),
                "delta": None if self._delta is None else self._delta.cpu(),
                "g_prev": None if self._g_prev is None else self._g_prev.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("gen") is not None:
            self._gen.set_state(state["gen"])
        self._delta, self._g_prev = state.get("delta"), state.get("g_prev")

    def epoch_end(self, model, epoch, metrics):
        metrics.update({f"risk_{k}": v for k, v in self.last_risks.items()})


@register("odgq", params={"eps": 0.1, "alpha": None, "lam": 1.0}, aliases=("odg-q",),
          summary="ODG-Q, online domain generalization (Tao & Wong 2022; rqlab's construction)")
def build_odgq(eps, alpha, lam, seed, bits=None) -> ODGQ:
    return ODGQ(eps, alpha=alpha, lam=lam, seed=seed)
