"""Notebook 04's study (rqlab.studies.odgq_curves): the zoo's curves, histories of
checkpoints, and a short live run of natural training and ODG-Q through rqlab.train."""
import json

import pytest
import torch

from rqlab import data, quant, zoo
from rqlab.attacks import ThreatModel
from rqlab.studies import odgq_curves as S
from rqlab.studies import params
from rqlab.validate import RqlabError

from conftest import load_fmnist
from test_curves import history


def test_methods_are_checked():
    assert S.check_methods(["odgq", "natural"]) == ["odgq", "natural"]
    with pytest.raises(RqlabError, match="'fgsm' is unknown"):
        S.check_methods(["natural", "fgsm"])


def test_zoo_curves_exist_at_4_and_1_bits_only():
    with pytest.raises(RqlabError, match=r"at \[1, 4\] bits only, not at bits=2.*live"):
        S.zoo_curves(2)
    missing = [n for n in S.SMALL_CURVES[4].values() if n not in zoo.names(trained_only=True)]
    if missing:
        pytest.skip(f"zoo models not built yet: {missing}")
    names = S.zoo_curve_models(4)
    curves = S.zoo_curves(4)
    for m, name in names.items():
        hist = zoo.card(name)["history"]
        assert curves[m]["source"] == f"zoo {name}"
        assert curves[m]["robust_accuracy"] == [r["robust_accuracy"] for r in hist]
        assert curves[m]["cumulative_time_s"] == [r["cumulative_time_s"] for r in hist]


def test_zoo_curves_read_the_full_set_only_when_all_four_are_built(monkeypatch):
    """Never a mix of full-budget and -small histories; binary curves need the full set."""
    built = set(S.SMALL_CURVES[4].values()) | {"fmnist-q4-natural", "fmnist-q4-pgd7"}
    monkeypatch.setattr(zoo, "names", lambda trained_only=False: sorted(built))
    assert S.zoo_curve_models(4) == S.SMALL_CURVES[4]
    assert S.zoo_curve_models(4, ["natural", "pgd-at"]) == {"natural": "fmnist-q4-natural", "pgd-at": "fmnist-q4-pgd7"}
    built |= set(S.ZOO_CURVES[4].values())
    assert S.zoo_curve_models(4) == S.ZOO_CURVES[4]
    assert S.zoo_eval_n("fmnist-q4-pgd7") == 1000 and S.zoo_eval_n("fmnist-q4-pgd7-small") == 200
    with pytest.raises(RqlabError, match="bits=1: the zoo's curves need fmnist-bin-natural, fmnist-bin-fgsm-rs, "
                                         "fmnist-bin-pgd7, fmnist-odgq-bin .*live=True"):
        S.zoo_curve_models(1)


def test_history_of_a_checkpoint(tmp_path):
    from rqlab import checkpoint, models

    m = models.create("smallcnn", input_shape=(1, 28, 28), mean=(0.3,), std=(0.3,))
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"model": m.config.to_dict(), "state_dict": m.state_dict(), "history": history([1.0])})
    assert S.history_of(str(path)) == history([1.0])


def test_train_curves_one_point_per_epoch_robust_below_clean():
    load_fmnist("train", 8)  # skips without the data
    train = data.load("fashion-mnist", "train", n=128, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        test = data.load("fashion-mnist", "test", n=16, seed=0)
        curves, trained = S.train_curves(["natural", "odgq"], 4, train, test, ThreatModel("pgd", eps=0.1, steps=2),
                                         epochs=2, batch_size=64)
    finally:
        torch.set_num_threads(threads)
    assert list(curves) == ["natural", "odgq"]
    for m, c in curves.items():
        assert c["epoch"] == [1, 2] and c["attack"] == "PGD-2"
        assert all(r <= a for r, a in zip(c["robust_accuracy"], c["clean_accuracy"]))  # the same 16 images
        assert c["cumulative_time_s"][1] >= c["cumulative_time_s"][0] > 0
        assert quant.current(trained[m]) == quant.Fixed(4) and not trained[m].training
        assert set(range(1, 9)) | {32} <= set(params.supported_bits(trained[m]))  # PTQ ranges for the explorer
    json.dumps(curves)
