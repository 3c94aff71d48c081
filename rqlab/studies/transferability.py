"""Notebook 01: do adversarial examples transfer across precisions? (Double-Win Quant,
Fu et al., ICML 2021; METHODS section 2.)

One attack x inference precision matrix per model (`analysis.sweeps.transfer_in_batches`):
rows are the precisions the white-box attack is crafted at (+ an EOT-PGD row over the whole
set), columns the precisions the model is evaluated at (+ a random-precision-inference
column); cells are robust accuracy on `n_examples` test images.

    >>> params = Params(model="fmnist-q4-pgd7-small", bits=[2, 4, 8, 32], n_examples=64)
    >>> results = run(params)                    # {"models": {label: matrix}, "gap": ..., ...}
    >>> fig = plot_matrices(results); print(reading(results))
"""
from __future__ import annotations

from dataclasses import dataclass

from ..extras import require
from ..validate import RqlabError, check_int
from . import common
from . import params as P
from .common import Results, write_results


@dataclass(frozen=True)
class Params(common.StudyParams):
    """The parameters of notebook 01 (its parameters cell), validated at construction.

    model: a zoo name or checkpoint path, a list of them, or {label: spec}: one matrix each.
    bits: attack and inference precisions (at least two; 32 = FP), each supported by every
        model (checked by `load_inputs`). attack: pgd | fgsm | cw, `steps` steps at radius eps.
    eot: EOT-PGD gradient samples per step of the "eot" row (0: no eot row and no rpi column).
    passes: stochastic forward passes scoring the "rpi" column.
    """

    dataset: str = "fashion-mnist"
    model: object = "fmnist-q4-pgd7"
    bits: tuple = (3, 4, 5, 6, 7, 8, 32)
    attack: str = "pgd"
    eps: float = 0.1
    steps: int = 20
    eot: int = 10
    passes: int = 5
    n_examples: int = 200
    seed: int = 0
    device: str = "auto"
    output_dir: str = "../runs/notebooks/01_precision_transferability"
    interactive: bool = True

    def __post_init__(self):
        self._check_common()
        self._set("specs", P.check_model_specs(self.model, "model"))  # {label: zoo name or path}
        bits = P.check_bits_list(self.bits, "bits")
        if len(bits) < 2:
            raise RqlabError(f"bits={list(bits)}: a transfer matrix needs at least two precisions")
        self._set("bits", bits)
        self._set("eot", check_int(self.eot, "eot", 0))
        self._set("passes", check_int(self.passes, "passes", 1))

    def eot_policy(self):
        """The RandomPrecision of the eot row and rpi column (None when eot = 0)."""
        from .. import quant

        return quant.RandomPrecision(self.bits, seed=self.seed) if self.eot > 0 else None


def load_inputs(params: Params) -> common.Inputs:
    """The models (each checked to run at every precision of params.bits) and test images."""
    inputs = common.load_inputs(params, params.specs)
    for label, net in inputs.models.items():
        P.check_bits_supported(net, params.bits, "bits", label)
    return inputs


