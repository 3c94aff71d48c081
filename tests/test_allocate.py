"""The bit allocator meets its budget and is optimal for its own objective."""
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rqlab.bitselect import allocate as A
from rqlab.validate import RqlabError

BITS = (2, 3, 4, 6, 8)


def instance(seed, n_layers=4):
    rng = random.Random(seed)
    params = {f"l{i}": rng.randint(10, 1000) for i in range(n_layers)}
    # sensitivity falls with bits (like a quantization error ~ 2^-b), scaled per layer
    sens = {l: {b: rng.uniform(0.1, 10) * 2.0 ** -b * (1 + rng.random() * 0.3) for b in BITS} for l in params}
    cost = {l: {b: p * b for b in BITS} for l, p in params.items()}
    return sens, cost, params


def brute_force(sens, cost, budget):
    layers = list(sens)
    best = None
    for combo in itertools.product(*(sorted(sens[l]) for l in layers)):
        c = sum(cost[l][b] for l, b in zip(layers, combo))
        o = sum(sens[l][b] for l, b in zip(layers, combo))
        if c <= budget + 1e-9 and (best is None or o < best[0] - 1e-12):
            best = (o, c)
    return best


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(2.0, 8.0))
def test_exact_matches_brute_force_and_meets_budget(seed, avg_bits):
    sens, cost, params = instance(seed)
    budget = avg_bits * sum(params.values())
    a = A.allocate(sens, cost, budget)
    assert a.cost <= budget + 1e-9
    assert a.objective == pytest.approx(brute_force(sens, cost, budget)[0], rel=1e-9)
    for baseline in (A.greedy, A.uniform, A.reverse, A.random_allocation):
        b = baseline(sens, cost, budget)
        assert b.cost <= budget + 1e-9
        assert b.objective >= a.objective - 1e-12


def test_greedy_fallback_is_used_and_feasible():
    sens, cost, params = instance(3, n_layers=6)
    budget = 4 * sum(params.values())
    a = A.allocate(sens, cost, budget, max_states=2)
    assert a.method == "greedy" and a.cost <= budget


def test_uniform_picks_highest_fitting_bits():
    sens, cost, params = instance(1)
    a = A.uniform(sens, cost, 4.5 * sum(params.values()))
    assert set(a.bits.values()) == {4}


def test_budget_below_cheapest_is_refused():
    sens, cost, params = instance(0)
    with pytest.raises(RqlabError, match="budget"):
        A.allocate(sens, cost, 1.0 * sum(params.values()))


def test_mismatched_tables_are_refused():
    sens, cost, _ = instance(0)
    cost.pop("l0")
    with pytest.raises(RqlabError, match="different layers"):
        A.allocate(sens, cost, 1e9)
