"""The paper's protocol against adaptive attacks (rqlab.analysis.adaptive)."""
import json

import pytest
import torch

from rqlab import models, quant
from rqlab.analysis import adaptive as A
from rqlab.validate import RqlabError


def test_protocol_threats_for_fixed_and_random_policies():
    rand = A.protocol_threats(quant.RandomPrecision((4, 8)), eps=0.1, steps=5, eot=3, aa_n_iter=7)
    assert list(rand) == ["paper", "eot_pgd", "expectation", "autoattack"]
    assert rand["paper"].attack == "pgd" and rand["paper"].eot_samples == 1
    assert rand["eot_pgd"].eot_samples == 3 and rand["expectation"].attack == "expectation"
    assert rand["autoattack"].options == {"version": "rand", "n_iter": 7}
    fixed = A.protocol_threats(quant.Fixed(32), eps=0.1, adaptive=["eot_pgd", "autoattack"])
    assert fixed["eot_pgd"] == "paper"
    assert fixed["autoattack"].options["version"] == "custom"
    assert fixed["autoattack"].options["attacks"] == ["apgd-ce", "apgd-dlr"]
    with pytest.raises(RqlabError, match="adaptive='square' is unknown"):
        A.protocol_threats(quant.Fixed(32), eps=0.1, adaptive=["square"])


def test_evaluate_protocols_scores_and_reuse():
    torch.manual_seed(0)
    m = models.create("smallcnn", input_shape=(1, 28, 28), mean=(0.3,), std=(0.3,)).eval()
    quant.calibrate(m, [torch.rand(16, 1, 28, 28)], bits=[4, 8])
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    out = A.evaluate_protocols(m, quant.RandomPrecision((4, 8)), (x, y), eps=0.1, steps=1, eot=2, passes=3,
                               adaptive=["eot_pgd", "expectation"])
    assert list(out) == ["paper", "eot_pgd", "expectation"]
    for s in out.values():
        assert s["passes"] == 3 and s["n"] == 6 and s["same_as"] is None
    assert out["eot_pgd"]["threat"]["eot"] == 2
    fixed = A.evaluate_protocols(m, quant.Fixed(8), (x, y), eps=0.1, steps=1, passes=3, adaptive=["expectation"])
    assert fixed["expectation"]["same_as"] == "paper" and fixed["paper"]["passes"] == 1
    assert fixed["expectation"]["robust_accuracy"] == fixed["paper"]["robust_accuracy"]
    json.dumps(out)
    with pytest.raises(RqlabError, match="precision policy"):
        A.evaluate_protocols(m, 8, (x, y), eps=0.1)