def run(params: Params, inputs: common.Inputs | None = None, log=print) -> Results:
    """Measure one transfer matrix per model and read it against the paper's.

    Returns {"diagonal_mean", "off_diagonal_mean", "gap", "gap_ci95", "verdict", "eot_mean", "rpi_mean",
    "reading" (each {label: value}), "n_examples", "bits", "threat", "models" ({label:
    {"spec", "row_labels", "col_labels", "matrix", "clean", "n", ...}}), "paper"}.
    """
    import torch

    from ..analysis import paper, readings
    from ..analysis.sweeps import transfer_in_batches

    inputs = inputs or load_inputs(params)
    log = log or (lambda *a: None)
    threat, eot_policy = params.threat(), params.eot_policy()
    eot_row = f"{params.eot} samples per step over {list(params.bits)}" if eot_policy else "off"
    log(f"threat: {threat}; EOT row: {eot_row}; {params.n_examples} test examples")
    torch.manual_seed(params.seed)
    tms = {}
    for label, net in inputs.models.items():
        tms[label] = transfer_in_batches(net, inputs.x, inputs.y, params.bits, threat, eot_policy=eot_policy,
                                         passes=params.passes, eot_samples=params.eot or None)
        log(f"{label}: done ({len(tms[label]['row_labels'])} attacks x {len(tms[label]['col_labels'])} "
            "inference settings)")
    read = {label: readings.transfer_reading(tm, n=tm["n"], paper=paper.DWQ_TRANSFER) for label, tm in tms.items()}
    results = {key: {k: r[key] for k, r in read.items()}
               for key in ("diagonal_mean", "off_diagonal_mean", "gap", "gap_ci95", "verdict", "eot_mean", "rpi_mean")}
    results.update({"n_examples": params.n_examples, "bits": list(params.bits), "threat": threat.to_dict(),
                    "models": {k: {"spec": inputs.specs[k], **tm} for k, tm in tms.items()},
                    "reading": {k: r["text"] for k, r in read.items()}, "paper": paper.DWQ_TRANSFER})
    results["machine"] = common.machine(inputs.device)
    return Results(results, models=inputs.models)


# ---- figures and reading ------------------------------------------------------------------

def _heatmap(ax, matrix, rows, cols, title):
    plt = require("matplotlib.pyplot", "notebooks")
    import numpy as np
    sns = require("seaborn", "notebooks")

    sns.heatmap(100 * np.array(matrix, dtype=float), annot=True, fmt=".0f", vmin=0, vmax=100, cmap="viridis",
                cbar=False, square=True, xticklabels=cols, yticklabels=rows, ax=ax, annot_kws={"fontsize": 8})
    ax.set(xlabel="inference precision", ylabel="attack precision", title=title)
    for i, r in enumerate(rows):  # outline the diagonal: attack and inference at the same precision
        if r in cols:
            ax.add_patch(plt.Rectangle((cols.index(r), i), 1, 1, fill=False, edgecolor="white", lw=2))


def plot_matrices(results: dict):
    """The main figure: one heatmap per model (rows attack, columns inference), the paper's last."""
    plt = require("matplotlib.pyplot", "notebooks")

    tms, threat, table = results["models"], results["threat"], results["paper"]
    panels = len(tms) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.4))
    for ax, (label, tm) in zip(axes, tms.items()):
        _heatmap(ax, tm["matrix"], tm["row_labels"], tm["col_labels"],
                 f"{label}\nrobust acc. (%), {threat['attack']}-{threat['steps']}, eps={threat['eps']:g}, n={tm['n']}")
    _heatmap(axes[-1], table["matrix"], table["row_labels"], table["col_labels"],
             "paper: CIFAR-10, PreActResNet-18\n4-bit PGD-7, PGD-20 eps 8/255")
    return common.finish(fig, results)


def plot_clean(results: dict):
    """Clean accuracy at each inference setting, per model (the ceiling of every column)."""
    plt = require("matplotlib.pyplot", "notebooks")

    fig, ax = plt.subplots(figsize=(5.5, 3))
    for label, tm in results["models"].items():
        ax.plot(tm["col_labels"], [100 * c for c in tm["clean_accuracy"]], "o-", label=label)
    ax.set(xlabel="inference precision", ylabel="clean accuracy (%)", ylim=(0, 100),
           title="clean accuracy per column")
    ax.legend(fontsize=8)
    return common.finish(fig, results)


def reading(results: dict) -> str:
    """The generated reading (`analysis.readings.transfer_reading`), one paragraph per model."""
    return "\n\n".join(f"{label}:\n  {text}" for label, text in results["reading"].items())


def explorer(params: Params, inputs: common.Inputs, results: Results | None = None):
    """With params.interactive: the white-box robust accuracy at one precision, recomputed on
    64 test examples for a chosen model, precision and eps (None otherwise)."""
    return common.explorer(params, inputs.models, inputs.x, inputs.y,
                           title=f"white-box {params.attack}-{params.steps} at one precision, {{k}} examples")


__all__ = ["Params", "load_inputs", "run", "plot_matrices", "plot_clean", "reading", "explorer", "write_results"]
