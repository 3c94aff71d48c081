"""Notebook 02: error amplification, Lipschitz control and Defensive Quantization (Lin,
Gan, Han, ICLR 2019; METHODS section 3).

Three models (FP, vanilla w32a4, DQ w32a4): D_l per layer at adversarial inputs
(`analysis.sweeps.amplification`), clean and adversarial accuracy against activation bits,
per-layer Lipschitz estimates; and DQ's beta trained live, one SmallCNN per beta through
`rqlab.train` (`analysis.sweeps.beta_sweep`), or read from trained models (`sweep_models`,
e.g. the zoo's full-budget DQ models at three betas).

    >>> params = Params(bits=[1, 2, 4, 8, 32], betas=[0.0], train_n=256, epochs=1)
    >>> results = run(params)
    >>> fig = plot_amplification(results); print(reading(results)); print(beta_reading(results))
"""
from __future__ import annotations

from dataclasses import dataclass

from ..extras import require
from ..validate import RqlabError, check_choice, check_float, check_int
from . import common
from . import params as P
from .common import Results, write_results

LIVE_POLICY = "w32a4"   # the live DQ models' precision: the zoo's vanilla and DQ setting
CLAIM_BITS = 4          # activation bits at which DQ is compared with vanilla quantization (dq_vs_vanilla)


@dataclass(frozen=True)
class Params(common.StudyParams):
    """The parameters of notebook 02 (its parameters cell), validated at construction.

    model, fp_model, vanilla_model: the DQ, FP and vanilla quantized models (zoo names or
        checkpoint paths). bits: activation bits of the accuracy sweep (weights FP; 32 =
        FP), each supported by every model (checked by `load_inputs`).
    craft_on: x_adv for D_l crafted on "each" model at its own precision or once on "fp".
    beta: the DQ beta highlighted (trained live); betas: the live sweep (beta is added).
    train_n, epochs: training images and epochs of each live DQ model.
    sweep_models: trained models (zoo names or checkpoints, trained with defense "dq" or
        "natural" = beta 0) that make the sweep instead of live training: their betas are
        read from their checkpoints, `betas`, `train_n` and `epochs` are then unused, and
        `beta` must be one of theirs. Empty (default): the live sweep.
    eps_curve: radii of the robust-accuracy-against-eps curve of the three models at their
        stored precisions (the run's attack, step by the default rule per eps); it shows
        where natural models sit on the 0% floor (at 0.1 on Fashion-MNIST) and where
        DQ's effect can show. Empty: no curve.
    """

    dataset: str = "fashion-mnist"
    model: str = "fmnist-dq-natural"
    fp_model: str = "fmnist-fp-natural"
    vanilla_model: str = "fmnist-a4-natural"
    bits: tuple = (1, 2, 3, 4, 5, 6, 7, 8, 32)
    attack: str = "pgd"
    eps: float = 0.1
    steps: int = 20
    eps_curve: tuple = (0.01, 0.02, 0.03, 0.05, 0.1)
    craft_on: str = "each"
    beta: float = 0.003
    betas: tuple = (0.0, 0.0003, 0.001, 0.003, 0.01)
    train_n: int = 1000
    epochs: int = 2
    sweep_models: tuple = ()
    n_examples: int = 200
    seed: int = 0
    device: str = "auto"
    output_dir: str = "../runs/notebooks/02_lipschitz_error_amplification"
    interactive: bool = True

    def __post_init__(self):
        self._check_common()
        self._set("specs", {"FP": P.check_model_spec(self.fp_model, "fp_model"),
                            "vanilla": P.check_model_spec(self.vanilla_model, "vanilla_model"),
                            "DQ": P.check_model_spec(self.model, "model")})
        self._set("bits", P.check_bits_list(self.bits, "bits"))
        check_choice(self.craft_on, "craft_on", ["each", "fp"])
        self._set("beta", check_float(self.beta, "beta", 0.0))
        self._set("betas", tuple(P.check_floats(self.betas, "betas", 0.0, allow_empty=True)))
        info = P.check_dataset(self.dataset)
        self._set("train_n", check_int(self.train_n, "train_n", 1, info.sizes["train"]))
        self._set("epochs", check_int(self.epochs, "epochs", 1))
        if isinstance(self.sweep_models, str) or not isinstance(self.sweep_models, (list, tuple)):
            raise RqlabError(f"sweep_models={self.sweep_models!r} must be a list of zoo names or checkpoint paths "
                             "(empty: train the sweep live)")
        self._set("sweep_models", tuple(P.check_model_spec(s, f"sweep_models[{i}]")
                                        for i, s in enumerate(self.sweep_models)))
        self._set("eps_curve", tuple(sorted(set(P.check_floats(self.eps_curve, "eps_curve", 0.0, 1.0, lo_open=True,
                                                               allow_empty=True)))))

    @property
    def sweep_betas(self) -> list[float]:
        """The betas trained live: betas and beta, sorted, each once."""
        return sorted(set(self.betas) | {self.beta})


