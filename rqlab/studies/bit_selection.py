"""Notebook 03: Lipschitz-guided, layer-wise bit selection (after Song, Ranjan & Li, arXiv
2110.12308; METHODS section 4; the sensitivity is rqlab's construction, `rqlab.bitselect`).

Per-layer sensitivities S_l(b), the exact knapsack allocation at each budget (average
weight bits) against uniform, random and reverse allocations, each attacked white-box at
its own mixed precision (`bitselect.compare_allocations`). Opt-in baselines (add them to
`methods`): "hessian" (HAWQ-v2 trace-weighted weight error) and "margin" (logit-margin
drop at adversarial inputs), both measured on `sens_n` training images.

    >>> params = Params(model="fmnist-fp-pgd7-small", budgets=[3.0, 4.0], random_seeds=1, iters=30)
    >>> results = run(params)
    >>> fig = plot_budgets(results); print(reading(results))
"""
from __future__ import annotations

from dataclasses import dataclass

from ..extras import require
from .. import bitselect as BS
from ..validate import RqlabError, check_int
from . import common
from . import params as P
from .common import Results, write_results


@dataclass(frozen=True)
class Params(common.StudyParams):
    """The parameters of notebook 03 (its parameters cell), validated at construction.

    model: an adversarially trained model without switchable BN (zoo name or checkpoint).
    bits: bit options per layer (2..16; 32 keeps a layer FP); budgets: in parameter-weighted
    average weight bits, each >= the cheapest option; methods: out of lipschitz, uniform,
    random, reverse, hessian, margin; random_seeds: random allocations per budget; iters:
    power-iteration steps per operator norm; sens_n: training images (seeded subset) of
    the hessian and margin tables; hessian_probes: Hutchinson probes (>= 2).
    """

    dataset: str = "fashion-mnist"
    model: str = "fmnist-fp-pgd7"
    bits: tuple = (2, 3, 4, 5, 6, 8)
    budgets: tuple = (3.0, 4.0, 5.0, 6.0)
    methods: tuple = ("lipschitz", "uniform", "random", "reverse")
    random_seeds: int = 3
    iters: int = 300
    sens_n: int = 256
    hessian_probes: int = 16
    attack: str = "pgd"
    eps: float = 0.1
    steps: int = 20
    n_examples: int = 200
    seed: int = 0
    device: str = "auto"
    output_dir: str = "../runs/notebooks/03_bit_selection"
    interactive: bool = True

    def __post_init__(self):
        self._check_common()
        self._set("model", P.check_model_spec(self.model, "model"))
        bits = BS.check_bits_options(P.check_bits_list(self.bits, "bits"), "bits")
        self._set("bits", bits)
        budgets = sorted(P.check_floats(self.budgets, "budgets", 0.0, lo_open=True))
        if budgets[0] < bits[0]:
            raise RqlabError(f"budgets={budgets}: {budgets[0]:g} is below the cheapest allocation (every layer at "
                             f"{bits[0]} bits, average {bits[0]}): use budgets >= {bits[0]}")
        self._set("budgets", tuple(budgets))
        self._set("methods", tuple(P.check_choices(self.methods, "methods", BS.METHODS)))
        self._set("random_seeds", check_int(self.random_seeds, "random_seeds", 1))
        self._set("iters", check_int(self.iters, "iters", 1))
        self._set("sens_n", P.check_n_examples(self.sens_n, self.dataset, "train", "sens_n"))
        self._set("hessian_probes", check_int(self.hessian_probes, "hessian_probes", 2))


def load_inputs(params: Params) -> common.Inputs:
    """The model (checked to run at every option of params.bits, without switchable BN)
    and the test images; models = {params.model: model}."""
    inputs = common.load_inputs(params, {params.model: params.model})
    net = inputs.models[params.model]
    P.check_bits_supported(net, params.bits, "bits", params.model)
    BS.cost_table(net, params.bits)  # the quantizable layers; refuses switchable-BN models
    return inputs


