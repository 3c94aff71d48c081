"""Readings (rqlab.analysis.readings): each verdict from hand-made numbers on both sides of
its noise threshold, and the paper's table in rqlab's orientation."""
import math

import pytest

from rqlab.analysis import paper, readings as R
from rqlab.validate import RqlabError


def tm(diag, off, eot=None, rpi=None):
    labels = ["2", "4", "fp"]
    m = [[diag if i == j else off for j in range(3)] for i in range(3)]
    rows, cols = list(labels), list(labels)
    if rpi is not None:
        cols.append("rpi")
        for row in m:
            row.append(rpi)
    if eot is not None:
        rows.append("eot")
        m.append([eot] * len(cols))
    return {"row_labels": rows, "col_labels": cols, "matrix": m}


def test_noise_formulas():
    assert R.half_width(0.5, 100) == pytest.approx(1.96 * 0.05)
    assert R.diff_half_width(0.5, 0.5, 100) == pytest.approx(math.sqrt(2) * 1.96 * 0.05)
    assert R.pct(0.6314) == "63.1%"


def test_paper_table_orientation_and_mean():
    t = paper.DWQ_TRANSFER
    assert t["matrix"][1][0] == pytest.approx(0.543)   # attacked at 4 bits, inferred at 3 (METHODS row 3, column 4)
    assert t["matrix"][0][1] == pytest.approx(0.771)   # attacked at 3, inferred at 4
    assert sum(map(sum, t["matrix"])) / 36 == pytest.approx(t["mean"], abs=5e-4)
    diag, off = R.transfer_cells(t)
    assert sum(diag) / 6 == pytest.approx(0.453) and len(off) == 30


def test_transfer_reading_verdicts():
    r = R.transfer_reading(tm(0.40, 0.70, eot=0.35, rpi=0.6), n=500, paper=paper.DWQ_TRANSFER)
    assert r["diagonal_mean"] == pytest.approx(0.40) and r["off_diagonal_mean"] == pytest.approx(0.70)
    assert r["gap"] == pytest.approx(0.30) and r["verdict"] == "poor transfer"
    assert r["eot_mean"] == pytest.approx(0.35) and r["rpi_mean"] == pytest.approx(0.6)
    assert "40.0%" in r["text"] and "70.0%" in r["text"] and "diagonal 45.3%" in r["text"]
    h = R.half_width(0.5, 100)
    assert R.transfer_reading(tm(0.5, 0.5 + 1.5 * h), n=100)["verdict"] == "some transfer loss"
    assert R.transfer_reading(tm(0.5, 0.5 + 0.5 * h), n=100)["verdict"] == "no clear gap"
    assert R.transfer_reading(tm(0.6, 0.3), n=100)["verdict"] == "transfer stronger"
    assert R.transfer_reading(tm(0.5, 0.6))["verdict"] is None  # no n: no noise statement
    with pytest.raises(RqlabError, match="at least two precisions"):
        R.transfer_reading({"row_labels": ["4"], "col_labels": ["4"], "matrix": [[0.5]]})


def scores(fp, rpi_paper, rpi_adaptive):
    def s(mean, worst):
        return {"robust_accuracy": mean, "robust_worst_accuracy": worst}

    return {"FP": {"paper": s(fp, fp), "eot_pgd": s(fp, fp)},
            "RPI": {"paper": s(rpi_paper, rpi_paper - 0.05), "eot_pgd": s(rpi_adaptive, rpi_adaptive - 0.1)}}


def test_gains_reading_separates_surviving_lost_and_reversed_gains():
    r = R.gains_reading(scores(0.40, 0.60, 0.55), "FP", n=1000)["configs"]["RPI"]
    assert r["verdict"] == "survives" and r["paper_gain_clear"] and r["strongest"] == "eot_pgd"
    assert r["paper_gain"] == pytest.approx(0.20) and r["adaptive_gain"] == pytest.approx(0.15)
    assert r["worst_gain"] == pytest.approx(0.05)
    lost = R.gains_reading(scores(0.40, 0.60, 0.41), "FP", n=1000)
    assert lost["configs"]["RPI"]["verdict"] == "within noise" and "does not survive" in lost["text"]
    rev = R.gains_reading(scores(0.40, 0.60, 0.20), "FP", n=1000)
    assert rev["configs"]["RPI"]["verdict"] == "reversed" and "artefact" in rev["text"]
    none = R.gains_reading(scores(0.40, 0.41, 0.40), "FP", n=100)
    assert not none["configs"]["RPI"]["paper_gain_clear"] and "No clear gain under either" in none["text"]
    with pytest.raises(RqlabError, match="baseline='X'"):
        R.gains_reading(scores(0.4, 0.5, 0.5), "X", n=10)


def test_allocation_reading_counts_wins_beyond_noise():
    rows = [{"budget": b, "method": m, "robust_accuracy": acc}
            for b, (lip, uni) in {3.0: (0.60, 0.40), 4.0: (0.50, 0.50), 5.0: (0.30, 0.55)}.items()
            for m, acc in (("lipschitz", lip), ("uniform", uni))]
    r = R.allocation_reading(rows, n=1000)
    assert (r["wins"], r["ties"], r["losses"]) == (1, 1, 1) and r["budgets"] == [3.0, 4.0, 5.0]
    assert "mixed" in r["text"]
    assert "holds here" in R.allocation_reading(rows[:2], n=1000)["text"]
    with pytest.raises(RqlabError, match="no budget has both"):
        R.allocation_reading(rows[:1], n=10)


