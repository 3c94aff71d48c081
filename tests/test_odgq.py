"""ODG-Q: four domains, one backward pass per step, loss goes down, resumable state; the
objective (mean + lam * variance of the domain risks) and the free / FGSM-RS updates from the
previous backward, against a hand computation."""
import pytest
import torch

from rqlab import models, quant
from rqlab.defenses.odgq import DOMAINS, ODGQ
from rqlab.training import TrainConfig, fit


class Batches:
    """A tiny in-memory loader: a fixed, learnable synthetic task (class = brightest quadrant)."""

    def __init__(self, n=256, batch_size=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, 28, 28, generator=g) * 0.5
        self.y = torch.randint(0, 4, (n,), generator=g)
        for i, c in enumerate(self.y.tolist()):
            r, q = divmod(c, 2)
            self.x[i, :, r * 14:(r + 1) * 14, q * 14:(q + 1) * 14] += 0.5
        self.batch_size = batch_size

    def __len__(self):
        return len(self.x) // self.batch_size

    def __iter__(self):
        for i in range(len(self)):
            s = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield self.x[s], self.y[s]


def model4():
    torch.manual_seed(0)
    return models.create("smallcnn", num_classes=4, mean=(0.5,), std=(0.3,))


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
    h = ODGQ(eps=0.1, seed=0)
    x = torch.full((8, 1, 28, 28), 0.5)
    y = torch.arange(8)
    xt, yt = h.batch(None, x, y)
    parts = (xt - 0.5).reshape(4, 2, -1)
    assert torch.equal(parts[0], torch.zeros_like(parts[0]))           # clean
    assert parts[1].abs().max() <= 0.1 + 1e-6                          # carried free delta
    assert parts[2].abs().max() <= 0.1 + 1e-6                          # FGSM-RS within eps
    assert torch.allclose(parts[3].abs(), torch.full_like(parts[3], 0.1))  # sign noise at eps
    assert torch.equal(yt, y)


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
    a = ODGQ(eps=0.1, seed=3)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    a.batch(None, x, y)
    b = ODGQ(eps=0.1, seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.batch(None, x, y)[0], b.batch(None, x, y)[0])


# ---- the objective and the free / FGSM updates against a hand computation ------------------

def hand_objective(w, b, x, y, lam, p):
    """Risk extrapolation by hand: the mean of the four domain risks (mean cross-entropy of
    each quarter of the batch: clean, free, fgsm_rs, noise) + lam * their variance (the
    population variance, 1/4 sum (r_k - mean)^2). Plain torch ops on a linear model."""
    logits = x @ w.T + b                                                      # (4P, 3)
    ce = -logits.log_softmax(dim=1)[torch.arange(len(y)), y]                 # (4P,)
    risks = torch.stack([ce[k * p:(k + 1) * p].mean() for k in range(4)])  # (4,)
    mean = risks.sum() / 4
    return mean + lam * ((risks - mean) ** 2).sum() / 4, risks


