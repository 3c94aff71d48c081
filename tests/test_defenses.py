"""Defenses as training hooks: each lowers its own loss on a small task, RPT draws every
precision, crafts at it and trains only the matching BN branch, PGD-AT/FGSM-RS (alone, under
DQ or RPT) craft on the edge of their own eps-ball, ODG-Q's domains use eps, DQ's loss adds
beta / 2 times a hand-computed orthogonality penalty, and every defense is one
`rqlab train --defense` flag."""
import pytest
import torch

from rqlab import defenses, models, quant
from rqlab.defenses import FGSMRS, PGDTraining, RandomPrecisionTraining
from rqlab.quant.layers import SwitchableBatchNorm2d
from rqlab.training import Hooks, TrainConfig, fit
from rqlab.validate import RqlabError

from test_train import TensorLoader, squares


def model4(**kw):
    torch.manual_seed(0)
    return models.create("smallcnn", num_classes=4, mean=(0.25,), std=(0.25,), **kw)


def own_loss(hooks: Hooks, model, x, y) -> float:
    """The defense's own training objective on a fixed batch (its batch() then loss())."""
    hooks.precision(model, 0)
    model.train()
    xb, yb = hooks.batch(model, x, y)
    with torch.no_grad():
        loss, _ = hooks.loss(model, xb, yb)
    return float(loss)


SETUPS = [
    ("natural", None, "fp"),
    ("pgd-at", None, "4"),
    ("fgsm-rs", None, "fp"),
    ("dq", None, "w32a4"),
    ("dq-pgd-at", None, "w32a4"),
    ("rpt-pgd-at", (4, 8), "4,8"),
    ("rpt-fgsm-rs", (4, 8), "4,8"),
    ("odgq", None, "4"),
    ("odgq", None, "1"),
]


@pytest.mark.parametrize("name, sbn, bits", SETUPS)
def test_each_defense_lowers_its_own_loss(name, sbn, bits):
    x, y = squares(384)
    policy = quant.parse_policy(bits)
    m = quant.apply(model4(sbn_bits=sbn), policy)
    # each defense takes the settings it has (an unknown one is an error)
    settings = {k: v for k, v in dict(eps=0.1, steps=3, step_size=0.04, beta=1e-3).items()
                if k in defenses.get(name).params}
    hooks = defenses.build(name, bits=policy.support() if sbn else None, **settings)
    xf, yf = x[:128], y[:128]
    before = own_loss(defenses.build(name, bits=sbn, **settings), m, xf, yf)
    quant.apply(m, policy)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, device="cpu", schedule="constant")
    fit(m, TensorLoader(x, y, 64, shuffle=True), cfg, hooks=hooks, progress=False, log=None)
    quant.apply(m, policy)
    after = own_loss(defenses.build(name, bits=sbn, **settings), m, xf, yf)
    assert after < 0.8 * before, (name, before, after)


def test_rpt_draws_every_precision_and_updates_only_the_matching_bn_branch():
    bits = (4, 5, 6, 7, 8)
    m = quant.apply(model4(sbn_bits=bits), quant.RandomPrecision(bits))
    hooks = RandomPrecisionTraining(bits, inner=FGSMRS(0.1), seed=3)
    x, y = squares(640)
    loader = TensorLoader(x, y, 32, shuffle=True)
    sbn = [s for s in m.modules() if isinstance(s, SwitchableBatchNorm2d)]
    seen = []

    class Watch(Hooks):  # wraps RPT: snapshot every branch around each step
        name = "watch"

        def precision(self, model, step):
            hooks.precision(model, step)
            self.snap = [{k: bn.running_mean.clone() for k, bn in s.bns.items()} for s in sbn]
            self.b = model.conv2.w_bits
            seen.append(self.b)

        def batch(self, model, x, y):
            return hooks.batch(model, x, y)

        def loss(self, model, x, y):
            out = hooks.loss(model, x, y)
            for s, before in zip(sbn, self.snap):  # the training forward moved exactly branch b
                for k, bn in s.bns.items():
                    moved = not torch.equal(bn.running_mean, before[k])
                    assert moved == (k == str(self.b)), (k, self.b)
            return out

        def epoch_end(self, model, epoch, metrics):
            hooks.epoch_end(model, epoch, metrics)

    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, device="cpu", schedule="constant")
    hist = fit(m, loader, cfg, hooks=Watch(), progress=False, log=None)
    assert set(seen) == set(bits) and len(seen) == len(loader)
    assert hist[0]["rpt_bits_drawn"] == {str(b): seen.count(b) for b in bits}
    assert isinstance(quant.current(m), quant.RandomPrecision)  # RPI restored after the epoch
    assert [hooks.draw(s) for s in range(20)] == [hooks.draw(s) for s in range(20)]  # resumable draws


