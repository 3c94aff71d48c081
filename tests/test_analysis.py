"""Analyses: operator norms against an explicit SVD, the transfer matrix's cost and
shape, error amplification's shape and its zero point."""
import json

import pytest
import torch
import torch.nn as nn

import rqlab.attacks
from rqlab import models, quant
from rqlab.analysis import (error_amplification, local_lipschitz, network_bound, reshaped_bound, spectral_norm,
                            transfer_matrix)
from rqlab.attacks import ThreatModel
from rqlab.validate import RqlabError

FMNIST = dict(input_shape=(1, 28, 28), mean=(0.286,), std=(0.353,))


def explicit_matrix(layer: nn.Module, shape) -> torch.Tensor:
    """The layer's linear map (no bias) as a dense matrix: apply it to every basis vector."""
    n = int(torch.tensor(shape).prod())
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    w = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        out = basis @ w.T
    else:
        out = nn.functional.conv2d(basis, w, stride=layer.stride, padding=layer.padding,
                                   dilation=layer.dilation, groups=layer.groups)
    return out.reshape(n, -1).T  # (out_numel, in_numel)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("hw", [(6, 6), (7, 5)])
def test_conv_spectral_norm_matches_svd_of_the_operator(stride, padding, hw):
    torch.manual_seed(stride * 10 + padding)
    layer = nn.Conv2d(2, 3, 3, stride=stride, padding=padding)
    shape = (2,) + hw
    exact = torch.linalg.matrix_norm(explicit_matrix(layer, shape), ord=2).item()
    est = spectral_norm(layer, shape, iters=2000, tol=1e-13)
    assert est == pytest.approx(exact, rel=1e-3)
    assert est <= exact * (1 + 1e-9)  # power iteration approaches from below


def test_linear_and_quantized_spectral_norms():
    torch.manual_seed(0)
    lin = quant.QuantLinear(7, 5)
    assert spectral_norm(lin) == pytest.approx(torch.linalg.matrix_norm(lin.weight.double(), ord=2).item(), rel=1e-6)
    lin.set_bits(2)
    q = torch.linalg.matrix_norm(lin.quantized_weight().detach().double(), ord=2).item()
    assert spectral_norm(lin, quantized=True) == pytest.approx(q, rel=1e-6)
    assert reshaped_bound(lin, quantized=True) == pytest.approx(q, rel=1e-9)
    assert q != pytest.approx(spectral_norm(lin), rel=1e-3)  # 2-bit weights are a different operator


def test_reshaped_bound_is_not_the_operator_norm():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)  # all-ones 3x3: operator norm ~9 on a large input, reshaped norm 3
    assert reshaped_bound(conv) == pytest.approx(3.0)
    assert spectral_norm(conv, (1, 16, 16)) > 8.0


def test_spectral_norm_rejects_bad_input():
    with pytest.raises(RqlabError, match="input_shape"):
        spectral_norm(nn.Conv2d(1, 1, 3))
    with pytest.raises(RqlabError, match="padding_mode"):
        spectral_norm(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), (1, 5, 5))


def test_network_bound_and_local_lipschitz():
    torch.manual_seed(0)
    m = models.create("smallcnn", **FMNIST).eval()
    nb = network_bound(m, iters=50)
    names = [r["name"] for r in nb["layers"]]
    assert names[0] == "normalize" and {"conv1", "conv2", "conv3", "fc1", "fc2", "bn1"} <= set(names)
    x = torch.rand(4, 1, 28, 28)
    d = torch.randn_like(x) * 1e-3
    x2 = (x + d).clamp(0, 1)
    ratio = local_lipschitz(m, x, x2)
    assert ratio.shape == (4,) and (ratio > 0).all() and (ratio <= nb["bound"]).all()
    assert (local_lipschitz(m, x, x) == 0).all()
    json.dumps(nb)


@pytest.fixture(scope="module")
def calibrated_cnn():
    torch.manual_seed(0)
    m = models.create("smallcnn", **FMNIST).eval()
    quant.calibrate(m, [torch.rand(32, 1, 28, 28)], bits=[2, 4, 8])
    return m


