"""The controlled training cost (rqlab.analysis.cost): every method trained on the same
images from the same initial weights, interleaved per repetition, ratios within a
repetition. No assertion on a measured speed (these machines are noisy): the timing is
replaced where a figure is checked."""
import pytest
import torch

from rqlab import data, training
from rqlab.analysis import cost as C
from rqlab.experiment import RunSpec, TrainConfig
from rqlab.validate import RqlabError


def synthetic(n: int) -> data.Dataset:
    info = data.dataset_info("fashion-mnist")
    g = torch.Generator().manual_seed(0)
    return data.Dataset("fashion-mnist", "train", torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (n,), generator=g), info.mean, info.std, info.classes)


def specs(*methods, batch=16):
    cfg = TrainConfig(epochs=3, batch_size=batch, device="cpu")
    return {m: RunSpec(policy="4", defense=m, eps=0.1, train=cfg) for m in methods}


def test_a_real_run_times_every_method_each_repetition():
    out = C.training_cost(specs("natural", "odgq"), synthetic(32), reps=2)
    assert set(out["times"]) == {"natural", "odgq"} and all(len(v) == 2 and min(v) > 0 for v in out["times"].values())
    assert out["ratio"]["natural"] == 1.0 and out["ratio_range"]["natural"] == [1.0, 1.0]
    assert (out["n"], out["batch_size"], out["epochs"], out["reps"]) == (32, 16, 1, 2)  # the specs' 3 epochs replaced
    assert "32 training images, batch 16, epoch 1 of 1 timed, median of 2 interleaved repetitions" in C.describe(out)


def test_ratios_are_taken_within_a_repetition_and_the_order_is_shuffled(monkeypatch):
    """A load that doubles every time in the second repetition falls on both methods: the
    per-repetition ratios stay 3, where a ratio of medians across runs would not see it."""
    calls = []

    def fake_fit(model, loader, cfg, hooks=None, **kw):
        rep = len(calls) // 3
        calls.append(hooks.name)
        base = {"natural": 1.0, "pgd-at": 3.0, "fgsm-rs": 2.0}[hooks.name]
        return [{"epoch_time_s": base * (2.0 if rep == 1 else 1.0)}]

    monkeypatch.setattr(training, "fit", fake_fit)
    out = C.training_cost(specs("natural", "pgd-at", "fgsm-rs"), synthetic(16), reps=4, seed=0)
    assert out["ratio"] == {"natural": 1.0, "pgd-at": 3.0, "fgsm-rs": 2.0}
    assert out["ratio_range"]["pgd-at"] == [3.0, 3.0]
    assert out["times"]["pgd-at"] == [3.0, 6.0, 3.0, 3.0]
    orders = [tuple(calls[i:i + 3]) for i in range(0, 12, 3)]
    assert all(sorted(o) == ["fgsm-rs", "natural", "pgd-at"] for o in orders) and len(set(orders)) > 1


def test_bad_input_names_the_field():
    ds = synthetic(16)
    with pytest.raises(RqlabError, match="reference='natural' is not among the specs: odgq"):
        C.training_cost(specs("odgq"), ds)
    with pytest.raises(RqlabError, match="reps"):
        C.training_cost(specs("natural"), ds, reps=0)
    with pytest.raises(RqlabError, match="specs must be a non-empty"):
        C.training_cost({}, ds)
    with pytest.raises(RqlabError, match=r"specs\['natural'\] must be a RunSpec"):
        C.training_cost({"natural": "fp"}, ds)
    other = data.Dataset("mnist", "train", ds.x, ds.y, ds.mean, ds.std, ds.classes)
    with pytest.raises(RqlabError, match="trains on 'fashion-mnist' but train_set is 'mnist'"):
        C.training_cost(specs("natural"), other)
