"""Choosing bits per layer under a budget, and comparing the choices under attack
(METHODS section 4).

Selection methods (`select_bits`, all at the same budget): "lipschitz" minimises
sum_l S_l(b_l) exactly (multiple-choice knapsack, `allocate.allocate`, greedy fallback);
"uniform" takes the highest single b that fits (it may spend less than the budget);
"random" draws a feasible allocation (seeded); "reverse" solves the knapsack for the
reversed sensitivity ranking, a deliberately bad baseline. Two more baselines solve the
same knapsack on other sensitivity tables, computed beforehand and passed in:
"hessian" (HAWQ-v2's trace-weighted weight error, `hessian.hessian_sensitivities`) and
"margin" (the logit-margin drop at adversarial inputs, `margin.margin_sensitivities`).
"""
from __future__ import annotations

import torch.nn as nn

from .. import quant
from ..evaluation import evaluate
from ..validate import RqlabError, check_choice, check_float, check_int
from . import allocate as A
from .sensitivity import (DEFAULT_BITS, KINDS, Sensitivity, average_bits, check_bits_options, cost_table,
                          ensure_calibrated, sensitivities)

DEFAULT_METHODS = ("lipschitz", "uniform", "random", "reverse")
TABLE_METHODS = ("lipschitz", "hessian", "margin")  # the knapsack on that method's own table
METHODS = DEFAULT_METHODS + ("hessian", "margin")


def select_bits(model: nn.Module, budget: float, bits_options=DEFAULT_BITS, kind: str = "avg_bits",
                method: str = "lipschitz", seed: int = 0, sensitivity: Sensitivity | None = None,
                batches=None, input_shape=None) -> A.Allocation:
    """Choose bits per quantizable layer with total cost <= `budget`.

    budget: average weight bits (kind="avg_bits", e.g. 4.0) or BitOPs of the quantizable
        layers (kind="bitops"; `uniform_cost(model, 4, "bitops")` is uniform 4's).
    method: "lipschitz" | "uniform" | "random" | "reverse" | "hessian" | "margin" (module
        docstring).
    seed: for "random". sensitivity: a precomputed table for the same options: for
        "hessian" and "margin" the one of that method (required), for "lipschitz" a
        Lipschitz one (computed here if None, calibrating with `batches` where ranges are
        missing); the baselines take any (reverse reverses its ranking).
    Returns an `allocate.Allocation`: `.bits` {layer: b} (use quant.PerLayer(alloc.bits)),
    `.cost`, `.objective` = the sum of the table's values at the chosen bits, `.method` =
    the solver ("exact" | "greedy" for lipschitz, hessian and margin, else the baseline's
    name).
    """
    options = check_bits_options(bits_options)
    check_choice(kind, "kind", KINDS)
    check_choice(method, "method", METHODS)
    budget = check_float(budget, "budget", 0.0, lo_open=True)
    check_int(seed, "seed", 0)
    if method in ("hessian", "margin") and getattr(sensitivity, "method", None) != method:
        maker = "hessian_sensitivities(model, train_data, ...)" if method == "hessian" else \
            "margin_sensitivities(model, train_data, threat, ...)"
        raise RqlabError(f"method={method!r} needs sensitivity=rqlab.bitselect.{maker} (got "
                         f"{'none' if sensitivity is None else repr(sensitivity.method) + ' sensitivities'})")
    if method == "lipschitz" and sensitivity is not None and sensitivity.method != "lipschitz":
        raise RqlabError(f"method='lipschitz' got {sensitivity.method!r} sensitivities: pass "
                         f"method={sensitivity.method!r}, or Lipschitz ones (bitselect.sensitivities)")
    if sensitivity is None:
        sensitivity = sensitivities(model, options, input_shape, batches)
    elif tuple(sensitivity.bits_options) != options:
        raise RqlabError(f"sensitivity was computed for bits {list(sensitivity.bits_options)}, "
                         f"but bits_options={list(options)}: compute it for the same options")
    cost = cost_table(model, options, kind, input_shape)
    cheapest = sum(min(row.values()) for row in cost.values())
    if budget < cheapest - 1e-9:
        unit = "average bits" if kind == "avg_bits" else "BitOPs"
        raise RqlabError(f"budget={budget:g} is below the cheapest allocation ({cheapest:g} {unit}, every layer "
                         f"at {options[0]} bits): raise the budget or add lower bits options")
    sens = sensitivity.table
    if method in TABLE_METHODS:
        return A.allocate(sens, cost, budget)
    if method == "uniform":
        return A.uniform(sens, cost, budget)
    if method == "random":
        return A.random_allocation(sens, cost, budget, seed=seed)
    return A.reverse(sens, cost, budget)


