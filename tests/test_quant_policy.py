"""Quantized layers, switchable BN, precision policies, PTQ conversion and BitOPs."""
import json

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from rqlab import models, quant
from rqlab.validate import RqlabError


def small(**kw):
    return models.create("smallcnn", mean=(0.286,), std=(0.353,), **kw)


def bits_of(model):
    return {n: (m.w_bits, m.a_bits) for n, m in quant.quant_layers(model, include_fp=True)}


# ---- layers --------------------------------------------------------------------------

def test_quant_conv_matches_conv_with_quantized_weight_and_input():
    torch.manual_seed(0)
    layer = quant.QuantConv2d(3, 4, 3, padding=1)
    layer.set_bits(4, 3)
    x = torch.rand(2, 3, 8, 8)
    y = layer(x)  # training mode: range of 3 bits set from this batch
    xq = quant.quantize_range(x, x.min(), x.max(), 3)
    wq = quant.quantize_per_channel(layer.weight, 4)
    assert torch.allclose(y, nn.functional.conv2d(xq, wq, layer.bias, padding=1), atol=1e-5)


def test_activation_range_tracking_frozen_in_eval_and_per_precision():
    act = quant.ActQuant(momentum=0.5)
    act.train()
    act(torch.tensor([0.0, 1.0]), 4)
    act(torch.tensor([0.0, 3.0]), 4)
    assert torch.allclose(act.ranges[3], torch.tensor([0.0, 2.0]))  # 1 -> lerp(1, 3, 0.5) = 2
    act(torch.tensor([-1.0, 5.0]), 8)
    assert torch.allclose(act.ranges[7], torch.tensor([-1.0, 5.0]))  # 8 bits has its own slot
    assert torch.allclose(act.ranges[3], torch.tensor([0.0, 2.0]))
    act.eval()
    act(torch.tensor([0.0, 100.0]), 4)
    assert torch.allclose(act.ranges[3], torch.tensor([0.0, 2.0]))  # frozen in eval
    with pytest.raises(RqlabError, match="calibrate"):
        act(torch.tensor([0.0, 1.0]), 6)  # never trained or calibrated at 6 bits


def test_switchable_bn_uses_exactly_the_current_branch():
    m = small(sbn_bits=(4, 6, 8))
    m.train()
    x = torch.rand(16, 1, 28, 28)
    before = {b: bn.running_mean.clone() for b, bn in m.bn2.bns.items()}
    quant.apply(m, quant.Fixed(6))
    m(x)
    for b, bn in m.bn2.bns.items():
        changed = not torch.equal(bn.running_mean, before[b])
        assert changed == (b == "6"), f"branch {b} changed={changed}"
    # eval output equals a plain BN forward through the 6-bit branch
    m.eval()
    seen = {}
    h = m.bn2.bns["6"].register_forward_hook(lambda mod, i, o: seen.setdefault("out", o))
    m(x)
    h.remove()
    assert "out" in seen
    with pytest.raises(RqlabError, match="sbn_bits"):
        quant.apply(m, quant.Fixed(5))


# ---- policies ------------------------------------------------------------------------

def test_fixed_policy_leaves_first_and_last_layer_fp():
    m = quant.apply(small(), quant.Fixed(4))
    b = bits_of(m)
    assert b["conv1"] == (32, 32) and b["fc2"] == (32, 32)
    assert b["conv2"] == b["conv3"] == b["fc1"] == (4, 4)
    m2 = quant.apply(small(quantize_first_last=True), quant.Fixed(4))
    assert bits_of(m2)["conv1"] == (4, 4)


def test_activation_only_policy():
    m = quant.apply(small(), quant.Fixed(32, act_bits=4))
    assert bits_of(m)["conv2"] == (32, 4)
    assert str(quant.current(m)) == "w32a4"


def test_per_layer_map_and_unknown_layer():
    m = quant.apply(small(), quant.PerLayer({"conv2": 3, "fc1": (8, 6)}, default=5))
    b = bits_of(m)
    assert b["conv2"] == (3, 3) and b["fc1"] == (8, 6) and b["conv3"] == (5, 5)
    with pytest.raises(RqlabError, match="conv9.*quantizable layers.*conv2"):
        quant.apply(m, quant.PerLayer({"conv9": 4}))
    with pytest.raises(RqlabError, match="kept at FP"):
        quant.apply(m, quant.PerLayer({"conv1": 4}))


def test_random_policy_draws_every_forward_reproducibly():
    def run(seed):
        m = small(sbn_bits=(4, 5, 6, 7, 8))
        quant.apply(m, quant.RandomPrecision((4, 5, 6, 7, 8), seed=seed))
        drawn = []
        m.conv2.register_forward_pre_hook(lambda mod, a: drawn.append((mod.w_bits, m.bn2.bits)))
        x = torch.rand(2, 1, 28, 28)
        for _ in range(40):
            m(x)
        return drawn

    a, b = run(1), run(1)
    assert a == b
    assert {w for w, _ in a} == {4, 5, 6, 7, 8}
    assert all(w == sbn for w, sbn in a)  # SBN follows the drawn precision
    assert run(2) != a


