"""Lipschitz-guided bit selection (METHODS section 4): sensitivities checked against
explicit operators and hand-computed grids, allocations against brute force and the
budget, the CLI's JSON against the model's own weight counts."""
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rqlab import bitselect as BS
from rqlab import checkpoint, cli, models, quant
from rqlab.attacks import ThreatModel
from rqlab.evaluation import evaluate
from rqlab.validate import RqlabError

from conftest import FMNIST_NORM, load_fmnist

BITS = (2, 3, 4, 5, 6, 8)
RECIPE = "smallcnn-fmnist-4k-100steps-sgd0.05-bs64-seed0-bitselect"  # change to retrain the cached model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This module runs many tiny float64 convs (power iterations), where intra-op threads
    only add overhead, and on a shared CPU oversubscription made it 4x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fmnist_small():
    return load_fmnist("train", 4000)


@pytest.fixture(scope="module")
def brief_cnn(request, fmnist_small):
    """SmallCNN trained 100 SGD steps (batch 64) on 4000 Fashion-MNIST images (cached on
    disk), calibrated at every option of BITS on 128 images. Treat as read-only."""
    torch.manual_seed(0)
    model = models.create("smallcnn", **FMNIST_NORM)
    x, y = fmnist_small
    cache = Path(request.config.cache.mkdir("rqlab-models")) / f"{RECIPE}.pt"
    try:
        model.load_state_dict(torch.load(cache, weights_only=True))
    except (FileNotFoundError, RuntimeError, EOFError):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(100):
            j = torch.randint(0, len(x), (64,), generator=g)
            loss = F.cross_entropy(model(x[j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), cache)
    model.eval()
    quant.calibrate(model, [x[:128]], bits=BITS)
    return model


@pytest.fixture(scope="module")
def brief_sens(brief_cnn):
    return BS.sensitivities(brief_cnn, BITS, iters=100)


def brute_force(sens, cost, budget):
    """(objective, cost) of the best allocation over all combinations."""
    layers = list(sens)
    best = None
    for combo in itertools.product(*(sorted(sens[l]) for l in layers)):
        c = sum(cost[l][b] for l, b in zip(layers, combo))
        o = sum(sens[l][b] for l, b in zip(layers, combo))
        if c <= budget + 1e-9 and (best is None or o < best[0] - 1e-12):
            best = (o, c)
    return best


def hand_quantize(w, bits):
    """Per-output-channel asymmetric grid, written out (METHODS section 1). x / scale is
    taken as x * (1 / scale), as torch's fake-quant kernels (and rqlab) compute it: the two
    can round differently for a value on a half step, which then lands one step apart."""
    flat = w.reshape(w.shape[0], -1)
    lo = flat.min(1).values.clamp(max=0)
    hi = flat.max(1).values.clamp(min=0)
    qmax = 2 ** bits - 1
    scale = (hi - lo) / qmax
    zp = torch.round(-lo / scale)
    q = (torch.clamp(torch.round(flat * (1 / scale)[:, None]) + zp[:, None], 0, qmax) - zp[:, None]) * scale[:, None]
    return q.reshape(w.shape)


def explicit_conv_norm(weight, input_shape, **kw):
    """Largest singular value of the conv's matrix, built column by column, by SVD."""
    n = int(torch.tensor(input_shape).prod())
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    cols = F.conv2d(basis, weight.double(), **kw).reshape(n, -1)  # (n_in, n_out): the transpose
    return torch.linalg.matrix_norm(cols, ord=2).item()


class Tiny(nn.Module):
    """conv (2 -> 3, 3x3, stride 2, pad 1) on 5x5 -> ReLU -> linear (27 -> 4); both quantizable."""

    input_shape = (2, 5, 5)

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = quant.QuantConv2d(2, 3, 3, stride=2, padding=1, bias=False)
        self.fc = quant.QuantLinear(27, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


# --------------------------------------------------------------- sensitivities


def test_sensitivity_pieces_match_explicit_operators_on_a_hand_case():
    model = Tiny().eval()
    ranges = {"conv": (0.0, 1.0), "fc": (-0.25, 2.0)}
    for name, layer in quant.quant_layers(model):
        for b in BITS:  # ranges set by hand instead of calibrated
            layer.act.ranges[b - 1] = torch.tensor(ranges[name])
            layer.act.seen[b - 1] = 1
    s = BS.sensitivities(model, BITS, iters=300, tol=1e-12)
    fc_norm = torch.linalg.matrix_norm(model.fc.weight.double(), ord=2).item()
    assert s.details["conv"]["downstream"] == pytest.approx(fc_norm, rel=1e-6)
    assert s.details["fc"]["downstream"] == 1.0  # nothing after the logits layer
    assert s.details["conv"]["input_shape"] == [2, 5, 5]
    for b in BITS:
        dw = hand_quantize(model.conv.weight.detach(), b) - model.conv.weight.detach()
        e_w = explicit_conv_norm(dw, (2, 5, 5), stride=2, padding=1)
        assert s.details["conv"]["e_w"][b] == pytest.approx(e_w, rel=1e-5)
        assert s.details["conv"]["e_a"][b] == pytest.approx(1.0 / (2 ** b - 1))
        assert s.table["conv"][b] == pytest.approx((e_w + 1.0 / (2 ** b - 1)) * fc_norm, rel=1e-5)
        dw = hand_quantize(model.fc.weight.detach(), b) - model.fc.weight.detach()
        e_w = torch.linalg.matrix_norm(dw.double(), ord=2).item()
        assert s.details["fc"]["e_w"][b] == pytest.approx(e_w, rel=1e-5)
        assert s.table["fc"][b] == pytest.approx(e_w + 2.25 / (2 ** b - 1), rel=1e-5)
    # the conv's operator norm is not its reshaped-matrix norm (it can be larger)
    dw = hand_quantize(model.conv.weight.detach(), 2) - model.conv.weight.detach()
    assert s.details["conv"]["e_w"][2] != pytest.approx(torch.linalg.matrix_norm(dw.reshape(3, -1), 2).item(),
                                                        rel=1e-3)


def test_sensitivities_positive_and_non_increasing_in_bits(brief_cnn, brief_sens):
    assert brief_sens.layers == ["conv2", "conv3", "fc1"]  # conv1 and fc2 stay FP
    for name, row in brief_sens.table.items():
        values = [row[b] for b in BITS]
        assert all(v > 0 for v in values)
        assert all(hi >= lo * (1 - 1e-6) for hi, lo in zip(values, values[1:])), (name, values)
        # one bit more roughly halves both error terms (grid steps go as 1 / (2^b - 1))
        d = brief_sens.details[name]
        assert 1.5 < d["e_w"][4] / d["e_w"][5] < 3.0 and 1.5 < d["e_a"][4] / d["e_a"][5] < 3.0


def test_downstream_products_match_an_independent_computation(brief_cnn, brief_sens):
    m = brief_cnn
    svd = lambda w: torch.linalg.matrix_norm(w.detach().double(), ord=2).item()  # noqa: E731
    bn3 = (m.bn3.weight.abs() / torch.sqrt(m.bn3.running_var + m.bn3.eps)).max().item()
    d = brief_sens.details
    assert d["fc1"]["downstream"] == pytest.approx(svd(m.fc2.weight), rel=1e-6)
    assert d["conv3"]["downstream"] == pytest.approx(bn3 * svd(m.fc1.weight) * svd(m.fc2.weight), rel=1e-6)
    assert d["conv2"]["downstream_layers"] == ["bn2", "conv3", "bn3", "fc1", "fc2"]
    # e_w of a linear layer is the matrix norm of its quantization error
    for b in BITS:
        w = m.fc1.weight.detach()
        assert d["fc1"]["e_w"][b] == pytest.approx(svd(hand_quantize(w, b) - w), rel=1e-5)
    json.dumps(brief_sens.to_dict())


def test_missing_ranges_raise_unless_batches_are_given(fmnist_small):
    model = models.create("smallcnn", **FMNIST_NORM).eval()
    with pytest.raises(RqlabError, match="calibrate"):
        BS.sensitivities(model, (2, 4))
    s = BS.sensitivities(model, (2, 4), batches=[fmnist_small[0][:64]], iters=50)
    assert set(s.table) == {"conv2", "conv3", "fc1"}
    assert quant.current(model) == quant.Fixed(32)  # policy untouched


def test_bad_options_and_models_are_refused(brief_cnn, brief_sens):
    for bad, field in (((0, 4), "bits_options=0"), ((4, 33), "bits_options=33"), ((1, 4), "bits_options"),
                       ((), "bits_options")):
        with pytest.raises(RqlabError, match=field):
            BS.sensitivities(brief_cnn, bad)
    with pytest.raises(RqlabError, match="method='best'"):
        BS.select_bits(brief_cnn, 4.0, BITS, method="best", sensitivity=brief_sens)
    with pytest.raises(RqlabError, match="kind='flops'"):
        BS.select_bits(brief_cnn, 4.0, BITS, kind="flops", sensitivity=brief_sens)
    for budget in (1.5, -1.0):
        with pytest.raises(RqlabError, match="budget"):
            BS.select_bits(brief_cnn, budget, BITS, sensitivity=brief_sens)
    with pytest.raises(RqlabError, match="budget"):
        BS.select_bits(brief_cnn, BS.uniform_cost(brief_cnn, 2, "bitops") - 1, BITS, "bitops", sensitivity=brief_sens)
    sbn = models.create("smallcnn", sbn_bits=(4, 8), **FMNIST_NORM)
    with pytest.raises(RqlabError, match="switchable"):
        BS.sensitivities(sbn, (4, 8))


# ------------------------------------------------------------------ allocation


@pytest.mark.parametrize("kind", BS.KINDS)
def test_allocations_meet_the_budget_on_a_real_model(brief_cnn, brief_sens, kind):
    m = brief_cnn
    weights = {n: l.weight.numel() for n, l in quant.quant_layers(m)}
    fp_bitops = quant.bitops(m, quant.Fixed(32)) - sum(BS.cost_table(m, (32,), "bitops")[n][32] for n in weights)
    for level in (2.5, 3.0, 4.0, 5.5):
        budget = level if kind == "avg_bits" else BS.uniform_cost(m, 4, "bitops") * level / 4
        for method in BS.DEFAULT_METHODS:  # hessian, margin: their own tables (test_sensitivity_baselines.py)
            a = BS.select_bits(m, budget, BITS, kind, method, seed=3, sensitivity=brief_sens)
            assert set(a.bits) == set(weights)
            if kind == "avg_bits":  # recomputed from the weight counts
                spent = sum(weights[n] * b for n, b in a.bits.items()) / sum(weights.values())
            else:  # recomputed from quant.bitops of the whole model minus the FP layers
                spent = quant.bitops(m, quant.PerLayer(a.bits)) - fp_bitops
            assert spent == pytest.approx(a.cost, rel=1e-9)
            assert spent <= budget * (1 + 1e-9)
        best = BS.select_bits(m, budget, BITS, kind, "lipschitz", sensitivity=brief_sens)
        assert best.objective == pytest.approx(
            brute_force(brief_sens.table, BS.cost_table(m, BITS, kind), budget)[0], rel=1e-12)


@pytest.fixture(scope="module")
def five_layers(fmnist_small):
    """Untrained SmallCNN with first and last layers quantized too (5 layers), and its
    sensitivities (few power iterations: only the allocator is tested with them)."""
    torch.manual_seed(0)
    m = models.create("smallcnn", quantize_first_last=True, **FMNIST_NORM).eval()
    return m, BS.sensitivities(m, BITS, batches=[fmnist_small[0][:64]], iters=10)


@pytest.mark.parametrize("kind", BS.KINDS)
def test_exact_on_a_model_with_five_quantized_layers(five_layers, kind):
    """6^5 combinations, checked by brute force."""
    m, s = five_layers
    assert len(s.table) == 5
    cost = BS.cost_table(m, BITS, kind)
    full = BS.uniform_cost(m, 8, kind)
    for frac in (0.3, 0.45, 0.6, 0.8):
        budget = full * frac
        a = BS.select_bits(m, budget, BITS, kind, sensitivity=s)
        o, _ = brute_force(s.table, cost, budget)
        assert a.cost <= budget * (1 + 1e-12)
        assert a.objective == pytest.approx(o, rel=1e-12)


def test_lipschitz_beats_uniform_on_its_objective_at_avg_4(brief_cnn, brief_sens):
    lip = BS.select_bits(brief_cnn, 4.0, BITS, sensitivity=brief_sens)
    uni = BS.select_bits(brief_cnn, 4.0, BITS, method="uniform", sensitivity=brief_sens)
    assert set(uni.bits.values()) == {4} and uni.cost == pytest.approx(4.0)
    assert lip.objective <= uni.objective
    assert BS.average_bits(brief_cnn, lip.bits) <= 4.0 + 1e-9


# ------------------------------------------------------------------ evaluation


def test_compare_allocations_rows(brief_cnn, brief_sens):
    x, y = load_fmnist("test", 48)
    threat = ThreatModel("pgd", eps=0.1, steps=3)
    rows = BS.compare_allocations(brief_cnn, (x, y), threat, [4.0], BITS, n=48, random_seeds=2,
                                  sensitivity=brief_sens)
    json.dumps(rows)
    assert [(r["method"], r["seed"]) for r in rows] == [("lipschitz", None), ("uniform", None), ("random", 0),
                                                         ("random", 1), ("reverse", None)]
    for r in rows:
        assert r["cost"] <= 4.0 + 1e-9
        assert r["objective"] >= rows[0]["objective"] - 1e-12
    # uniform 4 on every quantizable layer is the same model as Fixed(4)
    ref = evaluate(brief_cnn, (x, y), threat, policy=quant.Fixed(4), progress=False)
    assert rows[1]["clean_accuracy"] == ref["clean_accuracy"]
    assert rows[1]["robust_accuracy"] == ref["robust_accuracy"]
    assert rows[1]["bitops"] == pytest.approx(quant.bitops(brief_cnn, quant.Fixed(4)))


# ------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def ckpt(brief_cnn, tmp_path_factory):
    path = tmp_path_factory.mktemp("bitselect") / "checkpoint.pt"
    checkpoint.save(path, {"model": brief_cnn.config.to_dict(), "state_dict": brief_cnn.state_dict()})
    return path


def test_cli_writes_bits_that_meet_the_budget(ckpt, brief_cnn, tmp_path, capsys):
    out = tmp_path / "bits.json"
    rc = cli.main(["bitselect", "--model", str(ckpt), "--budget", "3.5", "--calibrate", "128",
                   "--device", "cpu", "--iters", "20", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "conv2" in text and "total BitOPs" in text
    res = json.loads(out.read_text())
    weights = {n: l.weight.numel() for n, l in quant.quant_layers(brief_cnn)}
    assert set(res["bits"]) == set(weights)
    avg = sum(weights[n] * b for n, b in res["bits"].items()) / sum(weights.values())
    assert avg <= 3.5 + 1e-9 and avg == pytest.approx(res["avg_bits"])
    assert res["bitops_total"] == pytest.approx(quant.bitops(brief_cnn, quant.PerLayer(res["bits"])))
    assert set(res["sensitivity"]["table"]["conv2"]) == {str(b) for b in BITS}
    policy = quant.policy_from_dict(res["policy"])
    assert policy.bits == res["bits"]


def test_cli_bitops_budget_and_evaluate(ckpt, brief_cnn, tmp_path, capsys):
    out = tmp_path / "bits.json"
    rc = cli.main(["bitselect", "--model", str(ckpt), "--budget", "uniform:4", "--kind", "bitops",
                   "--bits", "2,4,8", "--calibrate", "128", "--device", "cpu", "--iters", "20", "--evaluate",
                   "--n", "16", "--steps", "2", "--random-seeds", "1", "--no-progress", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["budget"] == pytest.approx(BS.uniform_cost(brief_cnn, 4, "bitops"))
    assert res["bitops_quantized"] <= res["budget"] * (1 + 1e-12)
    assert [r["method"] for r in res["comparison"]] == ["lipschitz", "uniform", "random", "reverse"]


@pytest.mark.parametrize("args, field", [
    (["--budget", "1.0"], "budget=1"),
    (["--budget", "four"], "budget='four'"),
    (["--budget", "4", "--method", "best"], "method='best'"),
    (["--budget", "4", "--bits", "0,4"], "bits=0"),
    (["--budget", "4", "--bits", "4,33"], "bits=33"),
    (["--budget", "4", "--bits", "4,x"], "bits='4,x'"),
    (["--budget", "4", "--kind", "flops"], "kind='flops'"),
])
def test_cli_bad_input_names_the_field(ckpt, capsys, args, field):
    assert cli.main(["bitselect", "--model", str(ckpt), "--calibrate", "0", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rqlab: error:") and field in err
