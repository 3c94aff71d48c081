"""Notebook 05: Double-Win Quant, random precision and what survives adaptive attacks (Fu
et al., ICML 2021; METHODS sections 2 and 6).

Three configurations (FP; RPI: a fixed-precision model run with RandomPrecision(bits);
RPI+RPT: the switchable-BN model run the same way) scored under the paper's protocol and
under adaptive attacks (`analysis.adaptive.evaluate_protocols`), with BitOPs.

    >>> params = Params(eot=2, passes=2, aa_n_iter=3, n_examples=32, steps=3)
    >>> results = run(params)              # {"scores": {config: {protocol: {...}}}, ...}
    >>> fig = plot_scores(results); print(reading(results))
"""
from __future__ import annotations

from dataclasses import dataclass

from ..extras import require
from ..analysis import adaptive as A
from ..validate import check_int
from . import common
from . import params as P
from .common import Results, write_results


@dataclass(frozen=True)
class Params(common.StudyParams):
    """The parameters of notebook 05 (its parameters cell), validated at construction.

    model, fp_model, rpi_model: the RPI+RPT, FP and RPI models (zoo names or checkpoints).
    bits: the random precision set of both random configurations, supported by their
    models (checked by `load_inputs`). adaptive: out of eot_pgd, expectation, autoattack
    (empty: the paper's protocol only). eot: EOT-PGD samples per step; passes: stochastic
    passes scoring a random configuration; aa_n_iter: AutoAttack APGD iterations (100 is
    the reference); aa_n_examples: AutoAttack runs on the first N test examples.
    """

    dataset: str = "fashion-mnist"
    model: str = "fmnist-rpt-pgd7"
    fp_model: str = "fmnist-fp-pgd7"
    rpi_model: str = "fmnist-q8-pgd7"
    bits: tuple = (4, 5, 6, 7, 8)
    attack: str = "pgd"
    adaptive: tuple = ("eot_pgd", "expectation", "autoattack")
    eot: int = 10
    passes: int = 5
    aa_n_iter: int = 25
    aa_n_examples: int = 100
    eps: float = 0.1
    steps: int = 20
    n_examples: int = 200
    seed: int = 0
    device: str = "auto"
    output_dir: str = "../runs/notebooks/05_double_win_quant"
    interactive: bool = True

    def __post_init__(self):
        self._check_common()
        self._set("specs", {"FP": P.check_model_spec(self.fp_model, "fp_model"),
                            "RPI": P.check_model_spec(self.rpi_model, "rpi_model"),
                            "RPI+RPT": P.check_model_spec(self.model, "model")})
        self._set("bits", P.check_bits_list(self.bits, "bits"))
        self._set("adaptive", tuple(P.check_choices(self.adaptive, "adaptive", A.ADAPTIVE) if self.adaptive else ()))
        self._set("eot", check_int(self.eot, "eot", 1))
        self._set("passes", check_int(self.passes, "passes", 1))
        self._set("aa_n_iter", check_int(self.aa_n_iter, "aa_n_iter", 1))
        self._set("aa_n_examples", check_int(self.aa_n_examples, "aa_n_examples", 1))

    def policies(self) -> dict:
        """{config: the defender's precision}: FP, and RandomPrecision(bits) for RPI and RPI+RPT."""
        from .. import quant

        return {"FP": quant.Fixed(32), "RPI": quant.RandomPrecision(self.bits, seed=self.seed),
                "RPI+RPT": quant.RandomPrecision(self.bits, seed=self.seed)}

    @property
    def aa_reduced(self) -> bool:
        """AutoAttack runs with fewer iterations than the reference."""
        return "autoattack" in self.adaptive and self.aa_n_iter < A.AA_REFERENCE_ITERS


def load_inputs(params: Params) -> common.Inputs:
    """The three models (FP checked at 32 bits, the random configurations at every
    precision of params.bits) and the test images."""
    inputs = common.load_inputs(params, params.specs)
    P.check_bits_supported(inputs.models["FP"], [32], "the FP configuration", f"fp_model {params.specs['FP']}")
    for label in ("RPI", "RPI+RPT"):
        P.check_bits_supported(inputs.models[label], params.bits, "bits", f"{label} model {params.specs[label]}")
    return inputs


