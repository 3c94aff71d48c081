"""The fast paths of docs/performance.md change no result.

Each optimisation is checked against the slow path it replaces, bit for bit on fixed
seeds: the cache of quantized weights and activation grids (`quant.frozen_weights`,
entered by every attack), the transfer matrix's shared clean predictions, and the
adversarial-training hooks' skipped range forward. Timings live in benchmarks/, not here.
"""
import pytest
import torch
import torch.nn.functional as F

from rqlab import attacks, defenses, models, quant
from rqlab.analysis.transfer import transfer_matrix
from rqlab.attacks.base import paired_accuracy
from rqlab.attacks import ThreatModel
from rqlab.models.state import eval_mode
from rqlab.quant import layers as qlayers
from rqlab.training import TrainConfig, fit


def model_at(bits=(2, 4, 8), seed=0, **kw):
    """A SmallCNN with calibrated activation ranges for `bits`, a few SGD steps from
    random weights (so BN statistics and weights are not at their initial values)."""
    torch.manual_seed(seed)
    m = models.create("smallcnn", input_shape=(1, 28, 28), mean=(0.3,), std=(0.3,), **kw)
    if kw.get("sbn_bits"):  # FP has no batch-norm branch: start at the set's widest precision
        quant.apply(m, quant.Fixed(max(kw["sbn_bits"])))
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    quant.calibrate(m, [x], list(bits))
    return m.eval()


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture
def no_cache(monkeypatch):
    """Inside the fixture's `with`, frozen_weights caches nothing: the slow path."""
    class Off:
        def __enter__(self):
            monkeypatch.setattr(qlayers, "WEIGHT_CACHE", False)

        def __exit__(self, *exc):
            monkeypatch.undo()
    return Off()


# ---- the vectorised CPU fake quantization against torch's native kernels ---------------------

def native(x, scale, zp, qmin, qmax, axis=None):
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)


def assert_same_as_native(x, scale, zp, qmin, qmax, axis=None):
    """Values (no grad and with grad) and the clipped-STE gradient, bit for bit."""
    from rqlab.quant.functional import fake_quantize

    ours, ref = fake_quantize(x, scale, zp, qmin, qmax, axis), native(x, scale, zp, qmin, qmax, axis)
    assert torch.equal(ours, ref) or torch.equal(ours.nan_to_num(), ref.nan_to_num())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    qa, qb = fake_quantize(xa, scale, zp, qmin, qmax, axis), native(xb, scale, zp, qmin, qmax, axis)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    qa.backward(g)
    qb.backward(g)
    assert torch.equal(qa, qb) and torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("seed", range(4))
def test_per_tensor_fake_quant_equals_native_bit_for_bit(bits, seed):
    from rqlab.quant.functional import range_qparams

    g = torch.Generator().manual_seed(seed)
    lo, hi = -torch.rand(1, generator=g) * (seed % 2), torch.rand(1, generator=g) * 4
    scale, zp = range_qparams(lo, hi, bits)
    qmax = 2 ** bits - 1
    k = torch.arange(-3, qmax + 3, dtype=torch.float32)
    x = torch.cat([
        (torch.rand(3000, generator=g) * 1.4 - 0.2) * (hi - lo) + lo,     # inside and beyond the range
        (k - zp + 0.5) * scale, (k - zp - 0.5) * scale, (k - zp) * scale,  # ties and grid points
        torch.nextafter((k - zp + 0.5) * scale, torch.tensor(1e9)),
        torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan")]),
    ])
    assert_same_as_native(x, scale, zp, 0, qmax)
    assert_same_as_native(x, scale, torch.zeros_like(zp), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)  # symmetric


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape, axis", [((16, 8, 3, 3), 0), ((10, 40), 0), ((6, 5, 4), 1)])
def test_per_channel_fake_quant_equals_native_bit_for_bit(bits, shape, axis):
    from rqlab.quant.functional import affine_qparams

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(shape, generator=g) * torch.rand(shape[axis], generator=g).view(
        (-1,) + (1,) * (len(shape) - axis - 1))
    w.select(axis, 0).zero_()  # an all-zero channel (scale at its floor)
    wd = w.transpose(0, axis).reshape(shape[axis], -1)
    scale, zp = affine_qparams(wd.amin(1), wd.amax(1), bits)
    assert_same_as_native(w, scale, zp, 0, 2 ** bits - 1, axis)
    assert_same_as_native(w * 1.3, scale, zp, 0, 2 ** bits - 1, axis)  # beyond each channel's range


