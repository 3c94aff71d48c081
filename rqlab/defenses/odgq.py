"""ODG-Q (Tao & Wong, arXiv 2210.08701): robust quantization trained as online domain
generalization (METHODS section 5).

The paper's algorithm box was not available; this is rqlab's documented construction.
Every batch is split into four parts, each a *domain*:

    clean   x
    free    x + delta_i, delta_i the example's own perturbation carried from its previous
            step and moved by eps * sign of its input gradient there (free adversarial
            training, per example)
    fgsm_rs x + clip(eta + alpha * sign(g_i)), eta ~ U(-r, r)^d with a random radius
            r ~ U(0, eps], g_i the example's input gradient at its previous step
    noise   x + eps * random sign

An example's previous step is the last time it was trained on, in whatever domain: the
previous epoch. Its input gradient came out of that step's backward pass, the one that
updated the weights, so it costs no extra pass: one forward and one backward pass per step,
as in natural training (plus the input gradient of the first layer). After each step,
every example of the batch keeps, keyed by its training-set index (`Hooks.indices`, from
`data.Loader`), the sign of its input gradient and its next free perturbation
clip(p_i + eps * sign(g_i)), p_i the perturbation it was trained with (0 when clean).
An example seen for the first time has no memory: its free delta is U(-eps, eps) and its
FGSM-RS step is eta alone. Memory: one float16 and one int8 per input value of the
training set (about 140 MB for Fashion-MNIST), kept in the checkpoint for exact resume.
Under torchrun each rank remembers the examples it trained; with augmentation the memory
is of the example's previous view.

The objective is risk extrapolation (V-REx): mean of the four domain risks + lambda *
their variance, which also trains for the worst unseen domain. b = 1 gives binary networks.

Why per example (issue 14). The first construction carried the free delta and the FGSM-RS
sign by batch *slot*: with shuffled batches they came from other images, a universal
perturbation, not an adversarial one. Trained on all of Fashion-MNIST at 4 bits that model
kept 6.8% under PGD-20, close to natural training.

The perturbations ascend each example's own domain risk: the objective's input gradient on
domain k is that domain's cross-entropy gradient times (1 + 2 lambda (R_k - mean R)) / 4,
whose sign flips when R_k lies more than 1 / (2 lambda) below the mean, so the kept signs
are the objective's gradient's times the sign of that factor.

    >>> fit(model, loader, cfg, hooks=ODGQ(eps=0.1, lam=1.0))   # loader: a data.Loader
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..training import Hooks
from ..validate import RqlabError, check_float, check_int
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
        # per training example (first dimension: its index): next free delta, last gradient sign, seen
        self._delta: torch.Tensor | None = None   # (N, C, H, W) float16
        self._sign: torch.Tensor | None = None    # (N, C, H, W) int8
        self._seen: torch.Tensor | None = None    # (N,) bool
        self.last_risks: dict[str, float] = {}

    def config(self) -> dict:
        return {"eps": self.eps, "alpha": self.alpha, "lam": self.lam, "seed": self.seed}

    # -- the per-example memory ---------------------------------------------------------

    def _rand(self, shape, device) -> torch.Tensor:
        return torch.rand(shape, generator=self._gen).to(device)

    def _grow(self, n: int, shape: tuple) -> None:
        """Room for training indices < n (the memory grows with the largest index seen)."""
        have = 0 if self._seen is None else len(self._seen)
        if have >= n:
            return
        if self._delta is not None and tuple(self._delta.shape[1:]) != shape:
            raise RqlabError(f"ODG-Q's memory holds examples of shape {tuple(self._delta.shape[1:])}, "
                             f"this batch's are {shape}: one ODGQ hook trains one training set")
        extra = n - have
        grow = lambda old, new: new if old is None else torch.cat([old, new])  # noqa: E731
        self._delta = grow(self._delta, torch.zeros((extra,) + shape, dtype=torch.float16))
        self._sign = grow(self._sign, torch.zeros((extra,) + shape, dtype=torch.int8))
        self._seen = grow(self._seen, torch.zeros(extra, dtype=torch.bool))

    # -- one step: batch() builds the four domains, loss() scores them ------------------

    def batch(self, model, x, y):
        idx = self.indices
        if idx is None:
            raise RqlabError("ODG-Q keeps each training example's perturbation by its index: train it through "
                             "rqlab.training.fit with a data.Loader (or a loader with an `indices` attribute, "
                             "the dataset indices of each batch)")
        idx = idx.cpu()
        if len(idx) != len(x):
            raise RqlabError(f"the loader's indices hold {len(idx)} examples but the batch {len(x)}")
        p = x.shape[0] // len(DOMAINS)
        shape, dev = tuple(x.shape[1:]), x.device
        self._grow(int(idx.max()) + 1, shape)
        if p == 0:  # a batch too small to split: train on it clean (its gradients are still kept)
            self._parts, self._idx, self._pert = None, idx, torch.zeros_like(x)
            return x, y
        q = lambda k: slice(k * p, (k + 1) * p)  # noqa: E731  (part k of the batch)
        i_free, i_rs = idx[q(1)], idx[q(2)]
        # free: the carried delta; an example without memory starts at U(-eps, eps)
        fresh = (self._rand((p,) + shape, dev) * 2 - 1) * self.eps
        seen = self._seen[i_free].to(dev).view((p,) + (1,) * len(shape))
        delta = torch.where(seen, self._delta[i_free].to(dev, torch.float32), fresh)
        # fgsm_rs: eta at a random radius plus alpha times the kept sign (0 without memory)
        r = self._rand((p,) + (1,) * len(shape), dev) * self.eps               # radius in (0, eps]
        eta = (self._rand((p,) + shape, dev) * 2 - 1) * r
        rs = torch.clamp(eta + self.alpha * self._sign[i_rs].to(dev, torch.float32), -self.eps, self.eps)
        noise = torch.where(self._rand((p,) + shape, dev) < 0.5, -self.eps, self.eps)
        pert = torch.cat([torch.zeros_like(delta), delta, rs, noise])          # (4P, C, H, W)
        x_train = (x[: 4 * p] + pert).clamp(0, 1).detach()
        self._parts, self._idx, self._pert = p, idx[: 4 * p], pert
        return x_train, y[: 4 * p]

    def loss(self, model, x, y):
        x = x.detach().requires_grad_(True)
        x.register_hook(self._take_input_grad)
        logits = model(x)
        if self._parts is None:
            self._ascent = torch.ones(1, device=x.device)
            return F.cross_entropy(logits, y), logits
        p = self._parts
        per_example = F.cross_entropy(logits, y, reduction="none").reshape(len(DOMAINS), p)
        risks = per_example.mean(dim=1)                                      # (4,)
        loss = risks.mean() + self.lam * risks.var(unbiased=False)
        self.last_risks = dict(zip(DOMAINS, risks.detach().tolist()))
        # d loss / d R_k = (1 + 2 lam (R_k - mean R)) / 4: its sign turns the objective's
        # input gradient on domain k back into the domain's own ascent direction
        r = risks.detach()
        self._ascent = torch.sign(1 + 2 * self.lam * (r - r.mean())).repeat_interleave(p)
        return loss, logits

    @torch.no_grad()
    def _take_input_grad(self, grad: torch.Tensor) -> None:
        """Called during fit's backward: keep each example's ascent sign and next free delta."""
        up = self._ascent.view((-1,) + (1,) * (grad.dim() - 1))
        sign = (up * torch.sign(grad)).cpu()
        nxt = torch.clamp(self._pert.cpu() + self.eps * sign, -self.eps, self.eps)
        self._sign[self._idx] = sign.to(torch.int8)
        self._delta[self._idx] = nxt.to(torch.float16)
        self._seen[self._idx] = True

    # -- exact resume -------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"gen": self._gen.get_state(), "delta": self._delta, "sign": self._sign, "seen": self._seen}

    def load_state_dict(self, state: dict) -> None:
        if state.get("gen") is not None:
            self._gen.set_state(state["gen"])
        self._delta, self._sign, self._seen = state.get("delta"), state.get("sign"), state.get("seen")

    def epoch_end(self, model, epoch, metrics):
        metrics.update({f"risk_{k}": v for k, v in self.last_risks.items()})


@register("odgq", params={"eps": 0.1, "alpha": None, "lam": 1.0}, aliases=("odg-q",),
          summary="ODG-Q, online domain generalization (Tao & Wong 2022; rqlab's construction)")
def build_odgq(eps, alpha, lam, seed, bits=None) -> ODGQ:
    return ODGQ(eps, alpha=alpha, lam=lam, seed=seed)
