"""The two bit-selection baselines of issue 14: the Hessian-trace sensitivity (HAWQ-v2,
Hutchinson's estimator) checked against an exact Hessian and the estimator's own
variance formula; the margin sensitivity checked on a layer whose quantization is exact
and on a trained SmallCNN; both tables through the same knapsack, within the budget."""
import copy
import itertools
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rqlab import bitselect as BS
from rqlab import quant
from rqlab.attacks import ThreatModel
from rqlab.bitselect.hessian import hessian_traces
from rqlab.bitselect.margin import logit_margin, margin_drops
from rqlab.studies import bit_selection
from rqlab.validate import RqlabError

from conftest import load_fmnist

BITS = (2, 3, 4, 8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny passes: intra-op threads only add overhead


class TwoLayer(nn.Module):
    """(B, 1, 2, 3) -> flatten -> fc1 (6 -> 5) -> tanh -> fc2 (5 -> 3), float64, both quantizable."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = quant.QuantLinear(6, 5).double()
        self.fc2 = quant.QuantLinear(5, 3).double()

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def exact_blocks(model, x, y):
    """The Hessian of the mean cross-entropy w.r.t. (fc1.weight, fc2.weight), as a
    (n, n) matrix with its block offsets, by torch.autograd.functional.hessian."""
    b1, b2 = model.fc1.bias.detach(), model.fc2.bias.detach()

    def loss(w1, w2):
        return F.cross_entropy(F.linear(torch.tanh(F.linear(x.flatten(1), w1, b1)), w2, b2), y)

    w = (model.fc1.weight.detach(), model.fc2.weight.detach())
    h = torch.autograd.functional.hessian(loss, w)
    sizes = [t.numel() for t in w]
    full = torch.cat([torch.cat([h[i][j].reshape(sizes[i], sizes[j]) for j in range(2)], 1) for i in range(2)], 0)
    return full, [0, sizes[0], sizes[0] + sizes[1]]


def test_hutchinson_trace_matches_the_exact_hessian_within_its_standard_error():
    model = TwoLayer().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 2, 3, generator=g).double()
    y = torch.randint(0, 3, (40,), generator=g)
    H, cut = exact_blocks(model, x, y)
    assert torch.allclose(H, H.T, atol=1e-12)
    probes = 400
    sens = BS.hessian_sensitivities(model, (x, y), BITS, n_probes=probes, batch_size=16, seed=1)
    for j, name in enumerate(["fc1", "fc2"]):
        block = H[cut[j]:cut[j + 1], cut[j]:cut[j + 1]]
        rest = torch.cat([H[cut[j]:cut[j + 1], :cut[j]], H[cut[j]:cut[j + 1], cut[j + 1]:]], 1)
        # Var of one probe: Rademacher v^T A v has 2 (||A||_F^2 - sum A_ii^2); the cross
        # term v_l^T H_l,rest v_rest (independent probes) adds ||H_l,rest||_F^2
        var = 2 * (block.pow(2).sum() - block.diagonal().pow(2).sum()) + rest.pow(2).sum()
        se = math.sqrt(var / probes)
        d = sens.details[name]
        assert abs(d["trace"] - block.trace().item()) <= 4 * se, (name, d["trace"], block.trace().item(), se)
        assert 0.75 * se <= d["trace_se"] <= 1.25 * se  # the reported SE estimates the true one
        assert d["trace_per_weight"] == pytest.approx(d["trace"] / block.shape[0])
        layer = getattr(model, name)
        for b in BITS:
            w = layer.weight.detach()
            err = (quant.functional.quantize_weight(w, b, "per_channel") - w).pow(2).sum().item()
            assert d["err_sq"][b] == pytest.approx(err, rel=1e-9)
            assert sens.table[name][b] == pytest.approx(max(d["trace"], 0) / w.numel() * err, rel=1e-9)
    json.dumps(sens.to_dict())


def test_hutchinson_probes_sum_exactly_over_batches():
    """A probe's value does not depend on how the data is split into batches: it is v^T H v
    for the Hessian of the whole data's mean loss, and its mean over all Rademacher v is the trace."""
    model = TwoLayer().eval()
    x = torch.rand(30, 1, 2, 3, generator=torch.Generator().manual_seed(5)).double()
    y = torch.arange(30) % 3
    layers = quant.quant_layers(model)
    one = hessian_traces(model, x, y, layers, n_probes=3, batch_size=30, seed=2)
    split = hessian_traces(model, x, y, layers, n_probes=3, batch_size=7, seed=2)
    for name in one:
        assert split[name][2] == pytest.approx(one[name][2], rel=1e-10, abs=1e-12)
    # all 2^5 sign vectors of a 5-weight block give its trace exactly (E[v v^T] = I)
    H, cut = exact_blocks(model, x, y)
    block = H[cut[1]:cut[1] + 5, cut[1]:cut[1] + 5]
    vs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=5)), dtype=torch.float64)
    assert torch.einsum("ki,ij,kj->k", vs, block, vs).mean().item() == pytest.approx(block.trace().item())


