"""Training curves (rqlab.analysis.curves): histories to curves, epoch-time ratios, and a
short live run of natural training and ODG-Q."""
import json

import pytest
import torch

from rqlab import data, quant, zoo
from rqlab.studies import params
from rqlab.analysis import curves as C
from rqlab.attacks import ThreatModel
from rqlab.validate import RqlabError

from conftest import load_fmnist


def history(times, robust_key="robust_accuracy"):
    rows, total = [], 0.0
    for i, t in enumerate(times):
        total += t
        rows.append({"epoch": i + 1, "clean_accuracy": 0.5 + 0.1 * i, robust_key: 0.1 * i, "epoch_time_s": t,
                     "cumulative_time_s": total})
    return rows


def test_curve_from_history_and_time_ratio():
    c = C.curve_from_history(history([2.0, 4.0]), source="s")
    assert c["epoch"] == [1, 2] and c["clean_acc"] == [0.5, 0.6] and c["robust_acc"] == [0.0, 0.1]
    assert c["cumulative_time_s"] == [2.0, 6.0] and c["source"] == "s"
    ratios = C.epoch_time_ratio({"natural": c, "pgd-at": C.curve_from_history(history([16.0, 32.0]))})
    assert ratios == {"natural": 1.0, "pgd-at": 8.0}
    with pytest.raises(RqlabError, match="--eval-pgd"):
        C.curve_from_history(history([1.0], robust_key="other"))
    with pytest.raises(RqlabError, match="empty"):
        C.curve_from_history([])
    with pytest.raises(RqlabError, match="reference='natural' has no curve"):
        C.epoch_time_ratio({"odgq": c})
    with pytest.raises(RqlabError, match="'fgsm' is unknown"):
        C.check_methods(["natural", "fgsm"])


def test_zoo_curves_exist_at_4_bits_only():
    with pytest.raises(RqlabError, match=r"at \[4\] bits only, not at bits=2.*live"):
        C.zoo_curves(2)
    missing = [n for n in C.ZOO_CURVES[4].values() if n not in zoo.names(trained_only=True)]
    if missing:
        pytest.skip(f"zoo models not built yet: {missing}")
    curves = C.zoo_curves(4)
    for m, name in C.ZOO_CURVES[4].items():
        hist = zoo.card(name)["history"]
        assert curves[m]["robust_acc"] == [r["robust_accuracy"] for r in hist]
        assert curves[m]["cumulative_time_s"] == [r["cumulative_time_s"] for r in hist]


def test_history_of_a_checkpoint(tmp_path):
    from rqlab import checkpoint, models

    m = models.create("smallcnn", input_shape=(1, 28, 28), mean=(0.3,), std=(0.3,))
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"model": m.config.to_dict(), "state_dict": m.state_dict(), "history": history([1.0])})
    assert C.history_of(str(path)) == history([1.0])


def test_train_curves_one_point_per_epoch_robust_below_clean(fmnist_test):
    load_fmnist("train", 8)  # skips without the data
    train = data.load("fashion-mnist", "train", n=128, seed=0)
    x, y = fmnist_test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        curves, trained = C.train_curves(["natural", "odgq"], 4, train, (x[:16], y[:16]),
                                         ThreatModel("pgd", eps=0.1, steps=2), epochs=2, batch_size=64)
    finally:
        torch.set_num_threads(threads)
    assert list(curves) == ["natural", "odgq"]
    for m, c in curves.items():
        assert c["epoch"] == [1, 2] and c["attack"] == "PGD-2"
        assert all(r <= a for r, a in zip(c["robust_acc"], c["clean_acc"]))  # the same 16 images
        assert c["cumulative_time_s"][1] >= c["cumulative_time_s"][0] > 0
        assert quant.current(trained[m]) == quant.Fixed(4) and not trained[m].training
        assert set(range(1, 9)) | {32} <= set(params.supported_bits(trained[m]))  # PTQ ranges for the explorer
    json.dumps(curves)
