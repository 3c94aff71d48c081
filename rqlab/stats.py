"""Sampling noise of measured accuracies: one place for the intervals that records,
cards and readings print.

    >>> wilson_interval(50, 100)          # (0.404, 0.596): 95% interval of 50 hits in 100
    >>> half_width(0.5, 100)              # 0.098: the normal-approximation half-width
    >>> diff_half_width(0.6, 0.5, 100)    # 0.137: for the difference of two such accuracies
"""
from __future__ import annotations

import math

from .validate import RqlabError, check_int


def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% for z = 1.96).

    Better than the normal approximation near 0 and 1: wilson_interval(0, 100) is
    (0.0, 0.037), not (0, 0). n = 0 gives (0.0, 1.0): nothing is known. k may be
    fractional (a mean number of hits over random forward passes).
    """
    n = check_int(n, "n", 0)
    if not isinstance(k, (int, float)) or not 0 <= k <= n:
        raise RqlabError(f"k={k!r} must be a number of successes in [0, n={n}]")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def half_width(p: float, n: int) -> float:
    """95% half-width of an accuracy p measured on n examples (normal approximation)."""
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else 1.0


def diff_half_width(p: float, q: float, n: int) -> float:
    """95% half-width of p - q, both measured on n examples: the two half-widths combined
    as for independent samples (conservative for positively correlated outcomes)."""
    return math.hypot(half_width(p, n), half_width(q, n))


def paired_difference(a, b, z: float = 1.96) -> tuple[float, tuple[float, float]]:
    """Mean of a_i - b_i over the same n examples and its 95% interval (normal
    approximation on the per-example differences): the noise of comparing two evaluations
    of the same examples, much smaller than `diff_half_width` when outcomes agree on most
    examples. a, b: per-example scores in [0, 1] (1/0 outcomes, or the share of passes
    robust for a random policy)."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) != len(b) or not a:
        raise RqlabError(f"a and b must hold the same, non-zero number of examples (got {len(a)} and {len(b)})")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1)) if n > 1 else 1.0
    half = z * sd / math.sqrt(n)
    return mean, (mean - half, mean + half)


__all__ = ["wilson_interval", "half_width", "diff_half_width", "paired_difference"]