def test_quantizers_equal_the_native_path_on_a_model(monkeypatch):
    from rqlab.quant import functional

    outs = []
    for vectorised in (True, False):
        monkeypatch.setattr(functional, "CPU_VECTORISED", vectorised)
        m = model_at(bits=(2, 4, 8))
        quant.apply(m, quant.Fixed(4))
        x, y = batch()
        m.train()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        outs.append((loss.detach(), {k: p.grad for k, p in m.named_parameters()}, m.state_dict()))
    (la, ga, sa), (lb, gb, sb) = outs
    assert torch.equal(la, lb)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- the cache of quantized weights and grids -----------------------------------------------

@pytest.mark.parametrize("kw, policy", [
    ({}, quant.Fixed(4)),
    ({"weight_scheme": "per_tensor_symmetric", "ste": "plain"}, quant.Fixed(4)),
    ({}, quant.Fixed(1)),
    ({}, quant.PerLayer({"conv2": 2, "conv3": (8, 4)}, default=4)),
    ({"quantize_first_last": True}, quant.Fixed(32, act_bits=4)),
])
@pytest.mark.parametrize("attack", ["pgd", "fgsm", "cw"])
def test_attack_with_and_without_the_cache_gives_the_same_x_adv(kw, policy, attack, no_cache):
    m = model_at(bits=(1, 2, 4, 8), **kw)
    x, y = batch()
    threat = ThreatModel(attack, eps=0.1, steps=5, restarts=2, seed=3)
    quant.apply(m, policy)
    fast = attacks.get(attack)(m, x, y, threat)
    with no_cache:
        slow = attacks.get(attack)(m, x, y, threat)
    assert torch.equal(fast, slow)
    assert not torch.equal(fast, x)


@pytest.mark.parametrize("attack", ["eot_pgd", "expectation"])
def test_random_precision_attacks_are_unchanged_by_the_cache(attack, no_cache):
    m = model_at(bits=(2, 4, 8))
    x, y = batch()
    quant.apply(m, quant.RandomPrecision((2, 4, 8), seed=5))
    threat = ThreatModel(attack, eps=0.1, steps=4, eot=3, seed=2)
    fast = attacks.get(attack)(m, x, y, threat)
    with no_cache:
        slow = attacks.get(attack)(m, x, y, threat)
    assert torch.equal(fast, slow)


def eot_pgd_with_using(model, x, y, threat):
    """eot_pgd as it was before quant.switching: quant.using around every sample."""
    import random

    from rqlab.attacks.base import ce_loss, input_grad, iterate, precision_support, score
    from rqlab.models.state import prepared

    support = precision_support(model, threat.policy)
    rng = random.Random(threat.seed)

    def grad_fn(xa):
        g = torch.zeros_like(xa)
        for p in (rng.choice(support) for _ in range(threat.eot_samples)):
            with quant.using(model, p):
                g += input_grad(model, xa, y, ce_loss)
        return g / threat.eot_samples

    def score_fn(xa):
        loss, wrong = torch.zeros(len(xa)), torch.zeros(len(xa))
        for p in support:
            with quant.using(model, p):
                lo, wr = score(model, xa, y, ce_loss)
            loss, wrong = loss + lo / len(support), wrong + wr / len(support)
        return loss, wrong

    with prepared(model):
        return iterate(x, threat, grad_fn, score_fn)


@pytest.mark.parametrize("sbn", [None, (2, 4, 8)])
def test_eot_pgd_with_switching_equals_using_around_every_sample(sbn):
    m = model_at(bits=(2, 4, 8), sbn_bits=sbn)
    x, y = batch()
    quant.apply(m, quant.RandomPrecision((2, 4, 8), seed=5))
    threat = ThreatModel("eot_pgd", eps=0.1, steps=4, eot=3, restarts=2, seed=2)
    before = [(layer.w_bits, layer.a_bits) for _, layer in quant.quant_layers(m)]
    fast = attacks.eot_pgd(m, x, y, threat)
    assert [(layer.w_bits, layer.a_bits) for _, layer in quant.quant_layers(m)] == before
    assert isinstance(quant.current(m), quant.RandomPrecision) and m._rqlab_random_hook is not None
    assert torch.equal(fast, eot_pgd_with_using(m, x, y, threat))


