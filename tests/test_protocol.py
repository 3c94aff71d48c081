"""The standard protocol (METHODS section 8, `evaluate(..., protocol="standard")`): at
least as strong as each of its attacks, per example; stronger than PGD-20 where the
gradients are masked (and flagged unreliable); the support ensemble against random
precision at least as strong as AutoAttack 'rand'; records that round-trip through JSON.
AutoAttack runs with few iterations, targets and queries (options) to keep each test to
seconds; the reference settings are the defaults."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from rqlab import attacks, quant
from rqlab.attacks import ThreatModel
from rqlab.evaluation import evaluate, standard_attacks
from rqlab.models import SupportEnsemble
from rqlab.record import Record
from rqlab.stats import diff_half_width
from rqlab.validate import RqlabError

SMOKE = {"n_iter": 2, "n_target_classes": 1, "n_queries": 50}
PGD = ThreatModel("pgd", eps=0.03, steps=10, seed=3)


def _round_trips_and_names(rec, names):
    assert Record.from_json(rec.to_json()) == rec
    assert [a["name"] for a in rec.attacks] == names
    assert rec.protocol == "standard" and rec["strongest"] in names


@pytest.fixture(scope="module")
def std_record(trained_smallcnn, fmnist_test):
    return evaluate(trained_smallcnn, fmnist_test, PGD, n=16, batch_size=8, protocol="standard", options=SMOKE,
                    progress=False)


def test_standard_is_at_least_as_strong_as_each_attack_per_example(std_record, trained_smallcnn, fmnist_test):
    rec = std_record
    _round_trips_and_names(rec, ["autoattack", "pgd"])
    robust = rec.per_example["robust"]
    for a in rec.attacks:
        assert all(r <= k for r, k in zip(robust, a["per_example"])), a["name"]
        assert a["robust_accuracy"] >= rec.robust_accuracy and a["time_s"] > 0
        assert a["batch_seeds"] == [a["threat"]["seed"], a["threat"]["seed"] + 1]
    assert rec.robust_accuracy == min(a["robust_accuracy"] for a in rec.attacks) or \
        rec.robust_accuracy < min(a["robust_accuracy"] for a in rec.attacks)
    aa = rec.attacks[0]
    assert aa["threat"]["options"] == {"version": "standard", "batch_size": 500, **SMOKE}
    assert [s["attack"] for s in aa["stages"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert rec["protocol_options"]["n_iter"] == 2 and rec["protocol_options"]["eot"] == 10
    # the same attack run on its own, with the same seed, gives the same per-example outcome
    alone = evaluate(trained_smallcnn, fmnist_test, PGD, n=16, batch_size=8, progress=False)
    assert alone.per_example["robust"] == rec.attacks[1]["per_example"]
    assert all(r <= k for r, k in zip(robust, alone.per_example["robust"]))
    aa_alone = evaluate(trained_smallcnn, fmnist_test, ThreatModel("autoattack", eps=0.03, seed=3, options=dict(
        SMOKE, version="standard")), n=16, batch_size=8, progress=False)
    assert all(r <= k for r, k in zip(robust, aa_alone.per_example["robust"]))
    assert aa_alone.per_example["robust"] == aa["per_example"]  # AutoAttack's own result, attack by attack
    assert rec.unreliable == ()  # a natural model: nothing masks its gradients


class StepLinear(nn.Module):
    """A linear classifier of the input seen through a step function (4 gray levels): the
    forward is fine, the input gradient is exactly zero everywhere (gradient masking by
    design, like rounding without a straight-through estimator). Cheap, so Square can
    spend its queries in a second."""

    input_shape, num_classes = (1, 28, 28), 10

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):  # (B, 1, 28, 28) -> (B, 10)
        return self.fc((torch.floor(x * 4).clamp(max=3) / 3).flatten(1) - 0.5)


@pytest.fixture(scope="module")
def step_model(fmnist_test):
    x, y = fmnist_test[0][100:], fmnist_test[1][100:]  # trained on 400 images, evaluated on others
    torch.manual_seed(0)
    model = StepLinear()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_standard_beats_pgd20_where_gradients_are_masked_and_says_so(step_model, fmnist_test):
    threat = ThreatModel("pgd", eps=0.1, steps=20, seed=0)
    n = 60
    pgd = evaluate(step_model, fmnist_test, threat, n=n, progress=False)
    rec = evaluate(step_model, fmnist_test, threat, n=n, protocol="standard", progress=False,
                   options={"n_iter": 2, "n_target_classes": 1, "n_queries": 500})
    _round_trips_and_names(rec, ["autoattack", "pgd"])
    assert pgd.clean_accuracy > 0.6
    gap = pgd.robust_accuracy - rec.robust_accuracy
    assert gap > diff_half_width(pgd.robust_accuracy, rec.robust_accuracy, n), (pgd.robust_accuracy, rec)
    square = next(s for s in rec.attacks[0]["stages"] if s["attack"] == "square")
    assert square["fooled_first"] > 0  # the black box finds what the gradient attacks miss
    assert any(r.startswith("black-box") for r in rec.unreliable), rec.unreliable
    assert any(r.startswith("zero-gradients") for r in rec.unreliable) and rec["zero_gradient_share"] == 1.0


def test_binary_policies_add_square_and_bpda_when_registered():
    names = lambda p: [a["name"] for a in standard_attacks(p, PGD)]  # noqa: E731
    assert names(quant.Fixed(4)) == ["autoattack", "pgd"]
    assert names(quant.RandomPrecision((4, 8))) == ["autoattack", "eot_pgd", "expectation"]
    extra = ["square"] + (["bpda"] if "bpda" in attacks.names() else [])
    assert names(quant.Fixed(1)) == ["autoattack", "pgd"] + extra
    assert names(quant.RandomPrecision((1, 4))) == ["autoattack", "eot_pgd", "expectation"] + extra
    sq = standard_attacks(quant.Fixed(1), PGD, {"n_queries": 50})[2]
    assert sq["kind"] == "black-box" and sq["threat"].options["n_queries"] == 50
    assert standard_attacks(quant.Fixed(1), PGD)[2]["threat"].options["n_queries"] == 5000


@pytest.fixture(scope="module")
def rpi_model(trained_smallcnn, fmnist_test):
    model = copy.deepcopy(trained_smallcnn)
    quant.calibrate(model, [fmnist_test[0][400:500]], bits=[4, 8])
    return model


def test_support_ensemble_is_the_mean_softmax(rpi_model, fmnist_test):
    x = fmnist_test[0][:8]
    ens = SupportEnsemble(rpi_model, (4, 8))
    with torch.no_grad():
        probs = []
        for b in (4, 8):
            with quant.using(rpi_model, quant.Fixed(b)):
                probs.append(rpi_model(x).softmax(1))
        out = ens(x)
    torch.testing.assert_close(out.exp(), (probs[0] + probs[1]) / 2, rtol=1e-5, atol=1e-6)
    assert quant.current(rpi_model) == quant.Fixed(32)


def test_random_precision_ensemble_at_least_as_strong_as_autoattack_rand(rpi_model, fmnist_test):
    rpi = quant.RandomPrecision((4, 8), seed=2)
    threat = ThreatModel("pgd", eps=0.03, steps=5, seed=1)
    n, passes = 12, 3
    rec = evaluate(rpi_model, fmnist_test, threat, policy=rpi, n=n, passes=passes, protocol="standard",
                   options={**SMOKE, "eot": 2}, progress=False)
    _round_trips_and_names(rec, ["autoattack", "eot_pgd", "expectation"])
    assert rec.attacks[0]["target"] == "support ensemble" and rec.unreliable == ()
    rand = evaluate(rpi_model, fmnist_test, ThreatModel("autoattack", eps=0.03, seed=1, options={
        "version": "rand", "n_iter": 2}), policy=rpi, n=n, passes=passes, progress=False)
    ens = rec.attacks[0]["robust_accuracy"]
    # both scored under the random policy over the same passes; the noise of two accuracies
    # on n examples bounds how far a weaker attack can come out ahead by chance
    assert ens <= rand.robust_accuracy + diff_half_width(ens, rand.robust_accuracy, n), (ens, rand.robust_accuracy)
    assert rec.robust_accuracy <= rand.robust_accuracy + diff_half_width(rec.robust_accuracy, rand.robust_accuracy, n)
    assert rec.robust_worst_accuracy <= rec.robust_accuracy
    for a in rec.attacks:
        assert len(a["hits"]) == n and all(r <= k for r, k in zip(rec.per_example["robust"], a["per_example"]))


def test_quick_records_of_random_policies_without_an_adaptive_attack_are_flagged(rpi_model, fmnist_test):
    rpi = quant.RandomPrecision((4, 8))
    fgsm = evaluate(rpi_model, fmnist_test, ThreatModel("fgsm", eps=0.03), policy=rpi, n=8, progress=False)
    assert len(fgsm.unreliable) == 1 and fgsm.unreliable[0].startswith("random-forward")
    eot = evaluate(rpi_model, fmnist_test, ThreatModel("eot_pgd", eps=0.03, steps=1, eot=2), policy=rpi, n=8,
                   progress=False)
    assert eot.unreliable == ()
    assert evaluate(rpi_model, fmnist_test, ThreatModel("fgsm", eps=0.03), n=8, progress=False).unreliable == ()


def test_protocol_arguments_are_checked(trained_smallcnn, fmnist_test):
    with pytest.raises(RqlabError, match="protocol='fast' is unknown|protocol="):
        evaluate(trained_smallcnn, fmnist_test, PGD, n=4, protocol="fast")
    with pytest.raises(RqlabError, match="needs a threat"):
        evaluate(trained_smallcnn, fmnist_test, n=4, protocol="quick")
    # no threat and no protocol: the standard protocol (PGD-20 linf 0.1 plus AutoAttack)
    rec = evaluate(trained_smallcnn, fmnist_test, n=4, options=SMOKE, progress=False)
    assert rec.protocol == "standard" and rec.threat["eps"] == 0.1 and rec.threat["steps"] == 20
    with pytest.raises(RqlabError, match=r"options \['iters'\] are unknown"):
        evaluate(trained_smallcnn, fmnist_test, PGD, n=4, protocol="standard", options={"iters": 3})
    with pytest.raises(RqlabError, match='protocol="standard"'):
        evaluate(trained_smallcnn, fmnist_test, PGD, n=4, options={"n_iter": 3})


def test_cli_standard_protocol_with_smoke_overrides():
    import argparse

    from rqlab.cli.eval import add_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["eval", "--model", "x", "--protocol", "standard", "--aa-iters", "2",
                              "--square-queries", "10"])
    assert args.protocol == "standard" and args.aa_iters == 2 and args.square_queries == 10
    bad = parser.parse_args(["eval", "--model", "x", "--attack", "pgd", "--aa-iters", "2"])
    with pytest.raises(RqlabError, match="--protocol standard"):
        bad.run(bad)


def test_cli_runs_the_standard_protocol_by_default(tmp_path, capsys):
    """`rqlab eval` without --attack headlines the standard protocol; --attack alone is the
    quick protocol's one attack; --attack X with --protocol standard is refused."""
    from rqlab import zoo
    from rqlab.cli import main

    if "fmnist-q4-natural-small" not in zoo.names(trained_only=True):
        pytest.skip("zoo model not built")
    out = tmp_path / "rec.json"
    assert main(["eval", "--model", "fmnist-q4-natural-small", "--n", "8", "--aa-iters", "2", "--aa-targets", "1",
                 "--square-queries", "10", "--no-progress", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["protocol"] == "standard" and [a["name"] for a in rec["attacks"]] == ["autoattack", "pgd"]
    assert "protocol standard" in capsys.readouterr().out
    assert main(["eval", "--model", "fmnist-q4-natural-small", "--n", "8", "--attack", "fgsm", "--no-progress",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["protocol"] == "quick"
    assert main(["eval", "--model", "fmnist-q4-natural-small", "--attack", "cw", "--protocol", "standard"]) == 2
    assert "drop --attack, or add --protocol quick" in capsys.readouterr().err


def test_every_flag_points_to_its_page():
    """Each `unreliable` reason and each sanity warning names a page in docs/flags/ that exists."""
    import re
    from pathlib import Path

    from rqlab import sanity
    from rqlab.evaluation import FLAGS, flag

    root = Path(__file__).resolve().parents[1]
    for code in FLAGS:
        page = re.search(r"see (docs/flags/[\w-]+\.md)", flag(code, "text")).group(1)
        assert (root / page).is_file() and code in (root / page).read_text()
    with pytest.raises(RqlabError, match="flag 'masking' is unknown"):
        flag("masking", "text")
    checks = re.findall(r"^    (\w+)  ", sanity.__doc__, flags=re.M)
    assert {"eps_monotone", "large_eps", "whitebox_vs_blackbox", "zero_gradient", "random_forward"} <= set(checks)
    for check in checks:
        page = root / "docs" / "flags" / f"sanity-{check.replace('_', '-')}.md"
        assert page.is_file() and f"`{check}`" in page.read_text(), page