def run(params: Params, inputs: common.Inputs | None = None, log=print) -> Results:
    """Sensitivities, then every method's allocation at every budget, attacked white-box.

    Returns {"robust_accuracy", "clean_accuracy" ({method: [mean per budget]}), "budgets",
    "budget_met", "lipschitz_wins", "lipschitz_gain_mean", "lipschitz_gain_ci95", "n_examples", "bits", "model",
    "threat", "allocations" (compare_allocations rows), "sensitivity", "reading"}.
    """
    import torch

    from ..analysis import readings

    inputs = inputs or load_inputs(params)
    log = log or (lambda *a: None)
    net = inputs.models[params.model]
    threat = params.threat()
    torch.manual_seed(params.seed)
    sens = BS.sensitivities(net, params.bits, iters=params.iters)
    tables = baseline_tables(params, net, threat)
    rows = BS.compare_allocations(net, (inputs.x, inputs.y), threat, list(params.budgets), params.bits,
                                  kind="avg_bits", methods=list(params.methods), n=None,
                                  random_seeds=params.random_seeds, sensitivity=sens, seed=params.seed,
                                  tables=tables)
    log(BS.format_comparison(rows))
    read = (readings.allocation_reading(rows, n=params.n_examples)
            if {"lipschitz", "uniform"} <= set(params.methods) else None)

    def summary(key):
        return {m: [_mean([r[key] for r in rows if r["method"] == m and r["budget"] == b]) for b in params.budgets]
                for m in params.methods}

    results = {
        "robust_accuracy": summary("robust_accuracy"),
        "clean_accuracy": summary("clean_accuracy"),
        "budgets": list(params.budgets),
        "budget_met": all(r["cost"] <= r["budget"] + 1e-9 for r in rows),
        "lipschitz_wins": read["wins"] if read else None,
        "lipschitz_gain_mean": read["gain_mean"] if read else None,
        "lipschitz_gain_ci95": read["gain_mean_ci95"] if read else None,
        "lipschitz_gain_paired": read["paired"] if read else None,   # intervals paired on the same examples
        "n_examples": params.n_examples,
        "bits": list(params.bits),
        "model": params.model,
        "threat": threat.to_dict(),
        "allocations": rows,
        "sensitivity": sens.to_dict(),
        "baseline_sensitivity": {m: t.to_dict() for m, t in tables.items()},
        "reading": read["text"] if read else None,
    }
    results["machine"] = common.machine(inputs.device)
    return Results(results, models={m: net for m in params.methods}, objects={"sensitivity": sens, **tables})


def baseline_tables(params: Params, net, threat) -> dict:
    """{"hessian": ..., "margin": ...} for the baselines in params.methods, measured on the
    first `sens_n` images of the seeded training subset (not the test images attacked)."""
    wanted = [m for m in ("hessian", "margin") if m in params.methods]
    if not wanted:
        return {}
    from .. import data

    ds = data.load(params.dataset, "train", n=params.sens_n, seed=params.seed)
    p = next(net.parameters())
    train = (ds.x.float().div(255).to(p.device), ds.y.to(p.device))
    tables = {}
    if "hessian" in wanted:
        tables["hessian"] = BS.hessian_sensitivities(net, train, params.bits, n=None,
                                                     n_probes=params.hessian_probes, seed=params.seed)
    if "margin" in wanted:
        tables["margin"] = BS.margin_sensitivities(net, train, threat, params.bits, n=None)
    return tables


def _mean(values) -> float:
    return float(sum(values) / len(values))


# ---- figures and reading ------------------------------------------------------------------

STYLE = {"lipschitz": ("o", "-", 2.5), "uniform": ("s", "--", 1.5), "random": ("^", ":", 1.5),
         "reverse": ("v", "-.", 1.5), "hessian": ("D", "-", 1.5), "margin": ("P", "-", 1.5)}


