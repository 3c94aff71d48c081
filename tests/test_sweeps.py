"""Sweeps (rqlab.analysis.sweeps) and the transfer matrix's EOT samples: accuracies
checked against direct forward passes, batched transfer matrices against per-batch
calls, the DQ regulariser's effect on the orthogonality penalty."""
import copy
import json

import pytest
import torch

import rqlab.attacks
from rqlab import data, quant
from rqlab.analysis import sweeps, transfer_matrix
from rqlab.attacks import ThreatModel
from rqlab.defenses import orthogonality_penalty
from rqlab.evaluation import evaluate
from rqlab.validate import RqlabError

from conftest import load_fmnist


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny passes: intra-op threads only add overhead


@pytest.fixture(scope="module")
def net(trained_smallcnn):
    """A copy of the session's trained SmallCNN with activation ranges for 2, 4 and 8 bits."""
    m = copy.deepcopy(trained_smallcnn).eval()
    x, _ = load_fmnist("train", 256)
    quant.calibrate(m, [x[:128], x[128:]], bits=[2, 4, 8])
    return m


@pytest.fixture(scope="module")
def batch(fmnist_test):
    x, y = fmnist_test
    return x[:24], y[:24]


def flat(matrix):
    return [v for row in matrix for v in row]


def direct_accuracy(model, x, y, policy):
    with quant.using(model, policy), torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_precision_spellings():
    assert sweeps.precision(4) == quant.Fixed(4)
    assert sweeps.precision(4, act_only=True) == quant.Fixed(32, act_bits=4)
    assert str(sweeps.precision(32, act_only=True)) == "fp"


def test_accuracy_vs_bits_against_direct_forward_passes(net, batch):
    x, y = batch
    threat = ThreatModel("pgd", eps=0.1, steps=2)
    for act_only in (False, True):
        rows = sweeps.accuracy_vs_bits(net, (x, y), threat, [32, 2, 8, 1], act_only=act_only)
        assert [r["bits"] for r in rows] == [1, 2, 8, 32]
        for r in rows:
            p = sweeps.precision(r["bits"], act_only)
            assert r["policy"] == str(p) and r["n"] == len(x)
            assert r["clean_accuracy"] == pytest.approx(direct_accuracy(net, x, y, p))
            ref = evaluate(net, (x, y), threat, policy=p, progress=False)  # the same attack, directly
            assert r["robust_accuracy"] == ref["robust_accuracy"]
        json.dumps(rows)
    assert quant.current(net) == quant.Fixed(32)  # left as it was
    with pytest.raises(RqlabError, match="activation range for 3 bits"):
        sweeps.accuracy_vs_bits(net, (x, y), threat, [3])


def test_accuracy_vs_eps_starts_at_clean_and_falls(net, batch):
    x, y = batch
    rows = sweeps.accuracy_vs_eps(net, (x, y), ThreatModel("pgd", eps=0.1, steps=5), [0.0, 0.3])
    assert [r["eps"] for r in rows] == [0.0, 0.3]
    assert rows[0]["robust_accuracy"] == rows[0]["clean_accuracy"] == pytest.approx(
        direct_accuracy(net, x, y, quant.Fixed(32)))
    assert rows[1]["robust_accuracy"] <= rows[0]["robust_accuracy"]
    with pytest.raises(RqlabError, match="non-empty list"):
        sweeps.accuracy_vs_eps(net, (x, y), ThreatModel("pgd"), [])


def test_transfer_in_batches_is_the_example_weighted_mean_of_per_batch_matrices(net, batch):
    x, y = batch[0][:10], batch[1][:10]
    threat = ThreatModel("pgd", eps=0.1, steps=2, seed=5)
    rpi = quant.RandomPrecision((2, 8), seed=0)
    whole = sweeps.transfer_in_batches(net, x, y, [2, 8, 32], threat, batch_size=100)
    single = transfer_matrix(net, x, y, [2, 8, 32], [2, 8, 32], threat)
    assert flat(whole["matrix"]) == pytest.approx(flat(single["matrix"])) and whole["n"] == 10
    split = sweeps.transfer_in_batches(net, x, y, [2, 8], threat, eot_policy=rpi, passes=2, eot_samples=2,
                                       batch_size=6)
    parts = [transfer_matrix(net, x[:6], y[:6], [2, 8], [2, 8], threat.replace(seed=5), eot_policy=rpi, passes=2,
                             eot_samples=2),
             transfer_matrix(net, x[6:], y[6:], [2, 8], [2, 8], threat.replace(seed=6), eot_policy=rpi, passes=2,
                             eot_samples=2)]
    expect = [[(6 * a + 4 * b) / 10 for a, b in zip(ra, rb)] for ra, rb in zip(parts[0]["matrix"], parts[1]["matrix"])]
    assert flat(split["matrix"]) == pytest.approx(flat(expect))
    assert split["row_labels"] == ["2", "8", "eot"] and split["col_labels"] == ["2", "8", "rpi"]
    json.dumps(split)


