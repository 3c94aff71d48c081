"""ODG-Q: four domains, one backward pass per step, loss goes down, resumable state; the
objective (mean + lam * variance of the domain risks) and the free / FGSM-RS perturbations
replayed from the previous backward on the same images, against a hand computation."""
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


def step(h, model, x, y):
    """One training step as `fit` drives it: batch() -> loss() -> backward()."""
    xt, yt = h.batch(model, x, y)
    loss, _ = h.loss(model, xt, yt)
    loss.backward()
    return xt, yt


def test_domains_are_built_as_specified():
    """Step 1 holds this step's new images only (clean half, sign-noise half); step 2 adds
    step 1's images again, perturbed within eps (free: exactly eps * sign, FGSM), with their
    labels: each image is seen new, then adversarial."""
    h = ODGQ(eps=0.1, seed=0)
    model = model4()
    x1, y1 = torch.full((8, 1, 28, 28), 0.5), torch.arange(8) % 4
    xt, yt = step(h, model, x1, y1)
    assert xt.shape[0] == 8 and torch.equal(yt, y1)
    assert torch.equal(xt[:4], x1[:4])                                            # clean
    assert torch.allclose((xt[4:] - 0.5).abs(), torch.full_like(xt[4:], 0.1))   # sign noise at eps
    x2, y2 = torch.full((8, 1, 28, 28), 0.3), (torch.arange(8) + 1) % 4
    xt, yt = step(h, model, x2, y2)
    assert xt.shape[0] == 16
    assert torch.equal(yt, torch.cat([y2[:4], y1[:4], y1[4:], y2[4:]]))          # clean, free, fgsm_rs, noise
    assert torch.equal(xt[:4], x2[:4])
    assert torch.allclose((xt[4:8] - 0.5).abs(), torch.full_like(xt[4:8], 0.1))  # FGSM of step 1's clean half
    assert (xt[8:12] - 0.5).abs().max() <= 0.1 + 1e-6 and (xt[8:12] != 0.5).any()  # FGSM-RS within eps
    assert torch.allclose((xt[12:] - 0.3).abs(), torch.full_like(xt[12:], 0.1))


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
    """A resumed run replays the same images with the same perturbations."""
    model = model4()
    a = ODGQ(eps=0.1, seed=3)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8) % 4
    step(a, model, x, y)
    b = ODGQ(eps=0.1, seed=99)
    b.load_state_dict(a.state_dict())
    xa, ya = a.batch(model, x, y)
    xb, yb = b.batch(model, x, y)
    assert xa.shape[0] == 16 and torch.equal(xa, xb) and torch.equal(ya, yb)


# ---- the objective and the replayed perturbations against a hand computation --------------

def hand_objective(w, b, x, y, lam, sizes):
    """Risk extrapolation by hand: the mean of the domain risks (mean cross-entropy of each
    domain's block of the batch, in the order clean, free, fgsm_rs, noise; an empty block is
    no domain) + lam * their variance (the population variance, 1/K sum (r_k - mean)^2).
    Plain torch ops on a linear model."""
    logits = x @ w.T + b
    ce = -logits.log_softmax(dim=1)[torch.arange(len(y)), y]
    ends = torch.tensor(sizes).cumsum(0).tolist()
    risks = torch.stack([ce[e - n:e].mean() for n, e in zip(sizes, ends) if n > 0])
    mean = risks.sum() / len(risks)
    return mean + lam * ((risks - mean) ** 2).sum() / len(risks), risks