def trained_beta(spec: str, field: str = "sweep_models") -> float:
    """The DQ beta model `spec` was trained with, from its checkpoint's training hooks:
    beta for defense "dq", 0 for "natural"; RqlabError for any other training."""
    from .. import checkpoint, zoo

    hooks = checkpoint.load(zoo.weights_file(spec)).get("hooks") or {}
    name, config = hooks.get("name"), hooks.get("config") or {}
    if name == "dq" and "beta" in config:
        return float(config["beta"])
    if name == "natural":
        return 0.0
    raise RqlabError(f"{field}: {spec} was trained with defense {name!r}: the beta sweep takes models trained "
                     "with dq or natural (beta 0)")


def sweep_of_models(params: Params, x, y, threat, device, log=print) -> tuple[list[dict], dict]:
    """The beta sweep from params.sweep_models (one row each, `sweeps.beta_row`, at
    LIVE_POLICY, sorted by beta): (rows, {beta: model}). Two models with one beta, or a
    `beta` none of them has, is an RqlabError naming the field."""
    from .. import quant
    from ..analysis import sweeps
    from ..zoo import load

    betas = {}
    for i, spec in enumerate(params.sweep_models):
        b = trained_beta(spec, f"sweep_models[{i}]")
        if b in betas:
            raise RqlabError(f"sweep_models: {betas[b][0]} and {spec} were both trained with beta={b:g}")
        betas[b] = (spec, load(spec, device=device))
    if params.beta not in betas:
        raise RqlabError(f"beta={params.beta:g} is none of the sweep models' betas: choose one of "
                         f"{', '.join(f'{b:g}' for b in sorted(betas))}")
    policy = quant.parse_policy(LIVE_POLICY)
    rows = []
    for b in sorted(betas):
        spec, model = betas[b]
        rows.append({**sweeps.beta_row(b, model, (x, y), threat, policy), "model": spec})
        log(f"beta={b:g}: {spec}")
    return rows, {b: m for b, (_, m) in betas.items()}


def load_inputs(params: Params) -> common.Inputs:
    """The three models (each checked to run at every activation precision of params.bits)
    and the test images."""
    inputs = common.load_inputs(params, params.specs)
    for label, net in inputs.models.items():
        P.check_bits_supported(net, params.bits, "bits", f"{label} model ({params.specs[label]})")
    return inputs


def run(params: Params, inputs: common.Inputs | None = None, log=print, progress: bool | None = None) -> Results:
    """Amplification, accuracy against activation bits and Lipschitz estimates of the three
    models, and the live beta sweep. progress: tqdm bars while training (default:
    params.interactive).

    Returns {"amplification_logits", "robust_accuracy_at_stored_precision", "lipschitz_bound",
    "local_lipschitz_mean" (each {label: value}), "beta", "beta_row", "n_examples", "bits",
    "craft_on", "models", "precision", "amplification", "accuracy_vs_bits", "accuracy_vs_eps"
    ({label: rows of `sweeps.accuracy_vs_eps`}, {} without eps_curve), "lipschitz",
    "beta_sweep", "threat", "dq_vs_vanilla" (`readings.dq_comparison` at CLAIM_BITS), "reading"
    ({"amplification", "beta"})}; `.models` holds the three
    models and the live DQ model at beta.
    """
    import torch

    from .. import data, quant
    from ..analysis import readings, sweeps

    inputs = inputs or load_inputs(params)
    log = log or (lambda *a: None)
    nets, x, y = inputs.models, inputs.x, inputs.y
    threat = params.threat()
    precision = {k: str(quant.current(net)) for k, net in nets.items()}
    log(f"threat: {threat}; stored precisions: {precision}; {params.n_examples} test examples")
    torch.manual_seed(params.seed)
    adv = sweeps.craft_all(nets, x, y, threat, craft_on={"each": "each", "fp": "FP"}[params.craft_on])
    amp = sweeps.amplification(nets, x, adv)
    acc = {k: sweeps.accuracy_vs_bits(net, (x, y), threat, params.bits, act_only=True) for k, net in nets.items()}
    lip = sweeps.lipschitz_table(nets, x, adv)
    eps_curve = {k: sweeps.accuracy_vs_eps(net, (x, y), threat, list(params.eps_curve)) for k, net in nets.items()} \
        if params.eps_curve else {}
    if params.sweep_models:
        log("amplification, accuracy against bits and Lipschitz estimates done; the beta sweep from "
            f"{len(params.sweep_models)} trained models")
        beta_rows, live = sweep_of_models(params, x, y, threat, inputs.device, log)
    else:
        log(f"amplification, accuracy against bits and Lipschitz estimates done; training betas {params.sweep_betas}")
        train_set = data.load(params.dataset, "train", n=params.train_n, seed=params.seed)
        beta_rows, live = sweeps.beta_sweep(params.sweep_betas, train_set, (x, y), threat,
                                            policy=quant.parse_policy(LIVE_POLICY), epochs=params.epochs,
                                            seed=params.seed, device=str(inputs.device),
                                            progress=params.interactive if progress is None else progress)
    at_stored = {k: next((r["robust_accuracy"] for r in acc[k]
                          if str(sweeps.precision(r["bits"], True)) == precision[k]), None)
                 for k in nets}   # None when `bits` leaves out the model's own precision
    results = {
        "amplification_logits": {k: a["amplification"][-1] for k, a in amp.items()},
        "robust_accuracy_at_stored_precision": at_stored,
        "lipschitz_bound": {k: t["bound"] for k, t in lip.items()},
        "local_lipschitz_mean": {k: t["local_mean"] for k, t in lip.items()},
        "beta": params.beta,
        "beta_row": next(r for r in beta_rows if r["beta"] == params.beta),
        "n_examples": params.n_examples,
        "bits": list(params.bits),
        "craft_on": params.craft_on,
        "models": dict(inputs.specs),
        "precision": precision,
        "amplification": amp,
        "accuracy_vs_bits": acc,
        "accuracy_vs_eps": eps_curve,
        "lipschitz": lip,
        "beta_sweep": beta_rows,
        "beta_source": "models" if params.sweep_models else "live",
        "threat": threat.to_dict(),
        # Defensive Quantization's claim at the zoo models' precision (w32a4): None without 4 in bits
        "dq_vs_vanilla": readings.dq_comparison(acc, amp, params.n_examples, bits=CLAIM_BITS),
        "reading": {"amplification": readings.amplification_reading(amp)["text"],
                    "beta": readings.beta_reading(beta_rows, n=params.n_examples)["text"]},
    }
    label = "DQ" if params.sweep_models else "live DQ"
    results["machine"] = common.machine(inputs.device)
    return Results(results, models={**nets, f"{label} beta={params.beta:g}": live[params.beta]})