def run(params: Params, inputs: common.Inputs | None = None, log=print) -> Results:
    """Every configuration under the paper's protocol and each adaptive attack (AutoAttack
    on the first aa_n_examples), BitOPs, the gains reading, and the same-model control of
    each random configuration (its weights at the set's largest precision, same attacks).

    Returns {"robust_accuracy", "robust_worst_accuracy" ({config: {protocol: value}}),
    "clean_accuracy", "bitops" ({config: value}), "verdict", "paper_gain", "adaptive_gain",
    "strongest" ({config: ...} for the random configurations), "aa_n_iter",
    "aa_n_examples", "aa_reduced", "passes", "n_examples", "bits", "models", "policies",
    "scores" (`evaluate_protocols` records), "same_model" ({"RPI", "RPI+RPT"}: the same
    weights at Fixed(max(bits)), its scores and `readings.same_model_gain`), "reading", "paper"}.
    """
    import torch

    from .. import quant
    from ..analysis import paper, readings

    inputs = inputs or load_inputs(params)
    log = log or (lambda *a: None)
    x, y, policies = inputs.x, inputs.y, params.policies()
    aa_n = min(params.aa_n_examples, params.n_examples)
    if params.aa_reduced:
        log(f"NOTE: AutoAttack runs {params.aa_n_iter} APGD iterations instead of the reference "
            f"{A.AA_REFERENCE_ITERS}: a quick check of the wiring, not an AutoAttack evaluation.")
    torch.manual_seed(params.seed)
    scores, bitops = {}, {}
    common_args = dict(eps=params.eps, steps=params.steps, attack=params.attack, passes=params.passes,
                       seed=params.seed)
    for label, net in inputs.models.items():
        scores[label] = A.evaluate_protocols(net, policies[label], (x, y), eot=params.eot,
                                             adaptive=[p for p in params.adaptive if p != "autoattack"],
                                             **common_args)
        if "autoattack" in params.adaptive:  # on its own, smaller subset (aa_n_examples)
            scores[label]["autoattack"] = A.evaluate_protocols(
                net, policies[label], (x[:aa_n], y[:aa_n]), adaptive=["autoattack"], aa_n_iter=params.aa_n_iter,
                **common_args)["autoattack"]
        bitops[label] = quant.bitops(net, policies[label])
        log(f"{label:>8} ({policies[label]}): clean {100 * scores[label]['paper']['clean_accuracy']:5.1f}%  "
            + "  ".join(f"{p} {100 * s['robust_accuracy']:5.1f}% (worst {100 * s['robust_worst_accuracy']:5.1f}%)"
                        for p, s in scores[label].items())
            + f"  {bitops[label] / 1e6:.1f} M BitOPs")
    # The same-model control: each random configuration's weights at one fixed precision
    # (the largest of the set), under the same attacks; RPI's weights are fmnist-q8-pgd7's.
    control = quant.Fixed(max(params.bits))
    controls = {}
    for label in ("RPI", "RPI+RPT"):
        fixed = A.evaluate_protocols(inputs.models[label], control, (x, y), eot=params.eot,
                                     adaptive=[p for p in params.adaptive if p != "autoattack"], **common_args)
        if "autoattack" in params.adaptive:
            fixed["autoattack"] = A.evaluate_protocols(
                inputs.models[label], control, (x[:aa_n], y[:aa_n]), adaptive=["autoattack"],
                aa_n_iter=params.aa_n_iter, **common_args)["autoattack"]
        controls[label] = {"policy": str(control), "scores": fixed,
                           **readings.same_model_gain(scores[label], fixed)}
        log(f"{label:>8} control ({control}): {100 * controls[label]['fixed']:5.1f}% under its strongest attack "
            f"({controls[label]['fixed_strongest']}); random minus fixed {100 * controls[label]['gain']:+.1f} points")
    gains = readings.gains_reading(scores, baseline="FP", n=params.n_examples)
    results = {
        "robust_accuracy": {c: {p: s["robust_accuracy"] for p, s in scores[c].items()} for c in scores},
        "robust_worst_accuracy": {c: {p: s["robust_worst_accuracy"] for p, s in scores[c].items()} for c in scores},
        "clean_accuracy": {c: scores[c]["paper"]["clean_accuracy"] for c in scores},
        "bitops": bitops,
        "verdict": {c: g["verdict"] for c, g in gains["configs"].items()},
        "paper_gain": {c: g["paper_gain"] for c, g in gains["configs"].items()},
        "adaptive_gain": {c: g["adaptive_gain"] for c, g in gains["configs"].items()},
        "strongest": {c: g["strongest"] for c, g in gains["configs"].items()},
        "aa_n_iter": params.aa_n_iter,
        "aa_n_examples": aa_n if "autoattack" in params.adaptive else None,
        "aa_reduced": params.aa_reduced,
        "passes": params.passes,
        "n_examples": params.n_examples,
        "bits": list(params.bits),
        "models": dict(inputs.specs),
        "policies": {c: p.to_dict() for c, p in policies.items()},
        "scores": scores,
        "same_model": controls,
        "reading": gains["text"],
        "paper": paper.DWQ_ROBUST,
    }
    results["machine"] = common.machine(inputs.device)
    return Results(results, models=inputs.models)


