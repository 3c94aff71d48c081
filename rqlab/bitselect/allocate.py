"""Bit allocation under a budget: a multiple-choice knapsack (METHODS section 4).

Choose one bit-width b_l per layer to minimise  sum_l S_l(b_l)  subject to
sum_l cost_l(b_l) <= budget. Solved exactly by dynamic programming over layers on the
Pareto frontier of (cost, objective) pairs (a partial choice is kept only if no other
partial choice is both cheaper and better), with a greedy fallback (start from the
cheapest bits, repeatedly take the upgrade with the best objective drop per unit cost)
when the frontier grows beyond `max_states`.

    >>> sens = {"a": {2: 9.0, 4: 3.0, 8: 1.0}, "b": {2: 5.0, 4: 1.0, 8: 0.5}}
    >>> cost = {"a": {2: 2, 4: 4, 8: 8}, "b": {2: 2, 4: 4, 8: 8}}
    >>> allocate(sens, cost, budget=8).bits
    {'a': 4, 'b': 4}
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..validate import RqlabError, check_float

Table = dict  # {layer name: {bits: value}}


@dataclass(frozen=True)
class Allocation:
    bits: dict          # {layer: bits}
    cost: float         # sum of the chosen costs
    objective: float    # sum of the chosen sensitivities
    method: str         # "exact" | "greedy" | "uniform" | "random" | "reverse"

    def to_dict(self) -> dict:
        return {"bits": dict(self.bits), "cost": self.cost, "objective": self.objective, "method": self.method}


def _check_tables(sens: Table, cost: Table) -> list[str]:
    layers = list(sens)
    if not layers:
        raise RqlabError("sensitivities are empty: give at least one layer")
    if set(cost) != set(layers):
        raise RqlabError(f"cost and sensitivity tables name different layers: {sorted(set(cost) ^ set(layers))}")
    for name in layers:
        if not sens[name] or set(sens[name]) != set(cost[name]):
            raise RqlabError(f"layer {name!r}: sensitivity and cost must list the same, non-empty bit options")
    return layers


def _total(sens: Table, cost: Table, bits: dict) -> tuple[float, float]:
    return (float(sum(cost[l][b] for l, b in bits.items())), float(sum(sens[l][b] for l, b in bits.items())))


def _min_cost(cost: Table) -> float:
    return float(sum(min(c.values()) for c in cost.values()))


def allocate(sens: Table, cost: Table, budget: float, max_states: int = 200_000) -> Allocation:
    """Bits per layer minimising the summed sensitivity with summed cost <= budget."""
    layers = _check_tables(sens, cost)
    budget = check_float(budget, "budget")
    if budget < _min_cost(cost) - 1e-9:
        raise RqlabError(f"budget={budget:g} is below the cheapest allocation ({_min_cost(cost):g}): "
                         "raise the budget or add lower bit options")
    frontier = [(0.0, 0.0, ())]  # (cost, objective, bits so far), sorted by cost
    for name in layers:
        options = sorted(cost[name].items(), key=lambda kv: kv[1])
        states = [(c + oc, o + sens[name][b], bits + (b,))
                  for c, o, bits in frontier for b, oc in options if c + oc <= budget + 1e-9]
        states.sort(key=lambda s: (s[0], s[1]))
        frontier, best = [], float("inf")
        for s in states:  # keep a state only if it beats every cheaper one
            if s[1] < best - 1e-15:
                frontier.append(s)
                best = s[1]
        if len(frontier) > max_states:
            return greedy(sens, cost, budget)
    c, o, bits = min(frontier, key=lambda s: (s[1], s[0]))
    return Allocation(dict(zip(layers, bits)), c, o, "exact")


def greedy(sens: Table, cost: Table, budget: float) -> Allocation:
    """Greedy fallback: cheapest bits first, then the best objective drop per unit cost."""
    layers = _check_tables(sens, cost)
    bits = {l: min(cost[l], key=cost[l].get) for l in layers}
    spent = sum(cost[l][b] for l, b in bits.items())
    while True:
        best = None
        for l in layers:
            for b, c in cost[l].items():
                extra, gain = c - cost[l][bits[l]], sens[l][bits[l]] - sens[l][b]
                if gain > 0 and spent + extra <= budget + 1e-9:
                    rate = gain / extra if extra > 0 else float("inf")
                    if best is None or rate > best[0]:
                        best = (rate, l, b, extra)
        if best is None:
            break
        _, l, b, extra = best
        bits[l], spent = b, spent + extra
    c, o = _total(sens, cost, bits)
    return Allocation(bits, c, o, "greedy")


def uniform(sens: Table, cost: Table, budget: float) -> Allocation:
    """The highest single bit-width (same for every layer) that fits the budget."""
    layers = _check_tables(sens, cost)
    common = set.intersection(*(set(cost[l]) for l in layers))
    fits = [b for b in sorted(common) if sum(cost[l][b] for l in layers) <= budget + 1e-9]
    if not fits:
        raise RqlabError(f"budget={budget:g}: no uniform bit-width fits")
    bits = {l: fits[-1] for l in layers}
    c, o = _total(sens, cost, bits)
    return Allocation(bits, c, o, "uniform")


def reverse(sens: Table, cost: Table, budget: float) -> Allocation:
    """The exact allocation for the *reversed* sensitivity ranking: a deliberately bad
    baseline that gives the most bits to the least sensitive layers."""
    layers = _check_tables(sens, cost)
    order = sorted(layers, key=lambda l: max(sens[l].values()))
    flipped = {l: sens[m] for l, m in zip(order, reversed(order))}
    a = allocate(flipped, cost, budget)
    c, o = _total(sens, cost, a.bits)
    return Allocation(a.bits, c, o, "reverse")


def random_allocation(sens: Table, cost: Table, budget: float, seed: int = 0, tries: int = 10_000) -> Allocation:
    """A random allocation that uses the budget well: random bits per layer, then
    random upgrades while they fit (seeded)."""
    layers = _check_tables(sens, cost)
    rng = random.Random(seed)
    for _ in range(tries):
        bits = {l: rng.choice(sorted(cost[l])) for l in layers}
        spent = sum(cost[l][b] for l, b in bits.items())
        if spent <= budget + 1e-9:
            break
    else:
        bits = {l: min(cost[l], key=cost[l].get) for l in layers}
        spent = sum(cost[l][b] for l, b in bits.items())
    for l in rng.sample(layers, len(layers)):  # fill the remaining budget at random
        ups = [b for b in sorted(cost[l]) if cost[l][b] > cost[l][bits[l]]
               and spent - cost[l][bits[l]] + cost[l][b] <= budget + 1e-9]
        if ups:
            b = rng.choice(ups)
            spent += cost[l][b] - cost[l][bits[l]]
            bits[l] = b
    c, o = _total(sens, cost, bits)
    return Allocation(bits, c, o, "random")