def test_margin_sensitivity_is_zero_where_quantization_is_exact():
    """One quantized layer whose weights lie on their 2-bit grid, fed binary images on its
    2-bit input grid: quantizing it at 2 bits changes nothing, at 3 bits it does."""
    model = nn.Sequential(nn.Flatten(), quant.QuantLinear(4, 3)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every row spans [-0.5, 1]: 2-bit scale 0.5, zero point 1
        values = torch.tensor([-0.5, 0.0, 0.5, 1.0])
        model[1].weight.copy_(torch.stack([values[torch.randperm(4, generator=g)] for _ in range(3)]))
        model[1].bias.copy_(torch.tensor([0.1, -0.2, 0.05]))
    layer = model[1]
    for b in (2, 3):
        layer.act.ranges[b - 1] = torch.tensor([0.0, 1.0])
        layer.act.seen[b - 1] = 1
    x = torch.randint(0, 2, (64, 1, 2, 2), generator=g).float()
    y = torch.randint(0, 3, (64,), generator=g)
    table, details = margin_drops(model, x, y, (2, 3, 32))
    assert table["1"][2] == pytest.approx(0.0, abs=1e-6) and table["1"][32] == 0.0
    assert table["1"][3] > 1e-3
    base = logit_margin(model(x), y).double()
    with quant.using(model, quant.PerLayer({"1": 3})):
        m3 = logit_margin(model(x), y).double()
    assert table["1"][3] == pytest.approx((base - m3).clamp(min=0).mean().item(), rel=1e-9)
    assert details["1"]["mean_drop"][3] == pytest.approx((base - m3).mean().item(), rel=1e-9)
    assert details["1"]["flip_share"][3] == pytest.approx(((base > 0) != (m3 > 0)).double().mean().item())


@pytest.fixture(scope="module")
def calibrated(trained_smallcnn):
    model = copy.deepcopy(trained_smallcnn)
    x, y = load_fmnist("train", 512)
    quant.calibrate(model, [x[:128]], bits=BITS)
    return model, (x, y)


@pytest.fixture(scope="module")
def margin_sens(calibrated):
    model, (x, y) = calibrated
    return BS.margin_sensitivities(model, (x[128:320], y[128:320]), ThreatModel("pgd", eps=0.1, steps=5), BITS)


@pytest.fixture(scope="module")
def hessian_sens(calibrated):
    model, (x, y) = calibrated
    return BS.hessian_sensitivities(model, (x[:256], y[:256]), BITS, n_probes=8, batch_size=128)


def test_margin_sensitivity_grows_as_bits_decrease(calibrated, margin_sens):
    model, _ = calibrated
    assert margin_sens.method == "margin" and margin_sens.layers == [n for n, _ in quant.quant_layers(model)]
    for name, row in margin_sens.table.items():
        assert row[2] > row[4] > row[8] > 0, (name, row)
        assert all(0 <= f <= 1 for f in margin_sens.details[name]["flip_share"].values())
    fp = next(iter(margin_sens.details.values()))["fp"]
    assert fp["accuracy"] < 0.5  # the inputs are adversarial for the FP model
    assert json.loads(json.dumps(margin_sens.to_dict()))["method"] == "margin"


def test_hessian_sensitivity_on_a_trained_cnn(hessian_sens):
    for name, d in hessian_sens.details.items():
        assert d["trace"] > 3 * d["trace_se"] > 0, (name, d)  # positive curvature, resolved
        row = hessian_sens.table[name]
        assert row[2] > row[3] > row[4] > row[8] > 0
    assert hessian_sens.settings["n_probes"] == 8 and hessian_sens.settings["n"] == 256


def brute_force(table, cost, budget):
    layers = list(table)
    return min(sum(table[l][b] for l, b in zip(layers, combo))
               for combo in itertools.product(*(sorted(table[l]) for l in layers))
               if sum(cost[l][b] for l, b in zip(layers, combo)) <= budget + 1e-9)


@pytest.mark.parametrize("kind", BS.KINDS)
def test_baseline_allocations_meet_the_budget_and_are_optimal(calibrated, hessian_sens, margin_sens, kind):
    model, _ = calibrated
    weights = {n: l.weight.numel() for n, l in quant.quant_layers(model)}
    fp_bitops = quant.bitops(model, quant.Fixed(32)) - sum(BS.cost_table(model, (32,), "bitops")[n][32]
                                                           for n in weights)
    cost = BS.cost_table(model, BITS, kind)
    for level in (2.5, 3.0, 4.0, 6.0):
        budget = level if kind == "avg_bits" else BS.uniform_cost(model, 4, "bitops") * level / 4
        for sens in (hessian_sens, margin_sens):
            a = BS.select_bits(model, budget, BITS, kind, sens.method, sensitivity=sens)
            if kind == "avg_bits":  # recomputed from the weight counts
                spent = sum(weights[n] * b for n, b in a.bits.items()) / sum(weights.values())
            else:
                spent = quant.bitops(model, quant.PerLayer(a.bits)) - fp_bitops
            assert spent == pytest.approx(a.cost, rel=1e-9) and spent <= budget * (1 + 1e-9)
            assert a.objective == pytest.approx(brute_force(sens.table, cost, budget), rel=1e-12)


def test_compare_allocations_with_the_baselines(calibrated, hessian_sens, margin_sens):
    model, _ = calibrated
    x, y = load_fmnist("test", 32)
    lip = BS.sensitivities(model, BITS, iters=30)
    rows = BS.compare_allocations(model, (x, y), ThreatModel("pgd", eps=0.1, steps=2), [3.0], BITS, n=32,
                                  methods=["lipschitz", "hessian", "margin"], sensitivity=lip,
                                  tables={"hessian": hessian_sens, "margin": margin_sens})
    json.dumps(rows)
    assert [r["method"] for r in rows] == ["lipschitz", "hessian", "margin"]
    for r, table in zip(rows, [lip, hessian_sens, margin_sens]):
        assert r["cost"] <= 3.0 + 1e-9
        assert r["own_objective"] == pytest.approx(sum(table.table[l][b] for l, b in r["bits"].items()))
        assert r["objective"] >= rows[0]["objective"] - 1e-12  # the Lipschitz objective, lowest for lipschitz


def test_bad_inputs_name_the_field(calibrated, hessian_sens, margin_sens):
    model, (x, y) = calibrated
    data = (x[:8], y[:8])
    cases = [
        (lambda: BS.hessian_sensitivities(model, data, BITS, n_probes=1), "n_probes=1"),
        (lambda: BS.hessian_sensitivities(model, data, BITS, batch_size=0), "batch_size=0"),
        (lambda: BS.hessian_sensitivities(model, data, (1, 4)), "bits_options=[1, 4]"),
        (lambda: BS.hessian_sensitivities(model, data, BITS, n=9), "n=9"),
        (lambda: BS.hessian_sensitivities(model, [x[:8]], BITS), "data must be"),
        (lambda: BS.margin_sensitivities(model, data, "pgd", BITS), "threat must be"),
        (lambda: BS.margin_sensitivities(model, data, ThreatModel("pgd", eps=0.1, steps=1), (2, 7)),
         "activation ranges are missing for bits [7]"),
        (lambda: BS.select_bits(model, 4.0, BITS, method="hessian"), "method='hessian' needs sensitivity="),
        (lambda: BS.select_bits(model, 4.0, BITS, method="margin", sensitivity=hessian_sens),
         "method='margin' needs sensitivity="),
        (lambda: BS.select_bits(model, 4.0, BITS, method="lipschitz", sensitivity=margin_sens),
         "method='lipschitz' got 'margin' sensitivities"),
        (lambda: BS.compare_allocations(model, data, ThreatModel("pgd", eps=0.1, steps=1), [4.0], BITS,
                                        methods=["margin"], sensitivity=hessian_sens), "tables has no 'margin'"),
        (lambda: BS.compare_allocations(model, data, ThreatModel("pgd", eps=0.1, steps=1), [4.0], BITS,
                                        methods=["margin"], tables={"margin": hessian_sens}), "tables['margin']"),
        (lambda: bit_selection.Params(hessian_probes=1), "hessian_probes=1 is out of range"),
        (lambda: bit_selection.Params(sens_n=0), "sens_n=0 is out of range"),
    ]
    for call, message in cases:
        with pytest.raises(RqlabError, match=None) as err:
            call()
        assert message in str(err.value), (message, str(err.value))


def test_study_offers_the_baselines_opt_in():
    p = bit_selection.Params(methods=["lipschitz", "hessian", "margin"])
    assert p.methods == ("lipschitz", "hessian", "margin")
    assert "hessian" not in bit_selection.Params().methods and "margin" not in bit_selection.Params().methods
    assert set(BS.METHODS) - set(BS.DEFAULT_METHODS) == {"hessian", "margin"}


def test_study_runs_with_the_baselines(calibrated):
    """Notebook 03's run with both opt-in baselines, on the small CNN (as the zoo model's stand-in)."""
    from rqlab.studies import common

    model, _ = calibrated
    params = bit_selection.Params(bits=BITS, budgets=[3.0], methods=["lipschitz", "uniform", "hessian", "margin"],
                                  iters=20, sens_n=64, hessian_probes=2, steps=2, n_examples=32, device="cpu",
                                  interactive=False)
    x, y = load_fmnist("test", 32)
    inputs = common.Inputs({params.model: model}, {params.model: params.model}, x, y, torch.device("cpu"))
    res = bit_selection.run(params, inputs, log=None)
    assert [r["method"] for r in res["allocations"]] == list(params.methods) and res["budget_met"]
    assert set(res["baseline_sensitivity"]) == {"hessian", "margin"}
    assert res["baseline_sensitivity"]["hessian"]["settings"]["n"] == 64
    json.dumps(dict(res))