def test_curves_reading_checks_gain_and_cost():
    def curve(robust, t):
        return {"robust_accuracy": [robust], "epoch_time_s": [t]}

    curves = {"natural": curve(0.05, 1.0), "pgd-at": curve(0.6, 8.0), "odgq": curve(0.5, 1.3)}
    ratios = {"natural": 1.0, "pgd-at": 8.0, "odgq": 1.3}
    r = R.curves_reading(curves, ratios, n=500, cost=ratios, cost_source="one run")
    assert r["robust_gain"] == pytest.approx(0.45) and r["cheap"] is True and "holds here" in r["text"]
    assert "(one run): pgd-at 8.00x, odgq 1.30x" in r["text"]
    # the controlled cost judges, not the curves' own ratios (trained under other loads)
    slow = R.curves_reading(curves, ratios, n=500, cost={**ratios, "odgq": 6.0})
    assert slow["cheap"] is False and "does not hold" in slow["text"] and "6.00x natural" in slow["text"]
    # without a controlled cost the cost half is not judged
    unjudged = R.curves_reading(curves, {**ratios, "odgq": 6.0}, n=500)
    assert unjudged["cheap"] is None and "not judged" in unjudged["text"]
    # repetitions on both sides of the 2x bound: not judged; all above it: not cheap
    straddle = R.curves_reading(curves, ratios, n=500, cost={**ratios, "odgq": 1.9}, cost_range={"odgq": [1.5, 2.8]})
    assert straddle["cheap"] is None and "1.50x to 2.80x" in straddle["text"] and "both sides" in straddle["text"]
    above = R.curves_reading(curves, ratios, n=500, cost={**ratios, "odgq": 2.3}, cost_range={"odgq": [2.1, 2.8]})
    assert above["cheap"] is False
    # no robust gain: the claim fails whatever the cost
    flat = R.curves_reading({**curves, "odgq": curve(0.06, 1.0)}, ratios, n=500, cost=ratios)
    assert "within the noise" in flat["text"]


def test_amplification_and_beta_readings():
    amp = {"FP": {"layers": ["conv1", "logits"], "amplification": [0.1, 0.2]},
           "a4": {"layers": ["conv1", "logits"], "amplification": [0.1, 0.5]}}
    r = R.amplification_reading(amp)
    assert r["growth"] == {"FP": pytest.approx(2.0), "a4": pytest.approx(5.0)} and "a4 has the largest" in r["text"]
    rows = [{"beta": b, "orthogonality": o, "bound": 10 - b, "robust_accuracy": a}
            for b, o, a in ((0.0, 9.0, 0.3), (0.01, 4.0, 0.5), (0.001, 6.0, 0.35))]
    b = R.beta_reading(rows, n=1000)
    assert b["best"] == 0.01 and "falls monotonically" in b["text"] and "beyond the noise" in b["text"]
    assert "nothing to compare" in R.beta_reading(rows[:1], n=10)["text"]


def test_allocation_reading_pairs_per_example_outcomes():
    """With per-example outcomes the intervals are paired: two allocations that differ on 3%
    of 1,000 examples, always in the method's favour, win beyond the noise (unpaired, the
    same 3 points are inside the noise of two independent accuracies near 0.5); random's
    seeds are averaged per example; the mean over budgets pairs each example's average."""
    n = 1000
    base = [1] * 500 + [0] * 500
    better = [1] * 530 + [0] * 470
    rows = [{"budget": 3.0, "method": "lipschitz", "robust_accuracy": 0.53, "robust_per_example": better},
            {"budget": 3.0, "method": "uniform", "robust_accuracy": 0.50, "robust_per_example": base},
            {"budget": 4.0, "method": "lipschitz", "robust_accuracy": 0.50, "robust_per_example": base},
            {"budget": 4.0, "method": "uniform", "robust_accuracy": 0.50, "robust_per_example": base}]
    r = R.allocation_reading(rows, n=n)
    assert r["paired"] and (r["wins"], r["ties"], r["losses"]) == (1, 1, 0)
    assert r["gains"] == pytest.approx([0.03, 0.0]) and r["gain_mean"] == pytest.approx(0.015)
    assert r["gain_mean_ci95"][0] > 0 and r["gain_ci95"][1] == [0.0, 0.0]
    unpaired = R.allocation_reading([{k: v for k, v in x.items() if k != "robust_per_example"} for x in rows], n=n)
    assert not unpaired["paired"] and unpaired["wins"] == 0 and unpaired["gain_mean_ci95"][0] < 0
    seeds = [{"budget": 3.0, "method": "random", "robust_accuracy": 0.5, "robust_per_example": p}
             for p in ([1, 0, 1, 0], [1, 1, 0, 0])]
    r = R.allocation_reading([{"budget": 3.0, "method": "lipschitz", "robust_accuracy": 0.5,
                               "robust_per_example": [1, 1, 0, 0]}, *seeds], n=4, against="random")
    assert r["gains"] == pytest.approx([0.0])   # per example: 1 - 1, 1 - 0.5, 0 - 0.5, 0 - 0