def test_using_restores_state_even_when_body_raises():
    m = quant.apply(small(), quant.PerLayer({"conv2": 3}))
    before = bits_of(m)
    with pytest.raises(ZeroDivisionError):
        with quant.using(m, quant.Fixed(2)):
            assert bits_of(m)["conv3"] == (2, 2)
            1 / 0
    assert bits_of(m) == before
    assert isinstance(quant.current(m), quant.PerLayer)


def test_using_restores_random_hook():
    m = small()
    quant.apply(m, quant.RandomPrecision((2, 3), seed=0))
    with quant.using(m, quant.Fixed(8)):
        m.train()
        m(torch.rand(2, 1, 28, 28))
        assert m.conv2.w_bits == 8
    drawn = set()
    m.conv2.register_forward_pre_hook(lambda mod, a: drawn.add(mod.w_bits))
    for _ in range(20):
        m(torch.rand(2, 1, 28, 28))
    assert drawn == {2, 3}


@pytest.mark.parametrize("text,expected", [
    ("fp", quant.Fixed(32)), ("32", quant.Fixed(32)), ("4", quant.Fixed(4)),
    ("w32a4", quant.Fixed(32, act_bits=4)), ("wfpa2", quant.Fixed(32, act_bits=2))])
def test_parse_fixed(text, expected):
    assert quant.parse_policy(text) == expected


def test_parse_random():
    p = quant.parse_policy("4-8", seed=3)
    assert p.choices == (4, 5, 6, 7, 8) and p.seed == 3 and str(p) == "random(4-8)"
    assert quant.parse_policy("8,4,6").choices == (4, 6, 8)


@pytest.mark.parametrize("bad", ["0", "33", "2.5", "8-4", "abc", "4,4", "1-17"])
def test_parse_bad_bits(bad):
    with pytest.raises(RqlabError, match="bits"):
        quant.parse_policy(bad)


@pytest.mark.parametrize("bad", [0, 33, 2.5, -1, True, "4"])
def test_bad_bits_everywhere(bad):
    with pytest.raises(RqlabError, match=r"1\.\.16, or 32"):
        quant.Fixed(bad)
    with pytest.raises(RqlabError, match=r"1\.\.16, or 32"):
        quant.PerLayer({"conv2": bad})
    with pytest.raises(RqlabError, match=r"1\.\.16, or 32"):
        quant.QuantConv2d(1, 1, 1).set_bits(bad)


# ---- policies as dicts ---------------------------------------------------------------

BITS = st.sampled_from(list(range(1, 17)) + [32])
LAYER = st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[0-9]\.[a-z0-9]{1,5})?", fullmatch=True)
FIXED = st.builds(quant.Fixed, BITS, st.none() | BITS)
PER_LAYER = st.builds(quant.PerLayer, st.dictionaries(LAYER, BITS | st.tuples(BITS, BITS), max_size=8), BITS)
RANDOM = st.builds(quant.RandomPrecision, st.sets(BITS, min_size=2).map(tuple), st.integers(0, 2 ** 31 - 1))
POLICIES = FIXED | PER_LAYER | RANDOM


@settings(max_examples=150, deadline=None)
@given(POLICIES)
def test_policy_round_trips_through_its_dict(p):
    d = p.to_dict()
    q = type(p).from_dict(d)
    assert q == p and quant.policy_from_dict(d) == p
    assert type(q) is type(p) and q.to_dict() == d and str(q) == str(p)


@settings(max_examples=150, deadline=None)
@given(POLICIES)
def test_policy_round_trips_through_json(p):
    q = quant.policy_from_dict(json.loads(json.dumps(p.to_dict())))
    assert q == p and q.to_dict() == p.to_dict()


@settings(max_examples=50, deadline=None)
@given(RANDOM, st.integers(1, 20))
def test_random_policies_equal_whatever_they_drew(p, draws):
    q = quant.policy_from_dict(p.to_dict())
    for _ in range(draws):
        p.draw()
    fresh = quant.RandomPrecision(p.choices, p.seed)
    assert q == p and [q.draw() for _ in range(5)] == [fresh.draw() for _ in range(5)]  # q starts at the seed


def test_equal_policies_compare_equal():
    assert quant.Fixed(4, act_bits=4) == quant.Fixed(4)
    assert quant.PerLayer({"conv2": (3, 3), "fc1": [4, 6]}) == quant.PerLayer({"conv2": 3, "fc1": (4, 6)})
    assert quant.RandomPrecision((8, 4), seed=1) == quant.RandomPrecision((4, 8), seed=1)
    assert quant.RandomPrecision((4, 8), seed=1) != quant.RandomPrecision((4, 8), seed=2)
    assert quant.policy_from_dict(None) == quant.Fixed(32)