def test_objective_and_replayed_perturbations_match_a_hand_computation():
    """Two steps of ODG-Q on a linear model (4 inputs, 3 classes), batch 8 (4 new images per
    half), driven as `fit` drives it.

    Step 1: the batch is the clean half and the sign-noise half (the hook's first draw), and
    the loss equals the hand objective over these two domains. Step 2: step 2's clean and
    noise halves, then step 1's images replayed: the clean half as x + eps * sign(g), g its
    own input gradient in step 1's backward (FGSM), the noise half as
    x + clip(eta + alpha * sign(g)), g its input gradient at the noise point, eta uniform in
    a random radius (draw order: step 2's sign noise, the radius, eta). Perturbations belong
    to examples, not to batch slots (issue 14)."""
    eps, lam, alpha, seed = 0.1, 2.0, 0.2, 7
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    g0 = torch.Generator().manual_seed(1)
    x1 = torch.rand(8, 4, generator=g0)
    x1[0, 0], x1[1, 1], x1[5, 2] = 0.0, 1.0, 0.98  # near the edges: clamping to [0, 1] matters
    x2 = torch.rand(8, 4, generator=g0)
    y1, y2 = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([2, 2, 1, 0, 0, 1, 1, 2])
    h = ODGQ(eps=eps, alpha=alpha, lam=lam, seed=seed)

    gen = torch.Generator().manual_seed(seed)
    noise1 = torch.where(torch.rand(4, 4, generator=gen) < 0.5, -eps, eps)
    expected1 = torch.cat([x1[:4], (x1[4:] + noise1).clamp(0, 1)])
    xt1, yt1 = h.batch(model, x1, y1)
    assert torch.allclose(xt1, expected1, atol=1e-7) and torch.equal(yt1, y1)

    loss, logits = h.loss(model, xt1, yt1)
    xh = xt1.clone().requires_grad_(True)
    hand, risks = hand_objective(w, b, xh, y1, lam, (4, 0, 0, 4))
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    assert [h.last_risks[d] for d in ("clean", "noise")] == pytest.approx(risks.tolist(), rel=1e-6)
    assert torch.equal(logits, model(xt1))
    loss.backward()
    (grad,) = torch.autograd.grad(hand, xh)
    factor = torch.sign(1 + 2 * lam * (risks - risks.mean()))   # each domain's own ascent direction
    g_clean, g_noise = (grad[:4] * factor[0]).sign(), (grad[4:] * factor[1]).sign()
    assert (g_clean != 0).all() and (g_noise != 0).all()

    noise2 = torch.where(torch.rand(4, 4, generator=gen) < 0.5, -eps, eps)
    r = torch.rand(4, 1, generator=gen) * eps
    eta = (torch.rand(4, 4, generator=gen) * 2 - 1) * r
    free = (x1[:4] + eps * g_clean).clamp(0, 1)
    rs = (x1[4:] + (eta + alpha * g_noise).clamp(-eps, eps)).clamp(0, 1)
    expected2 = torch.cat([x2[:4], free, rs, (x2[4:] + noise2).clamp(0, 1)])
    xt2, yt2 = h.batch(model, x2, y2)
    assert torch.allclose(xt2, expected2, atol=1e-7)
    assert torch.equal(yt2, torch.cat([y2[:4], y1[:4], y1[4:], y2[4:]]))
    # alpha = 2 eps > eps + |eta|: the FGSM-RS block is FGSM at eps from the noise point's gradient
    assert torch.allclose(xt2[8:12], (x1[4:] + eps * g_noise).clamp(0, 1), atol=1e-7)

    loss2, _ = h.loss(model, xt2, yt2)
    hand2, risks2 = hand_objective(w, b, xt2, yt2, lam, (4, 4, 4, 4))
    assert loss2.item() == pytest.approx(hand2.item(), rel=1e-6)
    assert [h.last_risks[d] for d in DOMAINS] == pytest.approx(risks2.tolist(), rel=1e-6)


def test_replay_follows_each_example_not_its_batch_slot():
    """The perturbation replayed for an image is that image's own: shuffling step 1's batch
    (same images, other slots) moves each replayed perturbation with its image."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.rand(8, 4, generator=torch.Generator().manual_seed(5)) * 0.8 + 0.1, torch.arange(8) % 3
    perm = torch.tensor([3, 0, 2, 1, 4, 5, 6, 7])  # shuffle within the clean half
    frees = []
    for order in (torch.arange(8), perm):
        h = ODGQ(eps=0.1, seed=0)
        step(h, model, x[order], y[order])
        xt, yt = h.batch(model, torch.rand(8, 4), y)
        frees.append((xt[4:8], yt[4:8], order[:4]))
    (fa, ya, oa), (fb, yb, ob) = frees
    for i in range(4):
        j = (ob == oa[i]).nonzero().item()   # where image oa[i] sits in the shuffled run
        assert torch.equal(fa[i], fb[j]) and ya[i] == yb[j]


def test_the_perturbations_ascend_each_domains_own_risk_when_the_variance_term_flips_the_sign():
    """With a large lam, a domain whose risk lies more than 1 / (2 lam) below the mean has an
    objective gradient pointing *down* its own loss; the replayed perturbations must still
    follow the domain's own cross-entropy gradient (issue 14)."""
    eps, lam = 0.1, 50.0
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.rand(8, 4, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(1)                  # right labels in the clean half: a low risk ...
    y[4:] = (model(x[4:]).argmax(1) + 1) % 3  # ... wrong ones in the noise half: a high risk
    h = ODGQ(eps=eps, lam=lam, seed=3)
    xt, yt = step(h, model, x, y)
    risks = torch.tensor([h.last_risks[d] for d in ("clean", "noise")])
    factor = 1 + 2 * lam * (risks - risks.mean())
    assert factor[0] < 0 < factor[1], f"the test needs the clean domain flipped: factors {factor.tolist()}"
    xg = xt.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(model(xg), yt, reduction="none")
    own_clean = torch.autograd.grad(ce[:4].mean(), xg, retain_graph=True)[0][:4]
    own_noise = torch.autograd.grad(ce[4:].mean(), xg)[0][4:]
    assert torch.equal(h._prev["g_a"], own_clean.sign())
    assert torch.equal(h._prev["g_b"], own_noise.sign())
