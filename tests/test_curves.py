"""Training curves (rqlab.analysis.curves): histories to curves, epoch-time ratios. The
zoo's curves and live runs are notebook 04's study (tests/test_study_curves.py)."""
import pytest

from rqlab.analysis import curves as C
from rqlab.validate import RqlabError


def history(times, robust_key="robust_accuracy"):
    rows, total = [], 0.0
    for i, t in enumerate(times):
        total += t
        rows.append({"epoch": i + 1, "clean_accuracy": 0.5 + 0.1 * i, robust_key: 0.1 * i, "epoch_time_s": t,
                     "cumulative_time_s": total})
    return rows


def test_curve_from_history_and_time_ratio():
    c = C.curve_from_history(history([2.0, 4.0]), source="s")
    assert c["epoch"] == [1, 2] and c["clean_accuracy"] == [0.5, 0.6] and c["robust_accuracy"] == [0.0, 0.1]
    assert c["cumulative_time_s"] == [2.0, 6.0] and c["source"] == "s"
    ratios = C.epoch_time_ratio({"natural": c, "pgd-at": C.curve_from_history(history([16.0, 32.0]))})
    assert ratios == {"natural": 1.0, "pgd-at": 8.0}
    with pytest.raises(RqlabError, match="--eval-pgd"):
        C.curve_from_history(history([1.0], robust_key="other"))
    with pytest.raises(RqlabError, match="empty"):
        C.curve_from_history([])
    with pytest.raises(RqlabError, match="reference='natural' has no curve"):
        C.epoch_time_ratio({"odgq": c})
