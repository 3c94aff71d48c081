"""Model registry, configs, normalisation-first and clear errors on bad input."""
import pytest
import torch

from rqlab import models, quant
from rqlab.validate import RqlabError

FMNIST = dict(input_shape=(1, 28, 28), mean=(0.286,), std=(0.353,))
CIFAR = dict(input_shape=(3, 32, 32), mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


def test_every_config_name_has_a_class_and_aliases_resolve():
    from rqlab.models import base, registry

    assert list(registry.CLASSES) == list(base.NAMES) == models.names()
    for alias, name in base.ALIASES.items():
        assert models.canonical_name(alias.upper()) == name
        assert models.ModelConfig(alias).name == name
    with pytest.raises(RqlabError, match="smallcnn, preactresnet18, wrn34-10"):
        models.ModelConfig("resnet50")


@pytest.mark.parametrize("name,kw,params", [
    ("smallcnn", FMNIST, (0.2e6, 0.3e6)),
    ("preactresnet18", CIFAR, (11.1e6, 11.2e6)),
])
def test_models_build_run_and_rebuild(name, kw, params):
    torch.manual_seed(0)
    m = models.create(name, **kw)
    n = sum(p.numel() for p in m.parameters())
    assert params[0] <= n <= params[1]
    m.eval()
    x = torch.rand(2, *kw["input_shape"])
    y = m(x)
    assert y.shape == (2, 10)
    m2 = models.from_config(m.config.to_dict())
    m2.load_state_dict(m.state_dict())
    m2.eval()
    assert torch.equal(m2(x), y)


def test_wrn34_10_builds():
    m = models.create("wrn-34-10", **CIFAR)
    assert 46e6 < sum(p.numel() for p in m.parameters()) < 46.5e6
    assert m.config.name == "wrn34-10"


def test_normalisation_is_the_first_operation():
    m = models.create("smallcnn", **FMNIST)
    seen = {}
    m.conv1.register_forward_pre_hook(lambda mod, a: seen.setdefault("x", a[0]))
    x = torch.rand(3, 1, 28, 28)
    m(x)
    assert torch.allclose(seen["x"], (x - 0.286) / 0.353)


def test_unknown_model_name():
    with pytest.raises(RqlabError, match=r"model='resnet9000' is unknown.*smallcnn.*preactresnet18.*wrn34-10"):
        models.create("resnet9000")


@pytest.mark.parametrize("x,match", [
    (torch.rand(2, 3, 28, 28), r"shape \(2, 3, 28, 28\).*\(B, 1, 28, 28\)"),
    (torch.rand(1, 28, 28), "shape"),
    (torch.rand(2, 1, 28, 28) * 255, r"\[0, 1\]"),
    (torch.rand(2, 1, 28, 28) - 0.5, r"\[0, 1\]"),
    (torch.full((2, 1, 28, 28), float("nan")), "NaN"),
    (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "float"),
])
def test_bad_inputs_are_refused_clearly(x, match):
    m = models.create("smallcnn", **FMNIST)
    with pytest.raises(RqlabError, match=match):
        m(x)


@pytest.mark.parametrize("field,value", [
    ("sbn_bits", (4, 33)), ("std", (0.0,)), ("mean", (0.1, 0.2)), ("ste", "fancy"),
    ("weight_scheme", "per_row"), ("input_shape", (28, 28)), ("num_classes", 1)])
def test_bad_config_fields_are_named(field, value):
    kw = dict(FMNIST)
    kw[field] = value
    with pytest.raises(RqlabError, match=field.split("_")[0]):
        models.create("smallcnn", **kw)


def test_sbn_model_trains_each_precision_through_its_branch():
    m = models.create("smallcnn", sbn_bits=(4, 8), **FMNIST)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    quant.apply(m, quant.Fixed(4))
    torch.nn.functional.cross_entropy(m(x), y).backward()
    assert m.bn2.bns["4"].weight.grad is not None
    assert m.bn2.bns["8"].weight.grad is None
    opt.step()