def test_objective_and_input_gradient_updates_match_a_hand_computation():
    """Two steps of ODG-Q on a linear model (4 inputs, 3 classes), batch 8 (P = 2 per domain),
    driven as `fit` drives it: batch() -> loss() -> backward().

    Step 1: the training batch is the four domains built from the hook's generator
    (draw order: initial free delta, FGSM-RS radius, its uniform noise, the sign noise;
    the first FGSM-RS has no previous gradient), and the loss equals the hand objective.
    Step 2: the free slot's delta moved by eps * sign of the input gradient of the free
    quarter in step 1's backward (clipped to the eps-ball), and the FGSM-RS quarter is
    x + clip(eta + alpha * sign(g)), g the step-1 input gradient of the FGSM-RS quarter.
    Slots, not examples, carry the perturbation (free adversarial training): step 2's
    examples in a slot get what step 1's examples in that slot left."""
    eps, lam, alpha, seed, p = 0.1, 2.0, 0.2, 7, 2
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    g0 = torch.Generator().manual_seed(1)
    x1 = torch.rand(8, 4, generator=g0)
    x1[0, 0], x1[3, 1], x1[5, 2] = 0.0, 1.0, 0.98  # near the edges: clamping to [0, 1] matters
    x2 = torch.rand(8, 4, generator=g0)
    y1, y2 = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([2, 2, 1, 0, 0, 1, 1, 2])
    h = ODGQ(eps=eps, alpha=alpha, lam=lam, seed=seed)

    # step 1: the domains, by hand with a generator of the same seed
    gen = torch.Generator().manual_seed(seed)
    delta0 = (torch.rand(p, 4, generator=gen) * 2 - 1) * eps
    r = torch.rand(p, 1, generator=gen) * eps
    eta = (torch.rand(p, 4, generator=gen) * 2 - 1) * r
    noise = torch.where(torch.rand(p, 4, generator=gen) < 0.5, -eps, eps)
    q = lambda k: slice(k * p, (k + 1) * p)  # noqa: E731  (quarter k of the batch)
    expected1 = torch.cat([x1[q(0)], x1[q(1)] + delta0, x1[q(2)] + eta.clamp(-eps, eps),
                           x1[q(3)] + noise]).clamp(0, 1)
    xt1, yt1 = h.batch(model, x1, y1)
    assert torch.allclose(xt1, expected1, atol=1e-7) and torch.equal(yt1, y1)
    assert (xt1 - x1).abs().max() <= eps + 1e-7

    loss, logits = h.loss(model, xt1, yt1)
    xh = xt1.clone().requires_grad_(True)
    hand, risks = hand_objective(w, b, xh, y1, lam, p)
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    assert [h.last_risks[d] for d in DOMAINS] == pytest.approx(risks.tolist(), rel=1e-6)
    variance = ((risks - risks.mean()) ** 2).mean().item()
    assert lam * variance > 0.01  # the variance term is a visible part of the loss checked above
    assert torch.equal(logits, model(xt1))

    loss.backward()
    (grad,) = torch.autograd.grad(hand, xh)  # the input gradient of the same objective, by hand
    assert (grad[q(1)] != 0).all() and (grad[q(2)] != 0).all()
    # ... turned into each domain's own ascent direction: times sign(1 + 2 lam (R_k - mean R))
    factor = torch.sign(1 + 2 * lam * (risks - risks.mean()))
    grad = torch.cat([grad[q(k)] * factor[k] for k in range(4)])

    # step 2: the free delta and the FGSM-RS sign come from step 1's backward
    delta1 = (delta0 + eps * grad[q(1)].sign()).clamp(-eps, eps)
    r = torch.rand(p, 1, generator=gen) * eps
    eta = (torch.rand(p, 4, generator=gen) * 2 - 1) * r
    noise = torch.where(torch.rand(p, 4, generator=gen) < 0.5, -eps, eps)
    rs = (eta + alpha * grad[q(2)].sign()).clamp(-eps, eps)
    expected2 = torch.cat([x2[q(0)], x2[q(1)] + delta1, x2[q(2)] + rs, x2[q(3)] + noise]).clamp(0, 1)
    xt2, _ = h.batch(model, x2, y2)
    assert torch.allclose(xt2, expected2, atol=1e-7)
    # alpha = 2 eps > eps + |eta|: the FGSM-RS quarter is exactly FGSM at eps, x + eps sign(g)
    assert torch.allclose(xt2[q(2)], (x2[q(2)] + eps * grad[q(2)].sign()).clamp(0, 1), atol=1e-7)
    # and the free delta moved towards sign(g): up to eps where g > 0, down to -eps where g < 0
    assert torch.allclose(delta1, torch.where(grad[q(1)] > 0, (delta0 + eps).clamp(max=eps),
                                              (delta0 - eps).clamp(min=-eps)))


def test_the_perturbations_ascend_each_domains_own_risk_when_the_variance_term_flips_the_sign():
    """With a large lam, a domain whose risk lies more than 1 / (2 lam) below the mean has an
    objective gradient pointing *down* its own loss; the free delta and the FGSM-RS sign
    must still follow the domain's own cross-entropy gradient (issue 14)."""
    eps, lam, p = 0.1, 50.0, 3
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.rand(4 * p, 4, generator=torch.Generator().manual_seed(2))
    y = (model(x).argmax(1) + 1) % 3         # wrong labels: high risks ...
    y[p:2 * p] = model(x[p:2 * p]).argmax(1)  # ... but the free quarter's: a risk far below the mean
    h = ODGQ(eps=eps, lam=lam, seed=3)
    xt, yt = h.batch(model, x, y)
    loss, _ = h.loss(model, xt, yt)
    risks = torch.tensor([h.last_risks[d] for d in DOMAINS])
    delta0 = h._delta.clone()
    loss.backward()
    # the domains' own CE input gradients, one at a time
    xg = xt.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(model(xg), yt, reduction="none").reshape(4, p).mean(1)
    own = [torch.autograd.grad(ce[k], xg, retain_graph=True)[0][k * p:(k + 1) * p] for k in range(4)]
    factor = 1 + 2 * lam * (risks - risks.mean())
    flipped = [k for k in (1, 2) if factor[k] < 0]
    kept = [k for k in (1, 2) if factor[k] > 0]
    assert flipped == [1] and kept == [2], f"the test needs the free slot flipped: factors {factor.tolist()}"
    assert torch.equal(h._delta, (delta0 + eps * own[1].sign()).clamp(-eps, eps))
    assert torch.equal(h._g_prev, own[2].sign())