def test_switching_rejects_random_policies_and_restores_state():
    m = model_at(bits=(2, 4, 8))
    quant.apply(m, quant.PerLayer({"conv2": 2}, default=8))
    support = [quant.Fixed(4), quant.PerLayer({"conv3": 2}, default=4)]
    with quant.switching(m, support) as switch:
        switch(support[1])
        assert (m.conv3.w_bits, m.conv2.w_bits) == (2, 4)
        switch(support[0])
        assert (m.conv3.w_bits, m.conv2.w_bits) == (4, 4)
    assert (m.conv3.w_bits, m.conv2.w_bits) == (8, 2)
    with pytest.raises(Exception, match="non-random"):
        with quant.switching(m, [quant.RandomPrecision((2, 4))]):
            pass
    assert (m.conv3.w_bits, m.conv2.w_bits) == (8, 2)


def test_weights_quantized_once_per_precision_inside_the_block(monkeypatch):
    m = model_at()
    calls = []
    real = qlayers.quantize_weight
    monkeypatch.setattr(qlayers, "quantize_weight", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    x, y = batch()
    quant.apply(m, quant.Fixed(4))
    attacks.pgd(m, x, y, ThreatModel("pgd", eps=0.1, steps=5))
    n_layers = len(quant.quant_layers(m))
    assert [b for b in calls if b < 32] == [4] * n_layers  # 5 steps, each weight quantized once
    assert all(not layer._weights for _, layer in quant.quant_layers(m))  # dropped on exit
    assert all(not a._grids for a in m.modules() if isinstance(a, quant.ActQuant))


@pytest.mark.parametrize("change", ["in_place", "data", "load_state_dict", "new_parameter"])
def test_weights_changed_inside_the_block_invalidate_the_cache(change):
    m = model_at()
    quant.apply(m, quant.Fixed(4))
    x, _ = batch()
    other = model_at(seed=7)
    with torch.no_grad(), quant.frozen_weights(m):
        before = m(x)
        if change == "in_place":
            m.conv2.weight.mul_(-1.5)
        elif change == "data":
            m.conv2.weight.data = -1.5 * m.conv2.weight.data
        elif change == "load_state_dict":
            m.load_state_dict(other.state_dict())
        else:
            m.conv2.weight = torch.nn.Parameter(-1.5 * m.conv2.weight.detach())
        after = m(x)
    with torch.no_grad():
        fresh = m(x)  # outside the block: nothing cached
    assert torch.equal(after, fresh)
    assert not torch.equal(before, after)


def test_training_between_attacks_is_seen_by_the_next_attack(no_cache):
    m = model_at()
    quant.apply(m, quant.Fixed(4))
    x, y = batch()
    threat = ThreatModel("pgd", eps=0.1, steps=3)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    with quant.frozen_weights(m):  # one block around attacks and SGD steps
        for _ in range(2):
            fast = attacks.pgd(m, x, y, threat)
            with no_cache:
                slow = attacks.pgd(m, x, y, threat)
            assert torch.equal(fast, slow)
            m.train()
            opt.zero_grad()
            F.cross_entropy(m(fast), y).backward()  # weights require grad: never the cache
            opt.step()
            m.eval()


def test_training_step_inside_the_block_gets_weight_gradients(no_cache):
    grads = []
    for off in (False, True):
        m = model_at()
        quant.apply(m, quant.Fixed(4))
        x, y = batch()
        with quant.frozen_weights(m):
            with no_cache if off else torch.no_grad():
                m(x)  # fills the cache (no_grad) on the fast run
            m.train()
            F.cross_entropy(m(x), y).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[1])
    assert grads[0]["conv2.weight"].abs().sum() > 0  # a quantized layer's weight has a gradient


def test_activation_grid_cache_follows_recalibration():
    m = model_at(bits=(4,))
    quant.apply(m, quant.Fixed(4))
    x, _ = batch()
    with torch.no_grad(), quant.frozen_weights(m):
        before = m(x)
        quant.calibrate(m, [0.5 * x], [4])  # new ranges inside the block
        after = m(x)
    with torch.no_grad():
        assert torch.equal(after, m(x))
    assert not torch.equal(before, after)


def test_uncalibrated_precision_still_raises_inside_the_block():
    m = model_at(bits=(4,))
    quant.apply(m, quant.Fixed(6))
    x, y = batch()
    with pytest.raises(Exception, match="never trained or calibrated"):
        attacks.pgd(m, x, y, ThreatModel("pgd", eps=0.1, steps=2))


