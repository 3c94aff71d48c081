"""Evaluation records: Wilson intervals, the record's content and consistency, random
precision scored over passes, reproducibility, and `rqlab eval`."""
import argparse
import copy
import json

import pytest
import torch

import rqlab.attacks
from rqlab import checkpoint, quant
from rqlab.attacks import ThreatModel
from rqlab.cli.eval import add_cli
from rqlab.evaluation import evaluate
from rqlab.record import Record
from rqlab.stats import wilson_interval
from rqlab.validate import RqlabError

FGSM = ThreatModel("fgsm", eps=0.05)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 100)
    assert lo == 0.0 and hi == pytest.approx(0.0370, abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(100, 100)[1] == 1.0 and wilson_interval(100, 100)[0] == pytest.approx(0.9630, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(RqlabError, match="k="):
        wilson_interval(11, 10)


def test_paired_difference_known_values():
    """Two evaluations of the same 100 examples that differ on 10 (a wins 8, b wins 2):
    mean +0.06, sd of the differences 0.2778 by hand, 95% half-width 1.96 * 0.2778 / 10."""
    from rqlab.stats import diff_half_width, paired_difference

    a = [1] * 60 + [1] * 8 + [0] * 2 + [0] * 30
    b = [1] * 60 + [0] * 8 + [1] * 2 + [0] * 30
    mean, (lo, hi) = paired_difference(a, b)
    sd = ((8 * (1 - 0.06) ** 2 + 2 * (1 + 0.06) ** 2 + 90 * 0.06 ** 2) / 99) ** 0.5
    assert mean == pytest.approx(0.06) and hi - mean == pytest.approx(1.96 * sd / 10) and mean - lo == pytest.approx(hi - mean)
    assert hi - lo < 2 * diff_half_width(0.68, 0.62, 100)  # pairing removes the shared noise
    assert paired_difference([1, 0.4], [1, 0.4])[0] == 0
    with pytest.raises(RqlabError, match="same, non-zero number"):
        paired_difference([1, 0], [1])


def test_record_is_complete_consistent_and_json(trained_smallcnn, fmnist_test):
    x, y = fmnist_test
    rec = evaluate(trained_smallcnn, (x, y), FGSM, n=60, batch_size=25, progress=False, model_id="m0")
    assert isinstance(rec, Record) and Record.from_json(rec.to_json()) == rec
    rec2 = json.loads(rec.to_json())
    assert rec2["format"] == "rqlab-record" and rec2["version"] == 1 and rec2["protocol"] == "quick"
    for key in ("model", "policy", "threat", "n", "seed", "clean_accuracy", "clean_ci95", "robust_accuracy",
                "robust_ci95", "clean_worst_accuracy", "robust_worst_accuracy", "per_example"):
        assert key in rec2, key
    for key in ("wall_time_s", "rqlab_version", "torch_version", "device"):
        assert key in rec2["extra"], key
    assert rec["model"] == "m0" and rec["n"] == 60 and rec["policy"]["kind"] == "fixed"
    assert rec["threat"]["attack"] == "fgsm" and rec["threat"]["eps"] == 0.05
    clean, robust = rec["per_example"]["clean"], rec["per_example"]["robust"]
    assert len(clean) == len(robust) == 60 and set(clean) | set(robust) <= {0, 1}
    # per example: robust = clean and the FGSM example (deterministic) classified right
    x_adv = rqlab.attacks.fgsm(trained_smallcnn, x[:60], y[:60], FGSM)
    with torch.no_grad():
        ok = (trained_smallcnn(x[:60]).argmax(1) == y[:60]).int().tolist()
        ok_adv = (trained_smallcnn(x_adv).argmax(1) == y[:60]).int().tolist()
    assert clean == ok and robust == [a * b for a, b in zip(ok, ok_adv)]
    assert rec["clean_accuracy"] == pytest.approx(sum(clean) / 60)
    assert rec["robust_accuracy"] == pytest.approx(sum(robust) / 60) == rec["robust_worst_accuracy"]
    lo, hi = rec["robust_ci95"]
    assert lo <= rec["robust_accuracy"] <= hi
    assert rec["robust_accuracy"] < rec["clean_accuracy"]


@pytest.fixture(scope="module")
def rpi_model(trained_smallcnn, fmnist_test):
    model = copy.deepcopy(trained_smallcnn)
    quant.calibrate(model, [fmnist_test[0][400:500]], bits=[3, 4, 8])
    return model


def test_a_natural_model_keeps_almost_nothing_under_pgd20(trained_smallcnn, fmnist_test):
    """A known value: a naturally trained Fashion-MNIST CNN is brittle, with robust accuracy
    below 10% under PGD-20 at eps 0.1 (the fixture's model: ~2%; the zoo's natural FP
    model: 1%) while its clean accuracy is above 80%. A broken attack or an evaluation
    that scores the clean inputs fails."""
    rec = evaluate(trained_smallcnn, fmnist_test, ThreatModel("pgd", eps=0.1, steps=20), n=100, progress=False)
    assert rec["clean_accuracy"] > 0.8 and rec["robust_accuracy"] < 0.1, rec["robust_accuracy"]


def test_random_precision_scored_over_passes_and_reproducible(rpi_model, fmnist_test):
    rpi = quant.RandomPrecision((3, 4, 8), seed=1)
    run = lambda: evaluate(rpi_model, fmnist_test, FGSM, policy=rpi, n=40, batch_size=10, passes=4,  # noqa: E731
                           progress=False)
    rec = run()
    assert rec["policy"] == {"kind": "random", "choices": [3, 4, 8], "seed": 1} and rec["passes"] == 4
    for kind in ("clean", "robust"):
        hits = rec["per_example"][f"{kind}_hits"]
        assert rec[f"{kind}_accuracy"] == pytest.approx(sum(hits) / (4 * 40))
        assert rec["per_example"][kind] == [int(h == 4) for h in hits]
        assert rec[f"{kind}_worst_accuracy"] == pytest.approx(sum(rec["per_example"][kind]) / 40)
    assert quant.current(rpi_model) == quant.Fixed(32)  # the model's own policy is back
    again = run()
    assert again.with_extra(wall_time_s=0) == rec.with_extra(wall_time_s=0)  # reproducible, all but the time


def test_evaluate_takes_a_dataset_and_rejects_bad_arguments(trained_smallcnn, fmnist_test):
    from rqlab import data

    ds = data.load("fashion-mnist", "test", n=20, seed=3)
    rec = evaluate(trained_smallcnn, ds, FGSM, progress=False)
    assert rec["n"] == 20
    with pytest.raises(RqlabError, match="passes="):
        evaluate(trained_smallcnn, ds, FGSM, passes=0)
    with pytest.raises(RqlabError, match="n=50 is more than"):
        evaluate(trained_smallcnn, ds, FGSM, n=50)
    with pytest.raises(RqlabError, match="data must be"):
        evaluate(trained_smallcnn, "fmnist", FGSM)
    with pytest.raises(RqlabError, match="threat must be"):
        evaluate(trained_smallcnn, ds, "pgd")


def test_cli_writes_the_record(trained_smallcnn, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint.pt"
    checkpoint.save(ckpt, {"model": trained_smallcnn.config.to_dict(), "state_dict": trained_smallcnn.state_dict(),
                           "policy": quant.Fixed(32).to_dict()})
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    out = tmp_path / "out" / "rec.json"
    args = parser.parse_args(["eval", "--model", str(ckpt), "--attack", "fgsm", "--eps", "0.05", "--n", "30",
                              "--json", str(out), "--no-progress", "--device", "cpu"])
    assert args.run(args) == 0
    rec = Record.from_json(out.read_text())
    assert rec["n"] == 30 and rec["threat"]["attack"] == "fgsm" and len(rec["checkpoint_sha256"]) == 64
    assert "robust" in capsys.readouterr().out
    args = parser.parse_args(["eval", "--model", str(ckpt), "--attack", "eot-pgd", "--steps", "2", "--eot", "2",
                              "--random-bits", "4,8", "--calibrate", "64", "--passes", "2", "--n", "20",
                              "--json", str(out), "--no-progress", "--device", "cpu"])
    assert args.run(args) == 0
    rec = Record.from_json(out.read_text())
    assert rec["policy"]["kind"] == "random" and rec["calibration"]["bits"] == [4, 8] and rec["passes"] == 2
    assert rec["threat"]["attack"] == "eot_pgd" and rec["threat"]["eot"] == 2
    bad = parser.parse_args(["eval", "--model", str(ckpt), "--bits", "4", "--random-bits", "4-8"])
    with pytest.raises(RqlabError, match="not both"):
        bad.run(bad)
    bad = parser.parse_args(["eval", "--model", str(ckpt), "--attack", "deepfool"])
    with pytest.raises(RqlabError, match="attack='deepfool' is unknown"):
        bad.run(bad)


def test_rqlab_eval_is_registered_and_errors_are_clear(tmp_path, capsys):
    from rqlab.cli import main

    assert main(["eval", "--model", str(tmp_path / "missing.pt"), "--n", "10"]) == 2
    assert "not an existing checkpoint file" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing.pt"), "--attack", "l3-magic"]) == 2
    assert "attack='l3-magic' is unknown" in capsys.readouterr().err
