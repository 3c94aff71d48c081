"""Notebook and script parameter checks (rqlab.studies.params): zoo names and checkpoint paths, the
precisions a model supports, and the messages of bad values."""
import pytest
import rqlab
import torch

from rqlab import checkpoint, models, quant, zoo
from rqlab.studies import params
from rqlab.validate import RqlabError

from conftest import FMNIST_NORM, load_fmnist


def save(model, path, policy=None):
    policy = policy or quant.current(model)
    checkpoint.save(path, {"model": model.config.to_dict(), "state_dict": model.state_dict(),
                           "policy": policy.to_dict()})
    return str(path)


def test_model_specs_zoo_names_and_paths(tmp_path):
    with pytest.raises(RqlabError, match="model: zoo model 'fmnist-nope' is unknown"):
        params.check_model_spec("fmnist-nope")
    with pytest.raises(RqlabError, match="not trained yet.*GPU recipe"):
        params.check_model_spec("cifar10-wrn34-10-pgd7", "fp_model")
    with pytest.raises(RqlabError, match="fp_model='runs/none/checkpoint.pt' is not an existing checkpoint"):
        params.check_model_spec("runs/none/checkpoint.pt", "fp_model")
    with pytest.raises(RqlabError, match="must be a zoo model name"):
        params.check_model_spec(3)
    path = save(models.create("smallcnn", **FMNIST_NORM), tmp_path / "run7" / "checkpoint.pt")
    assert params.check_model_spec(path) == path
    assert params.model_label(path) == "run7"
    assert params.model_label(str(tmp_path / "tiny.pt")) == "tiny"
    assert params.model_label("fmnist-q4-pgd7-small") == "fmnist-q4-pgd7-small"
    assert params.check_model_specs(path) == {"run7": path}
    assert params.check_model_specs({"a": path}) == {"a": path}
    with pytest.raises(RqlabError, match="names 'run7' twice"):
        params.check_model_specs([path, path])
    with pytest.raises(RqlabError, match="empty"):
        params.check_model_specs({})


def test_load_model_and_training_policy_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = models.create("smallcnn", **FMNIST_NORM)
    path = save(m, tmp_path / "m.pt", quant.Fixed(32, act_bits=4))
    loaded = rqlab.load(path)
    assert not loaded.training and quant.current(loaded) == quant.Fixed(32, act_bits=4)
    assert torch.equal(loaded.conv2.weight, m.conv2.weight)
    assert params.training_policy(path) == quant.Fixed(32, act_bits=4)


def test_zoo_models_load_at_their_precision():
    built = zoo.names(trained_only=True)
    if not built:
        pytest.skip("no zoo model built yet (rqlab zoo build)")
    name = built[0]
    model = rqlab.load(name)
    policy = params.training_policy(name)
    assert str(quant.current(model)) == str(policy)
    assert set(range(2, 9)) <= set(params.supported_bits(model)) or model.config.sbn_bits


def test_supported_bits_follow_calibration_and_switchable_bn():
    torch.manual_seed(0)
    m = models.create("smallcnn", **FMNIST_NORM).eval()
    assert params.supported_bits(m) == (1, 32)  # sign activations and FP need no range
    quant.calibrate(m, [torch.rand(8, 1, 28, 28)], bits=[2, 4])
    assert params.supported_bits(m) == (1, 2, 4, 32)
    assert params.check_bits_supported(m, [32, 4, 1]) == (1, 4, 32)
    with pytest.raises(RqlabError, match=r"bits=\[3, 4\]: m1 cannot run at \[3\].*no activation ranges.*runs at "
                                         r"\[1, 2, 4, 32\] \(32 = FP\)"):
        params.check_bits_supported(m, [3, 4], label="m1")
    sbn = quant.apply(models.create("smallcnn", sbn_bits=(4, 5), **FMNIST_NORM).eval(), quant.RandomPrecision((4, 5)))
    quant.calibrate(sbn, [torch.rand(8, 1, 28, 28)], bits=[4, 5])
    assert params.supported_bits(sbn) == (4, 5)
    with pytest.raises(RqlabError, match=r"cannot run at \[32\]: it has switchable batch norm for \[4, 5\] only"):
        params.check_bits_supported(sbn, [4, 32])


def test_lists_choices_and_counts():
    assert params.check_bits_list(4) == (4,)
    assert params.check_bits_list([32, 2]) == (2, 32)
    with pytest.raises(RqlabError, match="bits=0 is not allowed"):
        params.check_bits_list([0, 4])
    with pytest.raises(RqlabError, match=r"has \[32\] outside 1..16"):
        params.check_bits_list([4, 32], hi=16)
    with pytest.raises(RqlabError, match="repeats"):
        params.check_bits_list([4, 4])
    with pytest.raises(RqlabError, match="must be a list"):
        params.check_bits_list("4")
    assert params.check_floats(0.5, "betas", 0.0) == [0.5]
    assert params.check_floats([], "betas", allow_empty=True) == []
    with pytest.raises(RqlabError, match=r"betas\[1\]=-1.0 is out of range"):
        params.check_floats([0.0, -1.0], "betas", 0.0)
    assert params.check_choices(["a"], "m", ["a", "b"]) == ["a"]
    with pytest.raises(RqlabError, match="'c' is unknown: choose from a, b"):
        params.check_choices(["a", "c"], "m", ["a", "b"])
    assert params.check_n_examples(10000, "fashion-mnist") == 10000
    with pytest.raises(RqlabError, match="n_examples=10001 is out of range"):
        params.check_n_examples(10001, "fashion-mnist")
    with pytest.raises(RqlabError, match="dataset='fmnist' is unknown"):
        params.check_dataset("fmnist")


def test_model_must_fit_the_dataset():
    cifar = models.create("smallcnn", input_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(RqlabError, match=r"takes \(3, 32, 32\) images.*fashion-mnist.*\(1, 28, 28\)"):
        params.check_model_fits(cifar, "fashion-mnist", "m")
    params.check_model_fits(models.create("smallcnn", **FMNIST_NORM), "fashion-mnist")


def test_test_subset_is_the_seeded_prefix():
    load_fmnist("test", 8)  # skips without the data
    x, y = params.load_test_subset("fashion-mnist", 8, seed=0)
    x16, y16 = params.load_test_subset("fashion-mnist", 16, seed=0)
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, x16[:8]) and torch.equal(y, y16[:8])