def test_transfer_matrix_crafts_once_per_attack_precision(calibrated_cnn, monkeypatch):
    calls = []
    real_get = rqlab.attacks.get

    def counting_get(name):
        attack = real_get(name)

        def counted(model, x, y, threat):
            calls.append((rqlab.attacks.canonical(name), threat.policy))
            return attack(model, x, y, threat)
        return counted

    monkeypatch.setattr(rqlab.attacks, "get", counting_get)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    threat = ThreatModel("pgd", eps=0.05, steps=2)
    tm = transfer_matrix(calibrated_cnn, x, y, attack_bits=[2, 4, 32], infer_bits=[2, 4, 8, 32], threat=threat)
    assert len(calls) == 3
    assert [str(p) for _, p in calls] == ["2", "4", "fp"]
    assert tm["row_labels"] == ["2", "4", "fp"] and tm["col_labels"] == ["2", "4", "8", "fp"]
    assert len(tm["matrix"]) == 3 and all(len(r) == 4 for r in tm["matrix"])
    json.dumps(tm)

    calls.clear()
    rpi = quant.RandomPrecision((2, 4, 8), seed=0)
    tm = transfer_matrix(calibrated_cnn, x, y, [2, 4], [2, 4], threat, eot_policy=rpi, passes=3)
    assert len(calls) == 3 and calls[-1][0] == "eot_pgd"
    assert tm["row_labels"] == ["2", "4", "eot"] and tm["col_labels"] == ["2", "4", "rpi"]
    assert len(tm["matrix"]) == 3 and all(len(r) == 3 for r in tm["matrix"])
    assert quant.current(calibrated_cnn) == quant.Fixed(32)  # state restored


def test_error_amplification_one_value_per_layer_and_zero_without_perturbation(calibrated_cnn):
    torch.manual_seed(0)
    fp = models.create("smallcnn", **FMNIST).eval()
    fp.load_state_dict(calibrated_cnn.state_dict())
    x = torch.rand(5, 1, 28, 28)
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    with quant.using(calibrated_cnn, quant.Fixed(4)):
        same = error_amplification({"fp": fp, "4-bit": calibrated_cnn}, x, x)
        amp = error_amplification({"fp": fp, "4-bit": calibrated_cnn}, x, x_adv)
    layers = ["conv1", "conv2", "conv3", "fc1", "fc2", "logits"]
    for name in ("fp", "4-bit"):
        assert same[name]["layers"] == layers and amp[name]["layers"] == layers
        assert same[name]["amplification"] == [0.0] * len(layers)
        assert all(v > 0 for v in amp[name]["amplification"])
    assert amp["fp"]["amplification"] != amp["4-bit"]["amplification"]
    sub = error_amplification({"fp": fp}, x, x_adv, layers=["conv2"])
    assert sub["fp"]["layers"] == ["conv2", "logits"]
    with pytest.raises(RqlabError, match="not conv/linear"):
        error_amplification({"fp": fp}, x, x_adv, layers=["bn1"])
    json.dumps(amp)


def test_transfer_matrix_diagonal_equals_evaluate_at_that_precision(trained_smallcnn, fmnist_test):
    """Crafting at a and scoring at a is a white-box evaluation at Fixed(a): each diagonal
    cell (and each clean entry) equals `evaluate` at Fixed(a) on the same 64 examples, the
    attack seeds lined up (evaluate's one batch uses threat.seed + 0, transfer_matrix the
    threat's seed). PGD-5 at eps 0.05 leaves a robust accuracy between 0 and clean, so the
    equality is not the trivial 0 == 0."""
    import copy

    from rqlab.evaluation import evaluate

    x, y = fmnist_test
    model = copy.deepcopy(trained_smallcnn)
    quant.calibrate(model, [x[200:456]], bits=[4, 8])
    x, y = x[:64], y[:64]
    bits = [4, 8]
    threat = ThreatModel("pgd", eps=0.05, steps=5, step_size=0.0125, seed=3)
    tm = transfer_matrix(model, x, y, bits, bits, threat)
    for i, a in enumerate(bits):
        rec = evaluate(model, (x, y), threat, policy=quant.Fixed(a), batch_size=len(x), progress=False)
        # the same count of 64 (transfer_matrix averages in float32: 1e-6 is far below 1/64)
        assert tm["matrix"][i][i] == pytest.approx(rec["robust_accuracy"], abs=1e-6), a
        assert tm["clean_accuracy"][i] == pytest.approx(rec["clean_accuracy"], abs=1e-6), a
        assert 0.05 < rec["robust_accuracy"] < rec["clean_accuracy"] - 0.1, rec["robust_accuracy"]
