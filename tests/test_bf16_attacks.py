"""bf16 attack arithmetic (attacks.arithmetic): the attack's forward and backward in bf16,
the quantizers' grids and every final score in fp32, and the record says which ran."""
from __future__ import annotations

import pytest
import torch

from rqlab import attacks, evaluate, zoo
from rqlab.attacks import ThreatModel, base
from rqlab.quant import functional
from rqlab.validate import RqlabError

needs_bf16 = pytest.mark.skipif(not base.bf16_supported("cpu"), reason="this CPU has no AVX512-BF16/AMX")


@pytest.fixture(scope="module")
def q4_model():
    return zoo.load("fmnist-q4-pgd7-small")


@needs_bf16
def test_bf16_changes_the_attack_not_the_clean_scores(q4_model, fmnist_test):
    data = (fmnist_test[0][:96], fmnist_test[1][:96])
    threat = ThreatModel("pgd", eps=0.1, steps=3)
    fp = evaluate(q4_model, data, threat, batch_size=48, progress=False)
    with attacks.arithmetic("bf16"):
        bf = evaluate(q4_model, data, threat, batch_size=48, progress=False)
    assert fp.extra["attack_settings"]["arithmetic"] == "fp32"
    assert bf.extra["attack_settings"]["arithmetic"] == "bf16"
    assert bf["clean_accuracy"] == fp["clean_accuracy"]
    assert bf["per_example"]["clean"] == fp["per_example"]["clean"]
    # robust <= clean per example holds: the robust scores are fp32 forwards as well
    assert all(r <= c for r, c in zip(bf["per_example"]["robust"], bf["per_example"]["clean"]))
    # and the option really changed the arithmetic of the attack
    x, y = data
    with attacks.arithmetic("bf16"):
        g16 = base.input_grad(q4_model, x, y)
    g32 = base.input_grad(q4_model, x, y)
    assert g16.dtype == torch.float32 and not torch.equal(g16, g32)


@needs_bf16
def test_bf16_keeps_the_quantization_grid(q4_model, fmnist_test, monkeypatch):
    """Every fake quantization runs in fp32 on the same grids (scale, zero point) as in
    fp32 arithmetic: bf16 reaches the convolutions only."""
    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    real = functional.fake_quantize
    seen = []

    def spy(v, scale, zero_point, *a, **k):
        seen.append((v.dtype, scale.dtype, tuple(scale.flatten().tolist()), tuple(zero_point.flatten().tolist())))
        return real(v, scale, zero_point, *a, **k)

    monkeypatch.setattr(functional, "fake_quantize", spy)
    threat = ThreatModel("pgd", eps=0.1, steps=2)
    attacks.pgd(q4_model, x, y, threat)
    grids32, seen[:] = {s[2:] for s in seen}, []
    with attacks.arithmetic("bf16"):
        attacks.pgd(q4_model, x, y, threat)
    assert seen and all(s[0] == torch.float32 and s[1] == torch.float32 for s in seen)
    assert {s[2:] for s in seen} == grids32


def test_arithmetic_rejects_unknown_values_and_unsupported_hardware(monkeypatch):
    with pytest.raises(RqlabError, match="arithmetic"):
        with attacks.arithmetic("fp16"):
            pass
    monkeypatch.setattr(base, "bf16_supported", lambda device: False)
    with attacks.arithmetic("auto"):
        assert base.arithmetic_in_use("cpu") == "fp32"
    with attacks.arithmetic("bf16"), pytest.raises(RqlabError, match="AVX512-BF16"):
        base.arithmetic_in_use("cpu")
    assert base.ARITHMETIC == "fp32"


@needs_bf16
def test_binary_policies_keep_fp32(fmnist_test):
    """The binary zoo model failed the bf16 strength check: its attacks stay fp32."""
    m = zoo.load("fmnist-odgq-bin-small")
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    with attacks.arithmetic("bf16"):
        g = base.input_grad(m, x, y)
        rec = evaluate(m, (x, y), ThreatModel("pgd", eps=0.1, steps=1), progress=False)
    assert torch.equal(g, base.input_grad(m, x, y))
    assert rec.extra["attack_settings"]["arithmetic"] == "fp32"
