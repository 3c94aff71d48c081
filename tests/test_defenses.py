"""Defenses as training hooks: each lowers its own loss on a small task, RPT draws every
precision and trains only the matching BN branch, PGD-AT/FGSM-RS craft inside the ball,
and every defense is one `rqlab train --defense` flag."""
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
