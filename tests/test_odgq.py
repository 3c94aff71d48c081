"""ODG-Q: four domains, one backward pass per step, loss goes down, resumable state; the
objective (mean + lam * variance of the domain risks) and the free / FGSM-RS perturbations
each example carries from its own previous step, against a hand computation."""
import pytest
import torch

from rqlab import models, quant
from rqlab.defenses.odgq import DOMAINS, ODGQ
from rqlab.training import TrainConfig, fit
from rqlab.validate import RqlabError


class Batches:
    """A tiny in-memory loader: a fixed, learnable synthetic task (class = brightest quadrant),
    shuffled per epoch, with each batch's dataset indices (as data.Loader gives them)."""

    def __init__(self, n=256, batch_size=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, 28, 28, generator=g) * 0.5
        self.y = torch.randint(0, 4, (n,), generator=g)
        for i, c in enumerate(self.y.tolist()):
            r, q = divmod(c, 2)
            self.x[i, :, r * 14:(r + 1) * 14, q * 14:(q + 1) * 14] += 0.5
        self.batch_size, self.epoch = batch_size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.x) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch))
        for i in range(len(self)):
            self.indices = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[self.indices], self.y[self.indices]


def model4():
    torch.manual_seed(0)
    return models.create("smallcnn", num_classes=4, mean=(0.5,), std=(0.3,))


def step(h, model, x, y, idx):
    """One training step as `fit` drives it: indices -> batch() -> loss() -> backward()."""
    h.indices = idx
    xt, yt = h.batch(model, x, y)
    loss, _ = h.loss(model, xt, yt)
    loss.backward()
    return xt, yt


def test_one_forward_and_one_backward_per_step():
    m = quant.apply(model4(), quant.Fixed(4))
    counts = {"fwd": 0, "bwd": 0}
    m.register_forward_pre_hook(lambda *a: counts.__setitem__("fwd", counts["fwd"] + 1))
    m.conv1.register_full_backward_hook(lambda *a: counts.__setitem__("bwd", counts["bwd"] + 1))
    loader = Batches()
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, device="cpu", schedule="constant")
    fit(m, loader, cfg, hooks=ODGQ(eps=0.1), progress=False, log=None)
    assert counts == {"fwd": len(loader), "bwd": len(loader)}


def test_domains_are_built_as_specified():
    """Examples without memory: clean, a U(-eps, eps) free delta, FGSM-RS's eta alone (within
    eps), sign noise at eps."""
    h = ODGQ(eps=0.1, seed=0)
    h.indices = torch.arange(8)
    x = torch.full((8, 1, 28, 28), 0.5)
    y = torch.arange(8)
    xt, yt = h.batch(None, x, y)
    parts = (xt - 0.5).reshape(4, 2, -1)
    assert torch.equal(parts[0], torch.zeros_like(parts[0]))           # clean
    assert parts[1].abs().max() <= 0.1 + 1e-6 and parts[1].abs().amax(1).min() > 0.09  # free delta
    assert parts[2].abs().max() <= 0.1 + 1e-6 and (parts[2] != 0).any()               # FGSM-RS within eps
    assert torch.allclose(parts[3].abs(), torch.full_like(parts[3], 0.1))  # sign noise at eps
    assert torch.equal(yt, y)


def test_training_needs_the_batches_indices():
    h = ODGQ(eps=0.1)
    with pytest.raises(RqlabError, match="indices"):
        h.batch(None, torch.rand(8, 1, 28, 28), torch.arange(8))
    h.indices = torch.arange(4)
    with pytest.raises(RqlabError, match="indices hold 4 examples but the batch 8"):
        h.batch(None, torch.rand(8, 1, 28, 28), torch.arange(8))


def test_loss_goes_down_and_risks_are_logged():
    m = quant.apply(model4(), quant.Fixed(4))
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, device="cpu", schedule="constant")
    hist = fit(m, Batches(), cfg, hooks=ODGQ(eps=0.1, lam=1.0), progress=False, log=None)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert set(f"risk_{d}" for d in DOMAINS) <= set(hist[-1])


def test_binary_network_trains():
    m = quant.apply(model4(), quant.Fixed(1))
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.02, device="cpu", schedule="constant")
    hist = fit(m, Batches(), cfg, hooks=ODGQ(eps=0.1), progress=False, log=None)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in hist)


def test_state_round_trip():
    """A resumed run gives every example the perturbations it would have had."""
    model = model4()
    a = ODGQ(eps=0.1, seed=3)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8) % 4
    step(a, model, x, y, torch.arange(8))
    b = ODGQ(eps=0.1, seed=99)
    b.load_state_dict(a.state_dict())
    perm = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    a.indices = b.indices = perm
    assert torch.equal(a.batch(model, x[perm], y[perm])[0], b.batch(model, x[perm], y[perm])[0])


# ---- the objective and the per-example perturbations against a hand computation ------------

def hand_objective(w, b, x, y, lam, p):
    """Risk extrapolation by hand: the mean of the four domain risks (mean cross-entropy of
    each quarter of the batch: clean, free, fgsm_rs, noise) + lam * their variance (the
    population variance, 1/4 sum (r_k - mean)^2). Plain torch ops on a linear model."""
    logits = x @ w.T + b                                                      # (4P, 3)
    ce = -logits.log_softmax(dim=1)[torch.arange(len(y)), y]                 # (4P,)
    risks = torch.stack([ce[k * p:(k + 1) * p].mean() for k in range(4)])  # (4,)
    mean = risks.sum() / 4
    return mean + lam * ((risks - mean) ** 2).sum() / 4, risks