def test_adversarial_batches_stay_in_the_ball_and_raise_the_loss():
    x, y = squares(64)
    m = quant.apply(model4(), quant.Fixed(4))
    m.train()
    m(x)  # ranges of 4 bits exist
    for hooks in (PGDTraining(eps=0.1, steps=5, step_size=0.03), FGSMRS(eps=0.1)):
        hooks.precision(m, 0)
        xa, ya = hooks.batch(m, x, y)
        assert torch.equal(ya, y) and (xa - x).abs().max() <= 0.1 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
        assert m.training  # the loop's train mode survives the attack
        with torch.no_grad():
            m.eval()
            ce = lambda z: torch.nn.functional.cross_entropy(m(z), y).item()  # noqa: E731
            assert ce(xa) > ce(x)
            m.train()


def test_pgd_training_initialises_ranges_of_a_new_precision_without_touching_bn():
    m = quant.apply(model4(), quant.Fixed(5))
    x, y = squares(32)
    bn = m.bn2.running_mean.clone()
    m.train()
    PGDTraining(eps=0.1, steps=2).batch(m, x, y)  # would raise "never trained or calibrated" otherwise
    assert torch.equal(m.bn2.running_mean, bn) and m.conv2.act.seen[4] == 1


def test_names_and_bad_settings():
    assert defenses.canonical("RPT-PGD7") == "rpt-pgd-at" and defenses.canonical("pgd") == "pgd-at"
    with pytest.raises(RqlabError, match="defense='magic' is unknown"):
        defenses.build("magic")
    with pytest.raises(RqlabError, match="precision set"):
        defenses.build("rpt-pgd-at", bits=None)
    with pytest.raises(RqlabError, match="eps"):
        defenses.build("fgsm-rs", eps=-0.1)
    with pytest.raises(RqlabError, match="beta"):
        defenses.build("dq", beta=-1.0)


def test_every_defense_is_one_train_flag(tmp_path, capsys):
    from rqlab.cli import main

    for name, bits in (("fgsm-rs", "fp"), ("rpt-pgd-at", "4,8"), ("dq", "w32a4"), ("odgq", "1")):
        out = tmp_path / name
        steps = ["--attack-steps", "2"] if "steps" in defenses.get(name).params else []
        code = main(["train", "--defense", name, "--bits", bits, "--epochs", "1", "--n-train", "128",
                     "--eval-n", "64", *steps, "--out", str(out), "--no-progress", "--device", "cpu"])
        assert code == 0 and (out / "checkpoint.pt").is_file()
        from rqlab import checkpoint

        ckpt = checkpoint.load(out / "checkpoint.pt")
        assert ckpt["hooks"]["name"] == defenses.build(name, bits=(4, 8)).name
    assert main(["train", "--defense", "rpt-pgd-at", "--bits", "4", "--epochs", "1", "--out", str(tmp_path / "x")]) == 2
    assert "precision set" in capsys.readouterr().err
    # a setting the defense does not have is refused before any work, naming what it has
    assert main(["train", "--defense", "pgd-at", "--beta", "1e-3", "--out", str(tmp_path / "y")]) == 2
    assert "no setting beta: its settings are eps, steps, step_size" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


# ---- each defense uses its strength: the training batch and the loss ----------------------

def linf(xa, x):
    """Per-example linf distance (B,)."""
    return (xa - x).flatten(1).abs().amax(dim=1)


N = 16  # examples per crafted batch (4 per ODG-Q domain)


def crafted(name, eps, step=0):
    """The training batch of defense `name` at radius eps for N squares on a 4-bit model
    (RPT: the {4, 8} set, switchable BN), called as `fit` calls it in step `step`.
    PGD: 5 steps of eps / 2 (2.5 eps / steps, passed explicitly)."""
    x, y = squares(N)
    rpt = name.startswith("rpt")
    m = quant.apply(model4(sbn_bits=(4, 8) if rpt else None), quant.Fixed(4))
    m.train()
    settings = {k: v for k, v in dict(eps=eps, steps=5, step_size=eps / 2).items() if k in defenses.get(name).params}
    hooks = defenses.build(name, bits=(4, 8) if rpt else None, **settings)
    hooks.precision(m, step)
    xa, ya = hooks.batch(m, x, y)
    assert torch.equal(ya, y) and xa.min() >= 0 and xa.max() <= 1
    return x, xa, m


@pytest.mark.parametrize("name", ["pgd-at", "fgsm-rs", "dq-pgd-at", "rpt-pgd-at"])
def test_adversarial_batch_reaches_the_edge_of_its_own_eps_ball(name):
    """PGD (random start, 5 steps of eps / 2) and FGSM-RS (alpha 1.25 eps past a uniform
    start) both push many pixels of every example onto the ball's edge: each example's
    linf distance to x is eps itself, for eps 0.05 and 0.1, so a defense that trains on
    clean inputs (0) or on a fixed radius (0.1 at eps 0.05) fails. The mean pixel distance
    is a large share of eps (above 0.5 eps; a uniform start alone gives 0.5 eps) and
    doubles with eps."""
    mean = {}
    for eps in (0.05, 0.1):
        x, xa, _ = crafted(name, eps)
        d = linf(xa, x)
        assert torch.allclose(d, torch.full_like(d, eps), atol=1e-6), (name, eps, d.min().item(), d.max().item())
        mean[eps] = (xa - x).abs().mean().item()
        assert 0.5 * eps < mean[eps] <= eps, (name, eps, mean[eps])
    assert mean[0.1] / mean[0.05] == pytest.approx(2, rel=0.15), mean