def test_evaluate_record_is_unchanged_by_the_cache(no_cache):
    from rqlab.evaluation import evaluate

    m = model_at(bits=(2, 4, 8))
    x, y = batch(40)
    threat = ThreatModel("pgd", eps=0.1, steps=3)
    keys = ("clean_accuracy", "robust_accuracy", "per_example")
    for policy in (quant.Fixed(4), quant.RandomPrecision((2, 4, 8), seed=1)):
        fast = evaluate(m, (x, y), threat, policy=policy, batch_size=16, passes=2, progress=False)
        with no_cache:
            slow = evaluate(m, (x, y), threat, policy=policy, batch_size=16, passes=2, progress=False)
        assert {k: fast[k] for k in keys} == {k: slow[k] for k in keys}


# ---- transfer matrix ---------------------------------------------------------------------------

def naive_transfer(m, x, y, attack_bits, infer_bits, threat):
    """The definition: one attack per (a, b) pair, crafted at a, scored at b."""
    out = []
    for a in attack_bits:
        row = []
        for b in infer_bits:
            x_adv = attacks.pgd(m, x, y, threat.replace(policy=quant.Fixed(a)))
            with quant.using(m, quant.Fixed(b)), eval_mode(m):
                row.append(paired_accuracy(m, x, y, x_adv))
        out.append(row)
    return out


def test_transfer_matrix_equals_the_naive_pairs_and_keeps_the_random_column():
    m = model_at(bits=(2, 4, 8))
    x, y = batch(24)
    threat = ThreatModel("pgd", eps=0.1, steps=3)
    bits = [2, 4, 8]
    tm = transfer_matrix(m, x, y, bits, bits, threat, eot_policy=quant.RandomPrecision((2, 4, 8), seed=3),
                         passes=3, eot_samples=2)
    assert [row[:3] for row in tm["matrix"][:3]] == naive_transfer(m, x, y, bits, bits, threat)
    with quant.using(m, quant.Fixed(4)), eval_mode(m):
        assert tm["clean_accuracy"][1] == paired_accuracy(m, x, y, x)
    # the "rpi" column: the same draws as scoring each row with its own fresh policy
    crafted = [attacks.pgd(m, x, y, threat.replace(policy=quant.Fixed(a))) for a in bits]
    crafted.append(attacks.eot_pgd(m, x, y, threat.replace(attack="eot_pgd", eot=2,
                                                           policy=quant.RandomPrecision((2, 4, 8), seed=3))))
    with quant.using(m, quant.RandomPrecision((2, 4, 8), seed=3)), eval_mode(m):
        expected_clean = paired_accuracy(m, x, y, x, 3)
        expected = [paired_accuracy(m, x, y, xa, 3) for xa in crafted]
    assert tm["clean_accuracy"][3] == expected_clean
    assert [row[3] for row in tm["matrix"]] == expected


# ---- adversarial training: the range forward is skipped only when it changes nothing --------

@pytest.mark.parametrize("name, policy", [("fgsm-rs", quant.Fixed(4)), ("pgd-at", quant.Fixed(4)),
                                          ("pgd-at", quant.RandomPrecision((4, 8), seed=0)),  # skip off
                                          ("rpt-fgsm-rs", quant.Fixed(8))])
def test_adversarial_training_is_unchanged_by_skipping_the_range_forward(name, policy, monkeypatch):
    from rqlab.defenses import adversarial

    def train(skip):
        if not skip:
            monkeypatch.setattr(adversarial, "_has_ranges", lambda model: False)
        torch.manual_seed(0)
        sbn = (4, 8) if name.startswith("rpt") else None
        m = models.create("smallcnn", input_shape=(1, 28, 28), mean=(0.3,), std=(0.3,), sbn_bits=sbn)
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
        p = policy
        if isinstance(p, quant.RandomPrecision):  # ranges for every draw; the forward still draws
            quant.calibrate(m, [x[:16]], p.choices)
            p = quant.RandomPrecision(p.choices, p.seed)  # a fresh generator for each run
        quant.apply(m, p)
        loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
        settings = {k: v for k, v in dict(eps=0.1, steps=2).items() if k in defenses.get(name).params}
        hooks = defenses.build(name, bits=(4, 8) if sbn else None, **settings)
        fit(m, loader, TrainConfig(epochs=1, batch_size=16, lr=0.05, device="cpu"), hooks=hooks,
            progress=False, log=None)
        monkeypatch.undo()
        return m.state_dict()

    fast, slow = train(skip=True), train(skip=False)
    assert all(torch.equal(fast[k], slow[k]) for k in slow)