@pytest.mark.parametrize("d", [{"kind": "mixed", "bits": 4}, {"bits": 4}, {"kind": None}])
def test_from_dict_names_the_allowed_kinds(d):
    with pytest.raises(RqlabError, match="kind=.*allowed kinds are fixed, per_layer, random"):
        quant.policy_from_dict(d)


@pytest.mark.parametrize("cls, d, match", [
    (quant.Fixed, {"kind": "fixed", "bits": 4, "w_bits": 4}, r"unknown fields \['w_bits'\].*'act_bits'"),
    (quant.Fixed, {"kind": "fixed"}, r"lacks the fields \['bits'\]"),
    (quant.Fixed, {"kind": "fixed", "bits": 0}, r"bits=0 .*1\.\.16, or 32"),
    (quant.Fixed, {"kind": "random", "choices": [4, 8]}, r"expected kind='fixed'"),
    (quant.PerLayer, {"kind": "per_layer", "bits": {"conv2": [4, 5, 6]}}, r"bits\['conv2'\].*pair"),
    (quant.PerLayer, {"kind": "per_layer", "bits": {"conv2": 4}, "default": 33}, r"default=33"),
    (quant.RandomPrecision, {"kind": "random", "choices": "4-8"}, r"choices='4-8'.*list"),
    (quant.RandomPrecision, {"kind": "random", "choices": [4, 8], "seed": 1.5}, r"seed=1.5"),
])
def test_from_dict_rejects_bad_fields_by_name(cls, d, match):
    with pytest.raises(RqlabError, match=match):
        cls.from_dict(d)
    if d["kind"] == cls.KIND:  # the same error through the dispatcher
        with pytest.raises(RqlabError, match=match):
            quant.policy_from_dict(d)


# ---- calibration, conversion, BitOPs -------------------------------------------------

def test_calibrate_sets_ranges_without_touching_bn_or_mode():
    m = small()
    m.train()
    bn_before = m.bn2.running_mean.clone()
    x = torch.rand(32, 1, 28, 28)
    quant.calibrate(m, [x[:16], (x[16:], None)], bits=[2, 4])
    assert m.training and torch.equal(m.bn2.running_mean, bn_before)
    assert m.conv2.act.calibrated_bits() == [2, 4]
    assert m.conv1.act.calibrated_bits() == []  # FP layer: nothing to calibrate
    m.eval()
    with quant.using(m, quant.Fixed(4)):
        m(x)
    with pytest.raises(RqlabError, match="calibrate"), quant.using(m, quant.Fixed(3)):
        m(x)


def test_convert_user_model_is_exact_until_quantized():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 24 * 24, 16), nn.ReLU(), nn.Linear(16, 10))
    x = torch.rand(4, 1, 28, 28)
    ref = net(x)
    quant.convert(net)
    assert torch.allclose(net(x), ref, atol=1e-6)
    kinds = [(type(m).__name__, m.keep_fp) for m in net if isinstance(m, quant.layers.QUANT_LAYERS)]
    assert kinds == [("QuantConv2d", True), ("QuantConv2d", False), ("QuantLinear", False), ("QuantLinear", True)]
    quant.ptq(net, 2, [x])
    assert not torch.allclose(net(x), ref, atol=1e-3)


def test_bitops_preactresnet18_at_fp():
    m = models.create("preactresnet18", input_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert quant.macs(m) == pytest.approx(0.557e9, rel=0.01)
    assert quant.bitops(m, quant.Fixed(32)) == pytest.approx(569.9e9, rel=0.01)


def test_bitops_by_hand_on_smallcnn():
    m = small()
    macs = quant.layer_macs(m)
    assert macs == {"conv1": 28 * 28 * 32 * 9, "conv2": 14 * 14 * 64 * 32 * 9, "conv3": 7 * 7 * 128 * 64 * 9,
                    "fc1": 128 * 9 * 128, "fc2": 128 * 10}
    fp = (macs["conv1"] + macs["fc2"]) * 32 * 32
    assert quant.bitops(m, quant.Fixed(4)) == fp + (macs["conv2"] + macs["conv3"] + macs["fc1"]) * 16
    # random policy: the expectation over its choices
    assert quant.bitops(m, quant.RandomPrecision((2, 4))) == pytest.approx(
        fp + (macs["conv2"] + macs["conv3"] + macs["fc1"]) * (4 + 16) / 2)
    pl = quant.bitops(m, quant.PerLayer({"conv2": (2, 8)}))
    assert pl == fp + macs["conv2"] * 16 + (macs["conv3"] + macs["fc1"]) * 1024


def test_quantization_is_not_much_slower_smoke():
    # Not a timing assertion (see benchmarks/): only that 4-bit forward/backward runs and differs from FP.
    m = small()
    x = torch.rand(8, 1, 28, 28)
    m.train()
    y_fp = m(x)
    quant.apply(m, quant.Fixed(4))
    y_q = m(x)
    y_q.sum().backward()
    assert not torch.allclose(y_fp, y_q)
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
