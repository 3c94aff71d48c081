"""The active set (attacks.active_set, base.iterate): on a deterministic model, the
examples it counts as fooled are exactly those that the full attack (same seed)
misclassifies at x or at one of its iterates; random policies never use it."""
from __future__ import annotations

import pytest
import torch

from rqlab import attacks, quant, zoo
from rqlab.attacks import ThreatModel
from rqlab.attacks import base


def fooled_anywhere(model, x, y, threat):
    """The full attack, watched: per example, misclassified at x, at an iterate it takes a
    gradient at, at a restart's scored point, or at the point returned. (B,) bool."""
    seen = torch.zeros(len(x), dtype=torch.bool)

    def hook(module, inputs, out):
        if len(out) == len(x):  # the attack's own forwards: whole batch, one iterate each
            seen.__ior__(out.detach().argmax(1) != y)

    h = model.register_forward_hook(hook)
    try:
        with attacks.active_set(False):
            x_adv = attacks.run(model, x, y, threat)
    finally:
        h.remove()
    with torch.no_grad():
        seen |= (model(x).argmax(1) != y) | (model(x_adv).argmax(1) != y)
    return seen, x_adv


def not_robust(model, x, y, x_adv):
    with torch.no_grad():
        return (model(x).argmax(1) != y) | (model(x_adv).argmax(1) != y)


@pytest.fixture(scope="module")
def q4_model():
    return zoo.load("fmnist-q4-pgd7-small")  # a trained 4-bit SmallCNN, policy Fixed(4)


@pytest.mark.parametrize("threat", [
    ThreatModel("pgd", eps=0.06, steps=8, seed=3),
    ThreatModel("pgd", eps=0.04, steps=6, restarts=2, seed=1),
    ThreatModel("cw", eps=0.06, steps=8, seed=2),
    ThreatModel("eot_pgd", eps=0.06, steps=6, eot=2, seed=4),
    ThreatModel("pgd", norm="l2", eps=1.0, steps=5, seed=5),
], ids=str)
def test_active_set_fools_exactly_what_the_full_attack_ever_fools(q4_model, fmnist_test, threat):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    calls = []
    real = base._active_steps
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base, "_active_steps", lambda *a: calls.append(1) or real(*a))
        with attacks.active_set():
            x_act = attacks.run(q4_model, x, y, threat)
    assert calls, "the active set did not run on a deterministic model"
    full_ever, x_full = fooled_anywhere(q4_model, x, y, threat)
    act = not_robust(q4_model, x, y, x_act)
    assert torch.equal(act, full_ever)  # bit for bit, per example
    assert 0.1 < act.float().mean() < 0.9  # mid-range, so the comparison can fail
    # against the full attack's last iterate: only ever stronger
    assert (act | ~not_robust(q4_model, x, y, x_full)).all()
    assert ((x_act - x).abs().amax() <= threat.eps + 1e-6) if threat.norm == "linf" else True


def test_active_set_on_a_trained_fp_model_matches_the_full_attack(trained_smallcnn, fmnist_test):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    threat = ThreatModel("pgd", eps=0.02, steps=6, seed=0)
    with attacks.active_set():
        act = not_robust(trained_smallcnn, x, y, attacks.pgd(trained_smallcnn, x, y, threat))
    full_ever, _ = fooled_anywhere(trained_smallcnn, x, y, threat)
    assert torch.equal(act, full_ever) and 0.1 < act.float().mean() < 0.95


def test_random_policies_never_use_the_active_set(q4_model, fmnist_test, monkeypatch):
    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    m = zoo.load("fmnist-rpt-pgd7-small")
    monkeypatch.setattr(base, "_active_steps", lambda *a: pytest.fail("active set on a random policy"))
    policy = quant.current(m)
    assert isinstance(policy, quant.RandomPrecision)
    with attacks.active_set():
        for name in ("pgd", "eot_pgd", "cw"):
            attacks.run(m, x, y, ThreatModel(name, eps=0.05, steps=2, eot=2, seed=0))
        # nor a model flagged as random, nor the default setting
        q4_model.random_forward = True
        try:
            attacks.pgd(q4_model, x, y, ThreatModel("pgd", eps=0.05, steps=2))
        finally:
            del q4_model.random_forward
    attacks.pgd(q4_model, x, y, ThreatModel("pgd", eps=0.05, steps=2))


def test_active_set_rejects_a_non_bool():
    from rqlab.validate import RqlabError

    with pytest.raises(RqlabError, match="on must be True or False"):
        with attacks.active_set("yes"):
            pass
