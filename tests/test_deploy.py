"""rqlab.deploy: the FP export matches torch, the int8 engine stays close to its
fake-quant twin, attacks reach the engine (transfer from the twin, Square within its
budget), and bad input fails clearly (a layer that does not export, a missing extra)."""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnxruntime")

from rqlab import cli, deploy, models, quant  # noqa: E402
from rqlab.attacks import ThreatModel  # noqa: E402
from rqlab.record import Record  # noqa: E402
from rqlab.validate import RqlabError  # noqa: E402

from conftest import FMNIST_NORM  # noqa: E402

# The engine's clean accuracy may differ from the fake-quant twin's by this much on 500
# test images (measured: see test_int8_engine_is_close_to_its_fake_quant_twin).
CLEAN_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def calibrated(trained_smallcnn, fmnist_train):
    """The naturally trained SmallCNN (a copy) with 8-bit activation ranges from 512 training
    images, and its int8 engine calibrated on the same images."""
    torch.set_num_threads(1)
    model = copy.deepcopy(trained_smallcnn)
    x = fmnist_train[0][:512]
    quant.calibrate(model, [x[:256], x[256:]], bits=[8])
    engine = deploy.int8_engine(model, x, deploy.Int8Config(calib_n=512), threads=1)
    return model, engine


def test_fp_export_matches_torch_logits(trained_smallcnn, fmnist_test):
    x = fmnist_test[0][:200]
    fp = deploy.fp_engine(trained_smallcnn, threads=1)
    with torch.no_grad(), quant.using(trained_smallcnn, quant.Fixed(32)):
        want = trained_smallcnn(x)
    got = fp(x)
    assert got.shape == want.shape == (200, 10)
    assert (got - want).abs().max().item() < 1e-4
    assert fp.num_classes == 10 and fp.queries == 200  # the probe at construction is not counted


def test_int8_engine_is_close_to_its_fake_quant_twin(calibrated, fmnist_test):
    model, engine = calibrated
    x, y = fmnist_test
    with torch.no_grad(), quant.using(model, quant.Fixed(8)):
        twin = model(x)
    with torch.no_grad():
        eng = engine(x)
    acc_twin = (twin.argmax(1) == y).float().mean().item()
    acc_engine = (eng.argmax(1) == y).float().mean().item()
    assert acc_twin > 0.8  # a trained model, not chance
    assert abs(acc_engine - acc_twin) <= CLEAN_TOLERANCE
    a = deploy.agreement(eng, twin)
    assert 0 <= a["flip_rate"] <= 0.05 and a["max_logit_diff"] >= a["mean_logit_diff"] > 0  # integer != float
    s = engine.describe()
    assert s["format"] == "QDQ" and s["weights"] == "int8" and s["activations"] == "uint8"
    assert s["nodes_kept_fp"] == ["/conv1/Conv", "/fc2/Gemm"]  # the layers the twin keeps FP


def test_transfer_from_the_twin_breaks_the_engine_of_a_natural_model(calibrated, fmnist_test):
    model, engine = calibrated
    x, y = fmnist_test
    rec = deploy.evaluate_engine(model, engine, (x[:64], y[:64]), ThreatModel("pgd", eps=0.1, steps=20),
                                 square_queries=20, progress=False, model_id="natural")
    by = {a["name"]: a for a in rec.attacks}
    assert list(by) == ["transfer_fake_quant", "transfer_fp", "square"]
    assert rec.protocol == "engine" and rec.clean_accuracy > 0.7
    assert by["transfer_fake_quant"]["robust_accuracy"] <= 0.1  # natural model: near zero
    assert rec.robust_accuracy <= min(a["robust_accuracy"] for a in rec.attacks)  # worst case per example
    assert rec["bound"].startswith("upper") and "no gradient" in rec["bound"]
    assert rec["fake_quant"]["robust_accuracy"] <= 0.1 and rec["agreement"]["fp"]["n"] == 64
    assert Record.from_json(rec.to_json()) == rec
    assert "upper bound" in deploy.format_engine_record(rec)


def test_square_on_the_engine_stays_within_its_query_budget(calibrated, fmnist_test):
    from rqlab import attacks

    _, engine = calibrated
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    budget = 30
    before = engine.queries
    x_adv = attacks.square(engine, x, y, ThreatModel("square", eps=0.1, options={"n_queries": budget}))
    used = engine.queries - before
    assert (x_adv - x).abs().max().item() <= 0.1 + 1e-6
    assert 16 <= used <= 16 * (budget + 2)  # per example: the budget, plus AutoAttack's initial checks


def test_engine_has_no_gradient(calibrated, fmnist_test):
    _, engine = calibrated
    x = fmnist_test[0][:2].clone().requires_grad_(True)
    with pytest.raises(RqlabError, match="no gradient.*transfer attack"):
        engine(x)


class Odd(nn.Module):
    def forward(self, x):
        return torch.special.i0(x)  # no ONNX translation at opset 17


def test_a_layer_that_does_not_export_is_named():
    torch.manual_seed(0)
    model = models.create("smallcnn", **FMNIST_NORM)
    model.bn2 = nn.Sequential(model.bn2, Odd())
    with pytest.raises(RqlabError, match=r"cannot export layer 'bn2.1' \(Odd\) to ONNX.*aten::i0"):
        deploy.to_onnx(model)


def test_missing_onnxruntime_names_the_extra(monkeypatch, capsys):
    torch.manual_seed(0)
    model = models.create("smallcnn", **FMNIST_NORM)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    with pytest.raises(ImportError, match=r"pip install 'rqlab\[deploy\]'"):
        deploy.fp_engine(model)
    assert cli.main(["deploy", "--model", "fmnist-fp-pgd7-small", "--n", "8"]) == 2
    assert "rqlab[deploy]" in capsys.readouterr().err


@pytest.mark.parametrize("bad,message", [({"activations": "int4"}, "activations='int4'"),
                                         ({"calibration": "mse"}, "calibration='mse'"),
                                         ({"calib_n": 0}, "calib_n=0"), ({"per_channel": "yes"}, "per_channel='yes'")])
def test_int8_config_checks_its_fields(bad, message):
    with pytest.raises(RqlabError, match=message):
        deploy.Int8Config(**bad)


def test_quantize_edges_quantizes_every_layer(calibrated, fmnist_train):
    model, _ = calibrated
    engine = deploy.int8_engine(model, fmnist_train[0][:128], deploy.Int8Config(quantize_edges=True, calib_n=128),
                                threads=1)
    assert engine.describe()["nodes_kept_fp"] == []
    json.dumps(engine.describe())