def plot_budgets(results: dict):
    """The main figure: robust and clean accuracy against budget, one line per method (the
    random allocations' mean, their range shaded)."""
    plt = require("matplotlib.pyplot", "notebooks")
    import numpy as np

    rows, budgets, t = results["allocations"], results["budgets"], results["threat"]
    methods = list(results["robust_accuracy"])
    seeds = max(sum(1 for r in rows if r["method"] == "random" and r["budget"] == budgets[0]), 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, title in zip(axes, ["robust_accuracy", "clean_accuracy"],
                              [f"robust accuracy ({t['attack']}-{t['steps']}, eps={t['eps']:g})", "clean accuracy"]):
        for i, m in enumerate(methods):
            pts = [(b, [r[key] for r in rows if r["method"] == m and r["budget"] == b]) for b in budgets]
            b, mean, lo, hi = (np.array(v) for v in zip(*[(b, np.mean(v), min(v), max(v)) for b, v in pts if v]))
            marker, line, width = STYLE[m]
            ax.plot(b, 100 * mean, marker=marker, ls=line, lw=width, color=f"C{i}",
                    label=m + (f" (mean of {seeds})" if m == "random" else ""))
            if m == "random" and seeds > 1:
                ax.fill_between(b, 100 * lo, 100 * hi, color=f"C{i}", alpha=0.15)
        ax.set(xlabel="budget: average weight bits", ylabel="accuracy (%)",
               title=f"{title}, n={results['n_examples']}")
        ax.set_xticks(budgets)
        ax.legend(fontsize=8)
    return common.finish(fig, results)


def plot_allocations(results: dict):
    """Per-layer sensitivities S_l(b) (log10) and the bits each method chose at each budget."""
    plt = require("matplotlib.pyplot", "notebooks")
    import numpy as np
    sns = require("seaborn", "notebooks")

    rows, budgets, bits = results["allocations"], results["budgets"], results["bits"]
    methods, table = list(results["robust_accuracy"]), results["sensitivity"]["table"]
    names = list(table)
    fig, axes = plt.subplots(1, 1 + len(methods), figsize=(4 + 3 * len(methods), 3.2),
                             gridspec_kw={"width_ratios": [1.4] + [1] * len(methods)})
    S = np.log10(np.array([[table[n][str(b)] for b in bits] for n in names]))
    sns.heatmap(S, annot=True, fmt=".1f", xticklabels=[str(b) for b in bits], yticklabels=names, cmap="magma_r",
                ax=axes[0], cbar=False)
    axes[0].set(xlabel="bits", title="log10 S_l(b)")
    for ax, m in zip(axes[1:], methods):
        chosen = [next(r for r in rows if r["method"] == m and r["budget"] == b) for b in budgets]
        B = np.array([[r["bits"][n] for r in chosen] for n in names])
        sns.heatmap(B, annot=True, fmt="d", xticklabels=[f"{b:g}" for b in budgets],
                    yticklabels=names if m == methods[0] else False, cmap="crest", vmin=min(bits), vmax=max(bits),
                    ax=ax, cbar=False)
        ax.set(xlabel="budget", title=f"{m}" + (" (seed 0)" if m == "random" else ""))
    return common.finish(fig, results)


def reading(results: dict) -> str:
    """`readings.allocation_reading`'s text (lipschitz against uniform) and whether every
    allocation met its budget."""
    text = results["reading"] or "The reading needs both the lipschitz and the uniform methods."
    return f"{text}\nEvery allocation meets its budget: {results['budget_met']}."


def explorer(params: Params, inputs: common.Inputs, results: Results):
    """With params.interactive: pick a method ("model" menu), a budget in average weight
    bits ("bits" slider) and an eps; the allocation is chosen for that budget and attacked
    white-box at its mixed precision on 64 test examples (None otherwise)."""
    from .. import quant

    net, sens = inputs.models[params.model], results.objects["sensitivity"]

    def allocation(method, budget):
        return quant.PerLayer(BS.select_bits(net, float(budget), params.bits, method=method, seed=params.seed,
                                             sensitivity=results.objects.get(method, sens)).bits)

    options = [b for b in params.bits if b != 32]
    return common.explorer(params, {m: net for m in params.methods}, inputs.x, inputs.y, policy=allocation,
                           bits=options, start_bits=4 if 4 in options else None,
                           title=f"{params.model}: allocation at a budget of b average bits, "
                                 f"{params.attack}-{params.steps}, {{k}} examples")


__all__ = ["Params", "load_inputs", "run", "baseline_tables", "plot_budgets", "plot_allocations", "reading", "explorer",
           "write_results"]
