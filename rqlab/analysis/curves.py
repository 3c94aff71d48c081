"""Training curves: clean accuracy, robust accuracy and wall time per epoch from training
histories (`training.fit` rows, as `rqlab.train` returns them and zoo cards hold them), and
the ratio of mean epoch times (METHODS section 5).

    >>> curve = curve_from_history(history, source="live")
    >>> epoch_time_ratio({"natural": c1, "pgd-at": c2})          # {"natural": 1.0, "pgd-at": ~8}

A curve is {"epoch": [1, 2, ...], "clean_accuracy": [...], "robust_accuracy": [...],
"epoch_time_s": [...], "cumulative_time_s": [...], "source": str, "attack": str}, one
point per epoch, accuracies as fractions. Epoch times count training only (evaluation
and saving excluded, as `training.fit` measures them). Notebook 04's study
(`rqlab.studies.odgq_curves`) reads them from the zoo or trains them live.
"""
from __future__ import annotations

from ..validate import RqlabError

KEYS = ("epoch", "clean_accuracy", "robust_accuracy", "epoch_time_s", "cumulative_time_s")


def curve_from_history(history: list[dict], source: str = "", attack: str = "PGD-20") -> dict:
    """A curve from `training.fit` history rows with clean_accuracy and robust_accuracy."""
    if not isinstance(history, list) or not history:
        raise RqlabError(f"history of {source or 'the run'} is empty: no epoch was recorded")
    missing = [k for k in KEYS[1:] if k not in history[0]]
    if missing:
        raise RqlabError(f"history of {source or 'the run'} has no {missing} (train with --eval-pgd N for "
                         f"per-epoch robust accuracy)")
    curve = {k: [r[k] for r in history] for k in KEYS}
    curve["epoch"] = [int(e) for e in curve["epoch"]]
    return {**curve, "source": source, "attack": attack}


def epoch_time_ratio(curves: dict, reference: str = "natural") -> dict[str, float]:
    """Mean epoch time of each method over that of `reference` (1.0 for itself)."""
    if reference not in curves:
        raise RqlabError(f"reference={reference!r} has no curve: curves are {list(curves)}")
    mean = {m: sum(c["epoch_time_s"]) / len(c["epoch_time_s"]) for m, c in curves.items()}
    if mean[reference] <= 0:
        raise RqlabError(f"reference {reference!r} has zero epoch time")
    return {m: t / mean[reference] for m, t in mean.items()}


__all__ = ["KEYS", "curve_from_history", "epoch_time_ratio"]
