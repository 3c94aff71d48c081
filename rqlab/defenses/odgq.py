"""ODG-Q (Tao & Wong, arXiv 2210.08701): robust quantization trained as online domain
generalization (METHODS section 5).

The paper's algorithm box was not available; this is rqlab's documented construction.
Each step trains on four *domains*. Two hold this step's new images, split in halves:

    clean   x_a
    noise   x_b + eps * random sign

and two replay the previous step's images, perturbed along their *own* input gradients,
which came out of the previous step's backward pass (the one that updated the weights, as
in free adversarial training, which replays each batch):

    free    x_a' + eps * sign(g_clean')                    FGSM from the clean gradient
    fgsm_rs x_b' + clip(eta + alpha * sign(g_noise'), eps)  eta ~ U(-r, r)^d, r ~ U(0, eps],
                                                           g_noise' taken at the noise point

(primes: the previous step). One forward and one backward pass per step, but every image
is seen twice, new and then adversarial: `benchmarks/training_cost.py` measured 2.47x
natural training's epoch time (FGSM-RS 1.90x, PGD-7 AT 7.29x in the same run).

The objective is risk extrapolation (V-REx): mean of the four domain risks + lambda *
their variance, which also trains for the worst unseen domain. b = 1 gives binary
networks.

Why replay (issue 14). The first construction carried the perturbations by batch *slot*:
the free delta and the FGSM-RS sign of step t came from whatever images sat in that slot at
step t - 1 (free adversarial training with one replay). With shuffled batches they belong
to other images: a universal perturbation, not an adversarial one. Trained on all of
Fashion-MNIST at 4 bits that model kept 6.8% under PGD-20, close to natural training (0.4%).
A construction with no extra pass, each example keeping its own gradient sign and free
delta from its previous step (the previous epoch, keyed by its training-set index), cost
1.13x natural training but collapsed the same way at full budget (PGD-20 4.3%, 1.1%, 2.4%
after epochs 1-3 on 1,000 held-out images, clean 87%): perturbations an epoch stale are
ones the model learns to ignore. Replaying at the very next step keeps them fresh, for one
extra pass per image.

The replayed perturbations ascend each domain's own risk: the objective's input gradient
on domain k is that domain's cross-entropy gradient times (1 + 2 lambda (R_k - mean R)) / K
(K domains: 4, or 2 at the first step, which has nothing to replay), whose sign flips when R_k lies more than 1 / (2 lambda) below the mean, so the gradients
kept for replay are the objective's times the sign of that factor.

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
        self._prev: dict | None = None  # the last step's new images and their ascent signs: x_a, y_a, x_b, y_b, g_a, g_b
        self._sizes: tuple | None = None  # this step's domain sizes, in DOMAINS order
        self._new: dict | None = None    # this step's new images, kept for the next step's replay
        self.last_risks: dict[str, float] = {}

    def config(self) -> dict:
        return {"eps": self.eps, "alpha": self.alpha, "lam": self.lam, "seed": self.seed}

    # -- one step: batch() builds the four domains, loss() scores them ------------------

    def _rand(self, shape, device) -> torch.Tensor:
        return torch.rand(shape, generator=self._gen).to(device)

    def batch(self, model, x, y):
        h = x.shape[0] // 2
        if h == 0:  # a batch too small to split: train on it clean, replay nothing
            self._sizes, self._new = None, None
            return x, y
        dev = x.device
        noise = torch.where(self._rand((h,) + tuple(x.shape[1:]), dev) < 0.5, -self.eps, self.eps)
        x_a, x_b, y_a, y_b = x[:h], x[h:2 * h], y[:h], y[h:2 * h]
        prev = self._prev
        if prev is None:
            free = rs = x[:0]
            y_free = y_rs = y[:0]
        else:
            xa, xb = prev["x_a"].to(dev), prev["x_b"].to(dev)
            free = (xa + self.eps * prev["g_a"].to(dev)).clamp(0, 1)
            r = self._rand((len(xb),) + (1,) * (x.dim() - 1), dev) * self.eps       # radius in (0, eps]
            eta = (self._rand(xb.shape, dev) * 2 - 1) * r
            rs = (xb + torch.clamp(eta + self.alpha * prev["g_b"].to(dev), -self.eps, self.eps)).clamp(0, 1)
            y_free, y_rs = prev["y_a"].to(dev), prev["y_b"].to(dev)
        # DOMAINS order: clean, free, fgsm_rs, noise
        x_train = torch.cat([x_a, free, rs, (x_b + noise).clamp(0, 1)]).detach()
        y_train = torch.cat([y_a, y_free, y_rs, y_b])
        self._sizes = (h, len(free), len(rs), h)
        self._new = {"x_a": x_a.detach(), "y_a": y_a, "x_b": x_b.detach(), "y_b": y_b}
        return x_train, y_train

    def loss(self, model, x, y):
        if self._sizes is None:
            logits = model(x)
            return F.cross_entropy(logits, y), logits
        x = x.detach().requires_grad_(True)
        x.register_hook(self._take_input_grad)
        logits = model(x)
        per_example = F.cross_entropy(logits, y, reduction="none")
        chunks = per_example.split(self._sizes)
        present = [k for k, n in enumerate(self._sizes) if n > 0]   # the first step has no replay
        risks = torch.stack([chunks[k].mean() for k in present])
        loss = risks.mean() + self.lam * risks.var(unbiased=False)
        self.last_risks = {DOMAINS[k]: v for k, v in zip(present, risks.detach().tolist())}
        # d loss / d R_k = (1 + 2 lam (R_k - mean R)) / K: its sign turns the objective's
        # input gradient on domain k back into the domain's own ascent direction
        r = risks.detach()
        factor = torch.sign(1 + 2 * self.lam * (r - r.mean()))
        self._ascent = dict(zip(present, factor.tolist()))
        return loss, logits

    @torch.no_grad()
    def _take_input_grad(self, grad: torch.Tensor) -> None:
        """Called during fit's backward: keep this step's new images and the signs of their own
        ascent directions (clean and noise domains), for the next step's replay."""
        g = grad.split(self._sizes)
        clean, noise = DOMAINS.index("clean"), DOMAINS.index("noise")
        self._prev = dict(self._new, g_a=self._ascent[clean] * torch.sign(g[clean]),
                          g_b=self._ascent[noise] * torch.sign(g[noise]))

    # -- exact resume -------------------------------------------------------------------

    def state_dict(self) -> dict:
        prev = None if self._prev is None else {k: v.cpu() for k, v in self._prev.items()}
        return {"gen": self._gen.get_state(), "prev": prev}

    def load_state_dict(self, state: dict) -> None:
        if state.get("gen") is not None:
            self._gen.set_state(state["gen"])
        self._prev = state.get("prev")

    def epoch_end(self, model, epoch, metrics):
        metrics.update({f"risk_{k}": v for k, v in self.last_risks.items()})


@register("odgq", params={"eps": 0.1, "alpha": None, "lam": 1.0}, aliases=("odg-q",),
          summary="ODG-Q, online domain generalization (Tao & Wong 2022; rqlab's construction)")
def build_odgq(eps, alpha, lam, seed, bits=None) -> ODGQ:
    return ODGQ(eps, alpha=alpha, lam=lam, seed=seed)