def compare_allocations(model: nn.Module, data, threat, budgets, bits_options=DEFAULT_BITS,
                        kind: str = "avg_bits", methods=DEFAULT_METHODS, n: int | None = 1000,
                        random_seeds: int = 3, batches=None, sensitivity: Sensitivity | None = None,
                        batch_size: int = 256, seed: int = 0, progress: bool = False,
                        tables: dict | None = None) -> list[dict]:
    """Evaluate each method's allocation at each budget: one row per (budget, method[, seed]).

    data: test Dataset or (x, y); the first `n` examples are used. threat: a ThreatModel
    (e.g. PGD-20). batches: calibration images for the options the model lacks ranges for
    (else a missing range raises). random_seeds: allocations drawn for "random" (seeds
    0..k-1). sensitivity: the Lipschitz table (computed if None). tables: {"hessian":
    Sensitivity, "margin": Sensitivity}, required for the methods "hessian" and "margin"
    when listed (`hessian_sensitivities`, `margin_sensitivities`, on training images).
    Each allocation is evaluated with `rqlab.evaluation.evaluate` at
    quant.PerLayer(bits) (keep_fp layers at FP); identical allocations are evaluated once.

    Row: budget, kind, method, seed (random only, else None), solver, bits, cost (actual,
    may be below budget: uniform), avg_bits, objective (the Lipschitz objective sum_l
    S_l(b_l), for every method, so the column compares), own_objective (the sum over the
    table the method solved: equal to objective except for hessian and margin), bitops
    (whole model, FP layers at 32), clean_accuracy, robust_accuracy and their 95%
    intervals, n, threat, robust_per_example (1/0 per test example, the same examples for
    every row: `readings.allocation_reading` pairs them). JSON-ready.
    """
    options = check_bits_options(bits_options)
    check_choice(kind, "kind", KINDS)
    methods = tuple(methods)
    if not methods:
        raise RqlabError("methods is empty: choose from " + ", ".join(METHODS))
    for m in methods:
        check_choice(m, "method", METHODS)
    check_int(random_seeds, "random_seeds", 1)
    tables = dict(tables or {})
    for name, table in tables.items():
        check_choice(name, "tables key", ("hessian", "margin"))
        if getattr(table, "method", None) != name or tuple(table.bits_options) != options:
            raise RqlabError(f"tables[{name!r}] must be {name} sensitivities for bits {list(options)} "
                             f"(rqlab.bitselect.{name}_sensitivities)")
    for m in methods:
        if m in ("hessian", "margin") and m not in tables:
            raise RqlabError(f"methods lists {m!r} but tables has no {m!r} entry: pass tables={{{m!r}: "
                             f"rqlab.bitselect.{m}_sensitivities(...)}}")
    budgets = [check_float(b, "budget", 0.0, lo_open=True) for b in
               (budgets if isinstance(budgets, (list, tuple)) else [budgets])]
    if sensitivity is None:
        sensitivity = sensitivities(model, options, batches=batches)
    else:
        ensure_calibrated(model, options, batches)
    cache, rows = {}, []
    for budget in budgets:
        for method in methods:
            for s in (range(random_seeds) if method == "random" else [None]):
                alloc = select_bits(model, budget, options, kind, method, seed=s or 0,
                                    sensitivity=tables.get(method, sensitivity))
                key = tuple(sorted(alloc.bits.items()))
                if key not in cache:
                    policy = quant.PerLayer(alloc.bits)
                    rec = evaluate(model, data, threat, policy=policy, n=n, batch_size=batch_size, seed=seed,
                                   progress=progress)
                    cache[key] = (rec, quant.bitops(model, policy))
                rec, total_bitops = cache[key]
                rows.append({
                    "budget": budget, "kind": kind, "method": method, "seed": s, "solver": alloc.method,
                    "bits": dict(alloc.bits), "cost": alloc.cost, "avg_bits": average_bits(model, alloc.bits),
                    "objective": sum(sensitivity.table[l][b] for l, b in alloc.bits.items()),
                    "own_objective": alloc.objective, "bitops": total_bitops,
                    "clean_accuracy": rec["clean_accuracy"], "clean_ci95": rec["clean_ci95"],
                    "robust_accuracy": rec["robust_accuracy"], "robust_ci95": rec["robust_ci95"],
                    "n": rec["n"], "threat": rec["threat"],
                    "robust_per_example": list(rec.per_example["robust"]),  # 1/0: pairs allocations example by example
                })
    return rows


def format_comparison(rows: list[dict]) -> str:
    """A fixed-width text table of `compare_allocations` rows."""
    head = f"{'budget':>9} {'method':<10}{'seed':>5} {'cost':>10} {'objective':>11} {'GBitOPs':>9} " \
           f"{'clean':>7} {'robust':>7}  bits"
    lines = [head, "-" * len(head)]
    for r in rows:
        seed = "" if r["seed"] is None else str(r["seed"])
        bits = ",".join(str(b) for b in r["bits"].values())
        lines.append(f"{r['budget']:>9.4g} {r['method']:<10}{seed:>5} {r['cost']:>10.4g} {r['objective']:>11.4g} "
                     f"{r['bitops'] / 1e9:>9.4f} {100 * r['clean_accuracy']:>6.2f}% "
                     f"{100 * r['robust_accuracy']:>6.2f}%  {bits}")
    return "\n".join(lines)


__all__ = ["METHODS", "DEFAULT_METHODS", "TABLE_METHODS", "select_bits", "compare_allocations", "format_comparison"]