def test_objective_and_per_example_perturbations_match_a_hand_computation():
    """Two steps of ODG-Q on a linear model (4 inputs, 3 classes), batch 8 (P = 2 per domain),
    the same 8 training examples in both, shuffled between them, as `fit` drives it.

    Step 1 (no memory): the domains from the hook's generator (draw order: the fresh free
    delta, the FGSM-RS radius, its eta, the sign noise), and the loss equals the hand
    objective. Each example then keeps the sign of its own ascent direction (its input
    gradient times sign(1 + 2 lam (R_k - mean R)) of its domain k) and its next free delta
    clip(p + eps * sign), p the perturbation it was trained with. Step 2: the examples that
    land in the free quarter get their kept delta, those in the FGSM-RS quarter
    clip(eta + alpha * their kept sign), whichever slot and domain they had in step 1."""
    eps, lam, alpha, seed, p = 0.1, 2.0, 0.2, 7, 2
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    x = torch.rand(8, 4, generator=torch.Generator().manual_seed(1))
    x[0, 0], x[3, 1], x[5, 2] = 0.0, 1.0, 0.98  # near the edges: clamping to [0, 1] matters
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    h = ODGQ(eps=eps, alpha=alpha, lam=lam, seed=seed)

    gen = torch.Generator().manual_seed(seed)
    fresh = (torch.rand(p, 4, generator=gen) * 2 - 1) * eps
    r = torch.rand(p, 1, generator=gen) * eps
    eta = (torch.rand(p, 4, generator=gen) * 2 - 1) * r
    noise = torch.where(torch.rand(p, 4, generator=gen) < 0.5, -eps, eps)
    pert1 = torch.cat([torch.zeros(p, 4), fresh, eta.clamp(-eps, eps), noise])   # example i: row i
    h.indices = torch.arange(8)
    xt1, yt1 = h.batch(model, x, y)
    assert torch.allclose(xt1, (x + pert1).clamp(0, 1), atol=1e-7) and torch.equal(yt1, y)

    loss, logits = h.loss(model, xt1, yt1)
    xh = xt1.clone().requires_grad_(True)
    hand, risks = hand_objective(w, b, xh, y, lam, p)
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    assert [h.last_risks[d] for d in DOMAINS] == pytest.approx(risks.tolist(), rel=1e-6)
    assert lam * ((risks - risks.mean()) ** 2).mean().item() > 0.01  # the variance term matters
    assert torch.equal(logits, model(xt1))
    loss.backward()
    (grad,) = torch.autograd.grad(hand, xh)
    factor = torch.sign(1 + 2 * lam * (risks - risks.mean())).repeat_interleave(p)[:, None]
    sign = (grad * factor).sign()                    # each example's own ascent direction
    assert (sign != 0).all()
    delta = (pert1 + eps * sign).clamp(-eps, eps)    # each example's next free delta

    order = torch.tensor([6, 7, 4, 5, 0, 1, 2, 3])   # noise -> clean, fgsm_rs -> free, clean -> fgsm_rs, free -> noise
    torch.rand(p, 4, generator=gen)                   # step 2's fresh delta: drawn, unused (all seen)
    r = torch.rand(p, 1, generator=gen) * eps
    eta = (torch.rand(p, 4, generator=gen) * 2 - 1) * r
    noise = torch.where(torch.rand(p, 4, generator=gen) < 0.5, -eps, eps)
    xo = x[order]
    expected = torch.cat([xo[:2], xo[2:4] + delta[order[2:4]],
                          xo[4:6] + (eta + alpha * sign[order[4:6]]).clamp(-eps, eps), xo[6:] + noise]).clamp(0, 1)
    h.indices = order
    xt2, yt2 = h.batch(model, xo, y[order])
    assert torch.allclose(xt2, expected, atol=1e-3)   # the kept delta is float16
    assert torch.equal(yt2, y[order])
    # alpha = 2 eps > eps + |eta|: the FGSM-RS quarter is FGSM at eps along each example's kept sign
    assert torch.allclose(xt2[4:6], (xo[4:6] + eps * sign[order[4:6]]).clamp(0, 1), atol=1e-7)


def test_the_perturbations_ascend_each_domains_own_risk_when_the_variance_term_flips_the_sign():
    """With a large lam, a domain whose risk lies more than 1 / (2 lam) below the mean has an
    objective gradient pointing *down* its own loss; the kept signs must still follow each
    domain's own cross-entropy gradient (issue 14)."""
    eps, lam, p = 0.1, 50.0, 3
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.rand(4 * p, 4, generator=torch.Generator().manual_seed(2))
    y = (model(x).argmax(1) + 1) % 3         # wrong labels: high risks ...
    y[p:2 * p] = model(x[p:2 * p]).argmax(1)  # ... but the free quarter's: a risk far below the mean
    h = ODGQ(eps=eps, lam=lam, seed=3)
    xt, yt = step(h, model, x, y, torch.arange(4 * p))
    risks = torch.tensor([h.last_risks[d] for d in DOMAINS])
    xg = xt.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(model(xg), yt, reduction="none").reshape(4, p).mean(1)
    own = torch.cat([torch.autograd.grad(ce[k], xg, retain_graph=True)[0][k * p:(k + 1) * p] for k in range(4)])
    factor = 1 + 2 * lam * (risks - risks.mean())
    assert factor[1] < 0 and (factor[[0, 2, 3]] > 0).all(), f"the test needs the free domain flipped: {factor.tolist()}"
    assert torch.equal(h._sign.float(), own.sign())