# ---- figures and reading ------------------------------------------------------------------

def plot_scores(results: dict):
    """The main figure: robust accuracy per configuration and protocol (bars: mean over
    passes with 95% intervals; black ticks: worst case over passes), and BitOPs."""
    plt = require("matplotlib.pyplot", "notebooks")
    import numpy as np

    from ..quant import policy_from_dict

    scores, bitops = results["scores"], results["bitops"]
    cfgs = list(scores)
    protocols = list(scores[cfgs[0]])
    first = scores[cfgs[0]]["paper"]["threat"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2.2, 1]})
    w = 0.8 / len(protocols)
    for i, p in enumerate(protocols):
        xs = np.arange(len(cfgs)) + i * w
        mean = np.array([scores[c][p]["robust_accuracy"] for c in cfgs])
        ci = np.array([scores[c][p]["robust_ci95"] for c in cfgs])
        a1.bar(xs, 100 * mean, w, yerr=100 * np.abs(ci.T - mean), capsize=2,
               label=f"paper protocol ({first['attack']})" if p == "paper" else p, color=f"C{i}")
        a1.scatter(xs, [100 * scores[c][p]["robust_worst_accuracy"] for c in cfgs], marker="_", s=200, color="k", zorder=3,
                   label="worst case over passes" if i == 0 else None)
    a1.set_xticks(np.arange(len(cfgs)) + w * (len(protocols) - 1) / 2,
                  [f"{c}\n{policy_from_dict(results['policies'][c])}" for c in cfgs])
    a1.set(ylabel="robust accuracy (%)", ylim=(0, 100),
           title=f"eps={first['eps']:g}, {first['steps']} steps, n={results['n_examples']}, {results['passes']} passes "
                 "(random configurations)")
    a1.legend(fontsize=8, ncol=2)
    a2.bar(cfgs, [bitops[c] / 1e6 for c in cfgs], color="gray")
    for i, c in enumerate(cfgs):
        a2.text(i, bitops[c] / 1e6, f"{bitops[c] / 1e6:.1f}", ha="center", va="bottom", fontsize=8)
    a2.set(ylabel="M BitOPs per image", title="BitOPs (expected for random sets)")
    return common.finish(fig, results)


def reading(results: dict) -> str:
    """`readings.gains_reading`'s text, the paper's numbers beside it, and a note when
    AutoAttack ran reduced."""
    table = results["paper"]
    lines = [results["reading"], "",
             "Paper (CIFAR-10 PreActResNet-18, eps 8/255, non-adaptive): "
             + ", ".join(f"{k} {v}%" for k, v in table["pgd20"].items())
             + " | AutoAttack: " + ", ".join(f"{k} {v}%" for k, v in table["autoattack"].items())
             + " | GBitOPs: " + ", ".join(f"{k} {v}" for k, v in table["gbitops"].items())]
    if results["aa_reduced"]:
        lines += ["", f"AutoAttack ran with {results['aa_n_iter']} iterations instead of the reference "
                      f"{A.AA_REFERENCE_ITERS}: its numbers are an upper bound on what AutoAttack leaves."]
    return "\n".join(lines)


def explorer(params: Params, inputs: common.Inputs, results: Results | None = None):
    """With params.interactive: pick a configuration, a fixed precision or "rpi" (its own
    random set; FP for the FP configuration) and an eps; the paper-protocol attack is rerun
    on 64 test images, a random configuration scored with `passes` passes (None otherwise)."""
    from .. import quant

    policies = params.policies()
    threat = A.protocol_threats(quant.Fixed(32), params.eps, params.steps, params.attack, [],
                                seed=params.seed)["paper"]
    return common.explorer(params, inputs.models, inputs.x, inputs.y, threat=threat,
                           policy=lambda name, b: policies[name] if b == "rpi" else quant.Fixed(b),
                           passes=params.passes, bits=[*params.bits, "rpi"], start_bits="rpi",
                           title=f"paper protocol ({params.attack}-{params.steps}), {{k}} examples")


__all__ = ["Params", "load_inputs", "run", "plot_scores", "reading", "explorer", "write_results"]
