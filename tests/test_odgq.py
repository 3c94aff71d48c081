"""ODG-Q: four domains, one backward pass per step, loss goes down, resumable state."""
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