# ---- figures and readings -------------------------------------------------------------------

def plot_amplification(results: dict):
    """The main figure: D_l per layer (left), clean and adversarial accuracy against
    activation bits (right)."""
    plt = require("matplotlib.pyplot", "notebooks")

    from ..explore import bits_label

    amp, acc, t = results["amplification"], results["accuracy_vs_bits"], results["threat"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, a in amp.items():
        a1.plot(range(len(a["layers"])), a["amplification"], "o-", label=f"{k} ({results['precision'][k]})")
    a1.set_xticks(range(len(a["layers"])), a["layers"], rotation=30)
    source = "per model" if results["craft_on"] == "each" else "from FP"
    a1.set(xlabel="layer (output before BN/ReLU)", ylabel="D_l = ||a(x_adv) - a(x)|| / ||a(x)||",
           title=f"error amplification, {t['attack']}-{t['steps']} eps={t['eps']:g}, x_adv {source}")
    a1.legend(fontsize=8)
    xs = [bits_label(b) for b in results["bits"]]
    for i, (k, rows) in enumerate(acc.items()):
        a2.plot(xs, [100 * r["robust_accuracy"] for r in rows], "o-", color=f"C{i}", label=f"{k}: adversarial")
        a2.plot(xs, [100 * r["clean_accuracy"] for r in rows], "s--", color=f"C{i}", alpha=0.5, label=f"{k}: clean")
    a2.set(xlabel="activation bits (weights FP)", ylabel="accuracy (%)", ylim=(0, 100),
           title=f"accuracy against activation bits, n={results['n_examples']}")
    a2.legend(fontsize=7, ncol=2)
    return common.finish(fig, results)


def plot_eps(results: dict):
    """Robust accuracy against eps of the three models at their stored precisions (clean
    accuracy dashed), the run's eps marked; None when the run had no eps_curve."""
    curve = results.get("accuracy_vs_eps") or {}
    if not curve:
        return None
    plt = require("matplotlib.pyplot", "notebooks")

    t = results["threat"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, (k, rows) in enumerate(curve.items()):
        eps = [r["eps"] for r in rows]
        ax.plot(eps, [100 * r["robust_accuracy"] for r in rows], "o-", color=f"C{i}",
                label=f"{k} ({results['precision'][k]})")
        ax.axhline(100 * rows[0]["clean_accuracy"], color=f"C{i}", ls="--", lw=0.8, alpha=0.5)
    ax.axvline(t["eps"], color="gray", ls=":", lw=1, label=f"this run's eps {t['eps']:g}")
    ax.set(xlabel="eps (linf)", ylabel="robust accuracy (%)", ylim=(0, 100),
           title=f"robust accuracy against eps, {t['attack']}-{t['steps']}, n={results['n_examples']} "
                 "(clean dashed)")
    ax.legend(fontsize=8)
    return common.finish(fig, results)


def plot_lipschitz(results: dict):
    """Per-layer Lipschitz estimates (float weights): conv/linear operator norms, BN and
    input scales; their product is the network bound."""
    plt = require("matplotlib.pyplot", "notebooks")
    import numpy as np

    lip = results["lipschitz"]
    names = [r["name"] for r in next(iter(lip.values()))["layers"]]
    fig, ax = plt.subplots(figsize=(9, 3.4))
    w = 0.8 / len(lip)
    for i, (k, t) in enumerate(lip.items()):
        ax.bar(np.arange(len(names)) + i * w, [r["lipschitz"] for r in t["layers"]], w,
               label=f"{k}: bound {t['bound']:.3g}, local {t['local_mean']:.3g}")
    ax.set_xticks(np.arange(len(names)) + w * (len(lip) - 1) / 2, names, rotation=30)
    ax.set(yscale="log", ylabel="Lipschitz estimate", title="per-layer Lipschitz estimates (product = network bound)")
    ax.legend(fontsize=8)
    return common.finish(fig, results)


def plot_beta(results: dict):
    """Orthogonality penalty, network Lipschitz bound and accuracy against beta (beta = 0
    drawn at the left edge of the log axes)."""
    plt = require("matplotlib.pyplot", "notebooks")

    rows, beta = results["beta_sweep"], results["beta"]
    floor = min([r["beta"] for r in rows if r["beta"] > 0] or [1e-3]) / 10
    xb = [r["beta"] or floor for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, label in zip(axes[:2], ["orthogonality", "bound"],
                              ["orthogonality penalty", "network Lipschitz bound"]):
        ax.plot(xb, [r[key] for r in rows], "o-")
        ax.set(xscale="log", yscale="log", xlabel="beta (0 drawn at the left edge)", ylabel=label, title=label)
    axes[2].plot(xb, [100 * r["robust_accuracy"] for r in rows], "o-", label="adversarial")
    axes[2].plot(xb, [100 * r["clean_accuracy"] for r in rows], "s--", label="clean")
    axes[2].set(xscale="log", xlabel="beta", ylabel="accuracy (%)", ylim=(0, 100),
                title=f"accuracy at {LIVE_POLICY}, n={results['n_examples']}")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.axvline(beta or floor, color="gray", ls=":", lw=1)
    return common.finish(fig, results)


def reading(results: dict) -> str:
    """Amplification (`readings.amplification_reading`), the accuracy drop per activation
    precision and the Lipschitz estimates, from the measured numbers."""
    from ..explore import bits_label

    lines = [results["reading"]["amplification"]]
    for k, rows in results["accuracy_vs_bits"].items():
        drop = {bits_label(r["bits"]): round(100 * (r["clean_accuracy"] - r["robust_accuracy"]), 1) for r in rows}
        lines.append(f"{k}: clean minus adversarial accuracy (points) per activation precision: {drop}")
    for k, t in results["lipschitz"].items():
        lines.append(f"{k}: network bound {t['bound']:.4g}; empirical local ratio at x_adv: "
                     f"mean {t['local_mean']:.4g}, max {t['local_max']:.4g}")
    return "\n".join(lines)


def beta_reading(results: dict) -> str:
    """One line per live DQ model, then `readings.beta_reading`'s text."""
    lines = [f"beta={r['beta']:<7g} orthogonality {r['orthogonality']:9.4g}  bound {r['bound']:9.4g}  "
             f"clean {100 * r['clean_accuracy']:5.1f}%  adversarial {100 * r['robust_accuracy']:5.1f}%  "
             + (f"({r['time_s']:.1f}s)" if r.get("time_s") is not None else f"({r.get('model', 'trained')})")
             for r in results["beta_sweep"]]
    return "\n".join(lines + ["", results["reading"]["beta"]])


def explorer(params: Params, inputs: common.Inputs, results: Results):
    """With params.interactive: clean and adversarial accuracy of the three models and the
    live DQ model at beta, at a chosen activation precision (weights FP) and eps, on 64
    test examples (None otherwise)."""
    from ..analysis import sweeps

    return common.explorer(params, results.models, inputs.x, inputs.y,
                           policy=lambda name, b: sweeps.precision(b, act_only=True),
                           start_bits=4 if 4 in params.bits else None,
                           title=f"activation bits (weights FP), white-box {params.attack}-{params.steps}, "
                                 "{k} examples")


__all__ = ["Params", "load_inputs", "run", "trained_beta", "sweep_of_models", "plot_amplification", "plot_eps", "plot_lipschitz", "plot_beta", "reading",
           "beta_reading", "explorer", "write_results", "LIVE_POLICY", "CLAIM_BITS"]
