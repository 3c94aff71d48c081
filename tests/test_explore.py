"""The notebooks' explorer (rqlab.explore): widget names and settings, recomputation on a
change, caching, errors shown as text, the figure as a PNG in the Output widget."""
import base64

import matplotlib
import pytest
import torch

pytest.importorskip("ipywidgets")
matplotlib.use("Agg")

from rqlab import models, quant  # noqa: E402
from rqlab.attacks import ThreatModel  # noqa: E402
from rqlab.explore import RESULT_CLASS, Explorer, bits_label, result_text, robustness_probe  # noqa: E402
from rqlab.validate import RqlabError  # noqa: E402


class FakeProbe:
    def __init__(self):
        self.calls = []

    def __call__(self, name, bits, eps):
        self.calls.append((name, bits, eps))
        if bits == 3:
            raise RqlabError("no range for 3 bits")
        return {"clean_accuracy": 0.8, "robust_accuracy": max(0.0, 0.8 - eps - 0.01 * bits), "n": 64, "attack": "pgd-10"}


def test_labels_and_text():
    assert bits_label(32) == "fp" and bits_label(4) == "4" and bits_label("rpi") == "rpi"
    text = result_text("q4", 4, 0.1, {"clean_accuracy": 0.8, "robust_accuracy": 0.63, "n": 64, "attack": "pgd-10"})
    assert text == "robust accuracy at b=4, eps=0.100: 63.0% (clean 80.0%; q4, 64 examples, pgd-10)"
    worst = result_text("r", "rpi", 0.1, {"clean_accuracy": 0.8, "robust_accuracy": 0.6, "robust_worst_accuracy": 0.5, "passes": 3, "n": 8})
    assert "worst case 50.0%" in worst


def test_explorer_widgets_recompute_on_change_and_cache():
    probe = FakeProbe()
    ex = Explorer(probe, models=["a", "b"], bits=[2, 3, 4, 32], eps=(0.0, 0.3, 0.1), title="t")
    assert (ex.model.description, ex.bits.description, ex.eps.description) == ("model", "bits", "eps")
    assert ex.bits.continuous_update is False and ex.eps.continuous_update is False
    assert RESULT_CLASS in ex.result._dom_classes
    assert [label for label, _ in ex.bits.options] == ["2", "3", "4", "fp"]
    assert probe.calls == [("a", 4, 0.1)]                 # the initial setting: the middle bit-width
    assert ex.result.value.startswith("robust accuracy at b=4, eps=0.100: 66.0%")
    png = ex.output.outputs[0]["data"]["image/png"]
    assert base64.b64decode(png).startswith(b"\x89PNG")
    ex.eps.value = 0.2
    assert probe.calls[-1] == ("a", 4, 0.2) and "eps=0.200: 56.0%" in ex.result.value
    ex.bits.value = 32
    assert ex.result.value.startswith("robust accuracy at b=fp, eps=0.200: 28.0%")
    ex.model.value = "b"
    assert probe.calls[-1] == ("b", 32, 0.2)
    n = len(probe.calls)
    ex.model.value = "a"                                    # computed before: from the cache
    assert len(probe.calls) == n and "b=fp" in ex.result.value
    ex.bits.value = 3
    assert ex.result.value.startswith("cannot compute at b=3, eps=0.200 for a: no range for 3 bits")


def test_explorer_rejects_bad_settings():
    with pytest.raises(RqlabError, match="at least one model"):
        Explorer(FakeProbe(), models=[], bits=[4])
    assert Explorer(FakeProbe(), models=["a"], bits=[2, 4, 8], start_bits=8).bits.value == 8
    with pytest.raises(RqlabError, match="start_bits=3 is not one of"):
        Explorer(FakeProbe(), models=["a"], bits=[2, 4], start_bits=3)
    with pytest.raises(RqlabError, match="min <= value <= max"):
        Explorer(FakeProbe(), models=["a"], bits=[4], eps=(0.2, 0.1, 0.1))


def test_robustness_probe_on_a_model():
    torch.manual_seed(0)
    m = models.create("smallcnn", input_shape=(1, 28, 28), mean=(0.3,), std=(0.3,)).eval()
    quant.calibrate(m, [torch.rand(16, 1, 28, 28)], bits=[4, 8])
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    probe = robustness_probe({"m": m}, x, y, ThreatModel("pgd", eps=0.1, steps=1))
    zero = probe("m", 4, 0.0)
    assert zero["robust_accuracy"] == zero["clean_accuracy"] and zero["n"] == 8 and zero["policy"] == "4"
    r = probe("m", 8, 0.2)
    assert r["attack"] == "pgd-1"
    rand = robustness_probe({"m": m}, x, y, ThreatModel("pgd", eps=0.1, steps=1),
                            policy=lambda name, b: quant.RandomPrecision((4, 8)), passes=3)("m", 4, 0.1)
    assert rand["passes"] == 3
    assert quant.current(m) == quant.Fixed(32)


def test_robustness_probe_is_fast_by_default_and_says_so():
    """The slider's attack: active set + "auto" arithmetic unless fast=False; the result
    names what ran, and the global settings are back to their defaults afterwards."""
    from rqlab import attacks
    from rqlab.attacks.base import arithmetic_in_use

    torch.manual_seed(0)
    m = models.create("smallcnn", input_shape=(1, 28, 28), mean=(0.3,), std=(0.3,)).eval()
    quant.calibrate(m, [torch.rand(16, 1, 28, 28)], bits=[4])
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    fast = robustness_probe({"m": m}, x, y, ThreatModel("pgd", eps=0.1, steps=2))("m", 4, 0.1)
    with attacks.arithmetic("auto"):
        expected = arithmetic_in_use("cpu", quant.Fixed(4))
    assert fast["attack_settings"] == {"arithmetic": expected, "active_set": True}
    full = robustness_probe({"m": m}, x, y, ThreatModel("pgd", eps=0.1, steps=2), fast=False)("m", 4, 0.1)
    assert full["attack_settings"] == {"arithmetic": "fp32", "active_set": False}
    assert fast["clean_accuracy"] == full["clean_accuracy"]  # final scores stay fp32
    assert result_text("m", 4, 0.1, fast).endswith(f"pgd-2 ({'bf16, ' if expected == 'bf16' else ''}active set))")
    assert result_text("m", 4, 0.1, full).endswith("pgd-2)")
    assert attacks.base.ARITHMETIC == "fp32" and attacks.base.ACTIVE_SET is False
    with pytest.raises(RqlabError, match="fast="):
        robustness_probe({"m": m}, x, y, ThreatModel("pgd", eps=0.1), fast="yes")
