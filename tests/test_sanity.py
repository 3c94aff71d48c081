"""Sanity checks flag a gradient-masked model and a model with a random forward pass,
and pass a normal one (METHODS section 6)."""
import pytest
import torch
import torch.nn as nn

from rqlab.attacks import ThreatModel
from rqlab.evaluation import evaluate
from rqlab.sanity import SanityConfig, SanityWarning, random_forward

CFG = SanityConfig(n=40, square_queries=100)  # small budgets: these models are easy to tell apart
THREAT = ThreatModel("pgd", eps=0.1, steps=10)


class _ZeroGrad(torch.autograd.Function):
    """Identity forward, zero gradient backward: gradient masking in its purest form."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class Wrapped(nn.Module):
    """The trained model behind a transformation of its input."""

    def __init__(self, net, transform):
        super().__init__()
        self.net, self.transform = net, transform
        self.input_shape, self.num_classes = net.input_shape, net.num_classes

    def forward(self, x):
        return self.net(self.transform(x))


def masked(net):
    return Wrapped(net, _ZeroGrad.apply).eval()  # a fresh wrapper is in train mode: keep net in eval


def noisy(net):
    return Wrapped(net, lambda x: (x + 0.05 * torch.randn_like(x)).clamp(0, 1)).eval()


def run(model, data, threat=THREAT):
    x, y = data
    return evaluate(model, (x[:CFG.n], y[:CFG.n]), threat, sanity=CFG, progress=False)


def by_name(record):
    return {c["check"]: c for c in record["sanity"]}


def test_a_normal_model_passes_every_check(trained_smallcnn, fmnist_test):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", SanityWarning)
        rec = run(trained_smallcnn, fmnist_test)
    checks = by_name(rec)
    assert set(checks) == {"eps_monotone", "large_eps", "whitebox_vs_blackbox", "zero_gradient", "random_forward"}
    assert all(c["passed"] for c in checks.values()), checks
    assert checks["large_eps"]["accuracy"] <= 0.05


def test_gradient_masking_is_flagged(trained_smallcnn, fmnist_test):
    with pytest.warns(SanityWarning) as warned:
        rec = run(masked(trained_smallcnn), fmnist_test)
    assert any("zero_gradient" in str(w.message) for w in warned)
    checks = by_name(rec)
    assert not checks["zero_gradient"]["passed"] and checks["zero_gradient"]["share"] == 1.0
    assert not checks["whitebox_vs_blackbox"]["passed"]  # Square does far better than masked PGD
    assert rec["robust_accuracy"] > 0.5  # what the masked evaluation would have claimed


def test_random_forward_without_eot_is_flagged(trained_smallcnn, fmnist_test):
    with pytest.warns(SanityWarning, match="random_forward"):
        rec = run(noisy(trained_smallcnn), fmnist_test)
    check = by_name(rec)["random_forward"]
    assert not check["passed"] and check["max_logit_difference"] > 0
    assert "eot" in check["detail"].lower()
    x = fmnist_test[0][:8]
    assert random_forward(noisy(trained_smallcnn), x, THREAT.replace(eot=4))["passed"]  # with EOT: no flag
    assert random_forward(noisy(trained_smallcnn), x, THREAT.replace(attack="eot_pgd"))["passed"]
    assert random_forward(trained_smallcnn, x, THREAT)["passed"]