def test_rpt_crafts_at_the_precision_it_draws_and_the_draws_change():
    """RPT's batch at a step that draws 4 bits is PGD-AT's batch on the same model at
    Fixed(4) (same seed and step), and not its batch at Fixed(8): the attack runs at the
    drawn precision. Over 20 steps the draws cover {4, 8} and change from step to step
    (not one precision for the whole run); the model follows every draw."""
    hooks = defenses.build("rpt-pgd-at", eps=0.1, steps=5, step_size=0.05, bits=(4, 8))
    draws = [hooks.draw(s) for s in range(20)]
    assert set(draws) == {4, 8} and sum(a != b for a, b in zip(draws, draws[1:])) >= 3, draws
    m = quant.apply(model4(sbn_bits=(4, 8)), quant.Fixed(4))
    for step, b in enumerate(draws):
        hooks.precision(m, step)
        assert quant.current(m) == quant.Fixed(b) and m.conv2.w_bits == b
    step = draws.index(4)
    x, xa, _ = crafted("rpt-pgd-at", 0.1, step)
    y = squares(N)[1]
    for b in (4, 8):
        ref = quant.apply(model4(sbn_bits=(4, 8)), quant.Fixed(b))
        ref.train()
        pgd_at = defenses.build("pgd-at", eps=0.1, steps=5, step_size=0.05)
        pgd_at.precision(ref, step)
        assert torch.equal(xa, pgd_at.batch(ref, x, y)[0]) == (b == 4), b


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_odgq_domains_use_eps(eps):
    """ODG-Q's batches of 16 squares, two steps: the first is the clean half (x itself) and
    the sign-noise half, at distance eps in every pixel (away from the [0, 1] clamp); the
    second replays the first's images, the free block (FGSM from each image's own gradient)
    at linf distance eps, the FGSM-RS block inside the eps-ball and not at x."""
    x, xa, m = crafted("odgq", eps)
    h = N // 2
    assert torch.equal(xa[:h], x[:h])
    inside = (x[h:] >= eps) & (x[h:] <= 1 - eps)
    assert torch.allclose((xa[h:] - x[h:]).abs()[inside], torch.tensor(eps), atol=1e-6)
    hooks = defenses.build("odgq", eps=eps)
    y = squares(N)[1]
    xt, yt = hooks.batch(m, x, y)
    hooks.loss(m, xt, yt)[0].backward()
    x2, _ = hooks.batch(m, x, y)
    free, rs = x2[h:2 * h], x2[2 * h:3 * h]
    assert torch.allclose(linf(free, x[:h]), torch.full((h,), eps), atol=1e-6)
    d = linf(rs, x[h:])
    assert (d > 0).all() and (d <= eps + 1e-6).all(), d


def hand_orthogonality(model) -> float:
    """sum over the conv and linear weights (every parameter of dimension 2 or 4) of
    ||W W^T - I||_F^2 on the smaller side, W the weight reshaped to (c_out, -1): the Gram
    matrix on the smaller side has the squared singular values of W as eigenvalues, so the
    term is sum_i (s_i^2 - 1)^2 over the min(c_out, fan_in) singular values."""
    total = 0.0
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() in (2, 4):
            s = torch.linalg.svdvals(p.detach().double().reshape(p.shape[0], -1))
            total += ((s ** 2 - 1) ** 2).sum().item()
    return total


@pytest.mark.parametrize("name", ["dq", "dq-pgd-at"])
def test_dq_loss_is_cross_entropy_plus_half_beta_times_the_orthogonality(name):
    """The DQ loss minus the cross-entropy of its own logits is beta / 2 times the hand
    penalty, for beta 1e-3 and 1e-2 (so it changes with beta, by 4.5e-3 times it)."""
    x, y = squares(16)
    m = model4()
    penalty = hand_orthogonality(m)
    n_layers = sum(1 for n, p in m.named_parameters() if n.endswith("weight") and p.dim() in (2, 4))
    assert n_layers == 5 and penalty > 1.0  # conv1-3, fc1, fc2; far from orthogonal at init
    losses = {}
    for beta in (1e-3, 1e-2):
        settings = dict(eps=0.1, steps=2, step_size=0.05, beta=beta)
        hooks = defenses.build(name, **{k: v for k, v in settings.items() if k in defenses.get(name).params})
        m.train()
        hooks.precision(m, 0)
        xb, yb = hooks.batch(m, x, y)
        loss, logits = hooks.loss(m, xb, yb)
        ce = torch.nn.functional.cross_entropy(logits, yb).item()
        assert loss.item() - ce == pytest.approx(beta / 2 * penalty, rel=1e-4)
        losses[beta] = (loss.item(), ce)
    (l1, ce1), (l2, ce2) = losses[1e-3], losses[1e-2]
    assert (l2 - ce2) - (l1 - ce1) == pytest.approx(4.5e-3 * penalty, rel=1e-4)