def test_transfer_matrix_eot_samples_apply_to_the_eot_row_only(net, batch, monkeypatch):
    seen = []
    real_get = rqlab.attacks.get

    def spy(name):
        attack = real_get(name)

        def run(model, x, y, threat):
            seen.append((threat.attack, threat.eot_samples))
            return attack(model, x, y, threat)
        return run

    monkeypatch.setattr(rqlab.attacks, "get", spy)
    x, y = batch[0][:4], batch[1][:4]
    tm = transfer_matrix(net, x, y, [2, 8], [2, 8], ThreatModel("pgd", eps=0.1, steps=1),
                         eot_policy=quant.RandomPrecision((2, 8)), eot_samples=3)
    assert seen == [("pgd", 1), ("pgd", 1), ("eot_pgd", 3)] and tm["eot_samples"] == 3
    seen.clear()
    tm = transfer_matrix(net, x, y, [2], [2], ThreatModel("pgd", eps=0.1, steps=1),
                         eot_policy=quant.RandomPrecision((2, 8)))
    assert seen[-1] == ("eot_pgd", 10) and tm["eot_samples"] == 10  # eot_pgd's default


def test_craft_all_amplification_and_lipschitz_table(net, batch):
    x, y = batch[0][:8], batch[1][:8]
    threat = ThreatModel("pgd", eps=0.1, steps=2)
    q4 = copy.deepcopy(net)
    quant.apply(q4, quant.Fixed(32, act_bits=4))
    models = {"fp": net, "a4": q4}
    each = sweeps.craft_all(models, x, y, threat)
    shared = sweeps.craft_all(models, x, y, threat, craft_on="fp")
    assert shared["fp"] is shared["a4"] and torch.equal(shared["fp"], each["fp"])
    assert not torch.equal(each["fp"], each["a4"])  # white-box on each model
    for adv in each.values():
        assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with pytest.raises(RqlabError, match="craft_on='q8' is unknown"):
        sweeps.craft_all(models, x, y, threat, craft_on="q8")
    zero = sweeps.amplification(models, x, {"fp": x, "a4": x})
    assert all(v == 0 for a in zero.values() for v in a["amplification"])
    amp = sweeps.amplification(models, x, each)
    assert amp["a4"]["layers"][-1] == "logits" and all(v > 0 for v in amp["a4"]["amplification"])
    lip = sweeps.lipschitz_table(models, x, each, iters=20)
    for t in lip.values():
        prod = 1.0
        for r in t["layers"]:
            prod *= r["lipschitz"]
        assert t["bound"] == pytest.approx(prod)
        assert 0 < t["local_mean"] <= t["local_max"] <= t["bound"]
    json.dumps({"amp": amp, "lip": lip})


def test_beta_sweep_same_start_and_the_regulariser_lowers_the_penalty(fmnist_test):
    load_fmnist("train", 8)  # skips without the data
    train = data.load("fashion-mnist", "train", n=256, seed=0)
    x, y = fmnist_test
    threat = ThreatModel("pgd", eps=0.1, steps=1)
    rows, trained = sweeps.beta_sweep([0.0, 0.05], train, (x[:16], y[:16]), threat, epochs=1, n_train=128, iters=10)
    assert [r["beta"] for r in rows] == [0.0, 0.05] and set(trained) == {0.0, 0.05}
    assert rows[1]["orthogonality"] < rows[0]["orthogonality"]
    assert rows[0]["orthogonality"] == pytest.approx(orthogonality_penalty(trained[0.0]).item())
    assert all(r["bound"] > 0 and r["n"] == 16 for r in rows)
    assert quant.current(trained[0.05]) == quant.Fixed(32, act_bits=4) and not trained[0.05].training
    again, _ = sweeps.beta_sweep([0.0], train, (x[:16], y[:16]), threat, epochs=1, n_train=128, iters=10)
    assert again[0]["orthogonality"] == pytest.approx(rows[0]["orthogonality"])  # seeded: same start and order
    json.dumps(rows)
    with pytest.raises(RqlabError, match="beta=-1.0 is out of range"):
        sweeps.beta_sweep([-1.0], train, (x, y), threat)
