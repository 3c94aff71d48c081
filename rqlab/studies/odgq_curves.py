"""Notebook 04: ODG-Q training curves, robustness per unit of training time (Tao & Wong,
arXiv 2210.08701; METHODS section 5; `defenses.odgq` is rqlab's construction).

Per epoch: clean accuracy, robust accuracy and cumulative training time of natural
training, FGSM-RS, PGD-7 AT and ODG-Q at each precision of `bits`, from the zoo's
recorded histories (live=False, 4 bits) or trained here through `rqlab.train`, one
RunSpec per method (live=True).

    >>> params = Params(live=True, epochs=2, train_n=256, n_examples=32, steps=3)
    >>> results = run(params)                    # {"curves": {"4": {method: curve}}, ...}
    >>> fig = plot_curves(results); print(reading(results))
"""
from __future__ import annotations

from dataclasses import dataclass

from ..extras import require
from ..analysis.curves import curve_from_history, epoch_time_ratio
from ..validate import FP_BITS, RqlabError, check_bits, check_int
from . import common
from . import params as P
from .common import Results, write_results

METHOD_LABELS = {"natural": "natural", "fgsm-rs": "FGSM-RS", "pgd-at": "PGD-7 AT", "odgq": "ODG-Q"}
METHODS = tuple(METHOD_LABELS)
# The zoo's recipes with a per-epoch PGD-20 history, by training precision and method: the
# full-budget ones (issue 14), and the -small zoo's where it has all four methods. Notebook 04
# reads the full set at a precision once all four of its models are built, else the -small
# one (never a mix: the curves compare like with like), and its results say which.
ZOO_CURVES = {4: {"natural": "fmnist-q4-natural", "fgsm-rs": "fmnist-q4-fgsm-rs",
                  "pgd-at": "fmnist-q4-pgd7", "odgq": "fmnist-odgq-q4"},
              1: {"natural": "fmnist-bin-natural", "fgsm-rs": "fmnist-bin-fgsm-rs",
                  "pgd-at": "fmnist-bin-pgd7", "odgq": "fmnist-odgq-bin"}}
SMALL_CURVES = {4: {m: f"{name}-small" for m, name in ZOO_CURVES[4].items()}}


def zoo_curve_models(bits: int, methods=METHODS) -> dict[str, str]:
    """{method: zoo name} whose histories make the curves at `bits`: the full-budget models
    when all of `methods` are built, else the -small ones; RqlabError naming what to build
    when neither set is complete."""
    from .. import zoo

    methods = check_methods(methods)
    built = set(zoo.names(trained_only=True))
    for table in (ZOO_CURVES, SMALL_CURVES):
        names = {m: table[bits][m] for m in methods} if bits in table else None
        if names and set(names.values()) <= built:
            return names
    if bits not in ZOO_CURVES:
        raise RqlabError(f"the zoo has training curves of all four methods at {sorted(ZOO_CURVES)} bits only, "
                         f"not at bits={bits}: train them live (live=True, train_curves)")
    missing = [ZOO_CURVES[bits][m] for m in methods if ZOO_CURVES[bits][m] not in built]
    raise RqlabError(f"bits={bits}: the zoo's curves need {', '.join(missing)} (not built yet: `rqlab zoo build "
                     f"NAME`, or scripts/zoo_queue.py)" + (" or the -small set" if bits in SMALL_CURVES else "")
                     + "; or set live=True to train them here")


def zoo_machines(curves: dict) -> str:
    """Where the zoo's curves were measured: its cards' training machines ({bits: {method:
    curve}}, each curve's source "zoo NAME")."""
    from .. import zoo
    from ..machine import devices_line

    names = {c["source"].split(" ", 1)[1] for by_method in curves.values() for c in by_method.values()}
    return "the zoo's training: " + (devices_line(zoo.card(n)["device"] for n in sorted(names)) or "not recorded")


def zoo_eval_n(name: str) -> int:
    """Test images of zoo model `name`'s per-epoch PGD-20 (its recipe's eval_pgd)."""
    from .. import zoo

    return zoo.recipe(name).spec.eval_pgd


def check_methods(methods, field: str = "methods") -> list[str]:
    """A non-empty, duplicate-free list out of METHODS."""
    return P.check_choices(methods, field, METHODS)


@dataclass(frozen=True)
class Params(common.StudyParams):
    """The parameters of notebook 04 (its parameters cell), validated at construction.

    bits: training precisions (1 gives binary networks); live=False reads the zoo's
    histories (`zoo_curve_models`: full-budget models where built, else -small; 4 and 1
    bits only). methods: out of natural,
    fgsm-rs, pgd-at, odgq. epochs, train_n: live training. attack, steps, n_examples: the
    per-epoch robust accuracy of live runs (and the explorer's attack). cost_n, cost_reps:
    the controlled cost that judges the claim's "close to natural training's epoch time"
    (`analysis.cost.training_cost`: every method's recipe, zoo or live, trained for two
    epochs on cost_n training images, the second timed, cost_reps interleaved repetitions;
    cost_n=0: not measured, and the cost half of the claim is not judged).
    """

    dataset: str = "fashion-mnist"
    bits: tuple = (4,)
    methods: tuple = METHODS
    live: bool = False
    epochs: int = 4
    train_n: int = 2000
    attack: str = "pgd"
    eps: float = 0.1
    steps: int = 20
    n_examples: int = 200
    cost_n: int = 512
    cost_reps: int = 3
    seed: int = 0
    device: str = "auto"
    output_dir: str = "../runs/notebooks/04_odgq_training_curves"
    interactive: bool = True

    def __post_init__(self):
        self._check_common()
        info = P.check_dataset(self.dataset)
        self._set("bits", P.check_bits_list(self.bits, "bits"))
        self._set("methods", tuple(check_methods(self.methods)))
        common.check_bool(self.live, "live")
        self._set("epochs", check_int(self.epochs, "epochs", 1))
        self._set("train_n", check_int(self.train_n, "train_n", 1, info.sizes["train"]))
        self._set("cost_n", check_int(self.cost_n, "cost_n", 0, info.sizes["train"]))
        self._set("cost_reps", check_int(self.cost_reps, "cost_reps", 1))
        if self.cost_n and "natural" not in self.methods:
            raise RqlabError(f"cost_n={self.cost_n}: the cost is a ratio to natural training, which methods="
                             f"{list(self.methods)} leaves out: add natural or set cost_n=0")
        if not self.live:
            missing = [b for b in self.bits if b not in ZOO_CURVES]
            if missing:
                raise RqlabError(f"bits={list(self.bits)}: the zoo has the four methods' histories at "
                                 f"{sorted(ZOO_CURVES)} bits only, not at {missing}: set live=True to train them here")
            for b in self.bits:
                for m, name in zoo_curve_models(b, self.methods).items():
                    P.check_model_spec(name, f"zoo model for {m} at {b} bits")


def history_of(spec: str) -> list[dict]:
    """The per-epoch history of a zoo model (its card) or of a checkpoint file."""
    from .. import checkpoint, zoo

    spec = P.check_model_spec(spec)
    if P.is_checkpoint_path(spec):
        return list(checkpoint.load(spec).get("history") or [])
    return list(zoo.card(spec)["history"])


def zoo_curves(bits: int, methods=METHODS) -> dict[str, dict]:
    """{method: curve} from the zoo's histories at `bits` (ZOO_CURVES). The zoo measures
    PGD-20 accuracy on 200 test examples per epoch and clean accuracy on the test set."""
    bits = check_bits(bits)
    return {m: curve_from_history(history_of(name), source=f"zoo {name}", attack="PGD-20 (zoo card)")
            for m, name in zoo_curve_models(bits, methods).items()}


def train_curves(methods, bits: int, train_set, test_set, threat, epochs: int = 2, batch_size: int = 128,
                 lr: float = 0.1, seed: int = 0, device: str = "cpu", progress: bool = False,
                 calibrate_bits=tuple(range(2, 9)), log=None) -> tuple[dict, dict]:
    """Train a SmallCNN per method at Fixed(bits) through `rqlab.train` (one RunSpec per
    method: the same seed, hence the same initial weights and data order) and record its
    curve: clean accuracy and robust accuracy under `threat` on `test_set` (the same
    examples, so robust <= clean) after every epoch.

    methods: out of METHODS (defenses "natural", "fgsm-rs", "pgd-at" (PGD-7, step eps / 4),
    "odgq"), trained at the threat's eps. train_set, test_set: `data.Dataset`s.
    calibrate_bits: precisions whose activation ranges are set after training
    (post-training quantization, for the explorer), besides the trained one.
    Returns (curves {method: curve}, models {method: model in eval mode at Fixed(bits)}).
    """
    from .. import quant
    from ..analysis.cost import warm_up
    from ..evaluation import as_tensors, evaluate
    from ..experiment import TrainConfig, train
    from ..training import resolve_device

    methods = check_methods(methods)
    bits = check_bits(bits)
    check_int(epochs, "epochs", 1)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
    dev = resolve_device(cfg.device)
    x, y = (t.to(dev) for t in as_tensors(test_set))
    metric = {"robust_accuracy": lambda m: evaluate(m, (x, y), threat, progress=False)["robust_accuracy"]}
    specs = live_specs(methods, bits, train_set.name, threat.eps, cfg)

    warm_up(specs[methods[0]], train_set)  # the first method timed does not pay one-time costs
    curves, trained = {}, {}
    for method, spec in specs.items():
        model, history = train(spec, None, train_set=train_set, test_set=test_set, epoch_metrics=metric,
                               progress=progress, log=log)
        extra = sorted(set(calibrate_bits or ()) - {bits, 1, FP_BITS})
        if extra:
            n_cal = min(len(train_set), 1024)
            quant.calibrate(model, [train_set.x[i:i + 256].float().div(255).to(dev) for i in range(0, n_cal, 256)],
                            extra)
        curves[method] = curve_from_history(history, source=f"live, {len(train_set)} training examples",
                                            attack=f"{threat.attack.upper()}-{threat.steps}")
        trained[method] = model.eval()
    return curves, trained


def live_specs(methods, bits: int, dataset: str, eps: float, cfg) -> dict:
    """{method: RunSpec} of the live curves: a SmallCNN at Fixed(bits), the method's defense
    at `eps` (its other settings the defaults), trained with TrainConfig `cfg`."""
    from .. import quant
    from ..experiment import RunSpec

    return {m: RunSpec(model="smallcnn", data=dataset, policy=quant.Fixed(bits), defense=m, eps=eps, train=cfg)
            for m in methods}


def cost_specs(params: Params, bits: int, device: str) -> dict:
    """{method: RunSpec} whose epoch times `measure_cost` compares: the zoo recipes whose
    curves are read (live=False: their defense settings, batch size and memory format) or
    the live curves' specs."""
    from .. import zoo
    from ..experiment import TrainConfig

    if params.live:
        return live_specs(params.methods, bits, params.dataset, params.eps,
                          TrainConfig(seed=params.seed, device=device))
    return {m: zoo.recipe(name).spec.replace(train={"device": device})
            for m, name in zoo_curve_models(bits, params.methods).items()}


def measure_cost(params: Params, bits: int, device: str, log=None) -> dict | None:
    """The controlled cost of the methods at `bits` (`analysis.cost.training_cost` of
    `cost_specs` on params.cost_n training images), with "source" (its description) and
    "machine"; None when params.cost_n is 0."""
    from .. import data
    from ..analysis.cost import describe, training_cost

    if not params.cost_n:
        return None
    train_set = data.load(params.dataset, "train", n=params.cost_n, seed=params.seed)
    # two epochs, the second timed: a defense's state carried from step to step (ODG-Q's
    # replay of the previous step's images) is then in its steady state from the first step
    cost = training_cost(cost_specs(params, bits, device), train_set, reps=params.cost_reps, epochs=2,
                         seed=params.seed, log=log)
    return {**cost, "source": describe(cost), "machine": common.machine(device)}


def load_inputs(params: Params) -> common.Inputs:
    """The test images, and with live=False and interactive the zoo's models (for the
    explorer), labelled "ODG-Q (4-bit)" etc."""
    specs = {} if params.live or not params.interactive else {
        f"{METHOD_LABELS[m]} ({b}-bit)": name for b in params.bits
        for m, name in zoo_curve_models(b, params.methods).items()}
    return common.load_inputs(params, specs)


def run(params: Params, inputs: common.Inputs | None = None, log=print, progress: bool | None = None) -> Results:
    """The four methods' curves at every precision of params.bits (zoo or live), their
    epoch-time ratios to natural training, and the reading.

    Returns {"final_robust_accuracy", "final_clean_accuracy", "epoch_time_ratio" (the
    curves' own), "training_cost" (the controlled one, `measure_cost`; None with cost_n=0),
    "epochs", "curves", "reading", "odgq_gain" ({"gain", "ci95", "n", "time_ratio" (the
    controlled one), "time_range" (its repetitions'), "time_source", "cheap"}: ODG-Q over
    natural training; each {str(bits): ...}), "source" ("zoo" | "live"), "bits", "threat"};
    `.models` holds the trained (live) or zoo models.
    """
    import torch

    from .. import data
    from ..analysis import readings

    inputs = inputs or load_inputs(params)
    log = log or (lambda *a: None)
    threat = params.threat()
    torch.manual_seed(params.seed)
    curves, models = {}, dict(inputs.models)
    for b in params.bits:
        if params.live:
            train_set = data.load(params.dataset, "train", n=params.train_n, seed=params.seed)
            test_set = data.load(params.dataset, "test", n=params.n_examples, seed=params.seed)  # = inputs.x, y
            curves[b], trained = train_curves(params.methods, b, train_set, test_set, threat, epochs=params.epochs,
                                              seed=params.seed, device=str(inputs.device),
                                              progress=params.interactive if progress is None else progress)
            models.update({f"{METHOD_LABELS[m]} ({b}-bit)": net for m, net in trained.items()})
        else:
            curves[b] = zoo_curves(b, params.methods)
        for m, c in curves[b].items():
            log(f"{b}-bit {METHOD_LABELS[m]:>9}: clean {100 * c['clean_accuracy'][-1]:5.1f}%  robust "
                f"{100 * c['robust_accuracy'][-1]:5.1f}%  {c['cumulative_time_s'][-1]:7.1f}s for {len(c['epoch'])} "
                f"epochs  ({c['source']}, {c['attack']})")
    ratios = {b: epoch_time_ratio(curves[b], "natural") if "natural" in curves[b] else None for b in params.bits}
    cost = {}
    for b in params.bits:
        log(f"{b}-bit: timing the methods' training under control ({params.cost_n} images, {params.cost_reps} "
            f"interleaved repetitions)" if params.cost_n else f"{b}-bit: cost_n=0, the cost is not measured")
        cost[b] = measure_cost(params, b, str(inputs.device), log=log)
    n_eval = params.n_examples if params.live else min(zoo_eval_n(c["source"].split(" ", 1)[1])
                                                       for b in params.bits for c in curves[b].values())
    labels = {m: METHOD_LABELS[m] for m in params.methods}
    full = {b: readings.curves_reading(curves[b], ratios[b], n=n_eval, labels=labels,
                                       cost=cost[b]["ratio"] if cost[b] else None,
                                       cost_source=cost[b]["source"] if cost[b] else "",
                                       cost_range=cost[b]["ratio_range"] if cost[b] else None)
            for b in params.bits if ratios[b]}
    read = {b: r["text"] for b, r in full.items()}
    if params.live and params.train_n < 5000:
        read = {b: t + f" Note: {params.train_n} training images per epoch; at this size per-epoch overheads weigh "
                       "on the times." for b, t in read.items()}
    results = {
        "final_robust_accuracy": {str(b): {m: c["robust_accuracy"][-1] for m, c in curves[b].items()}
                                  for b in params.bits},
        "final_clean_accuracy": {str(b): {m: c["clean_accuracy"][-1] for m, c in curves[b].items()}
                                 for b in params.bits},
        "epoch_time_ratio": {str(b): ratios[b] for b in params.bits},
        # the controlled cost that judges the claim's cost half (analysis.cost), per precision
        "training_cost": {str(b): cost[b] for b in params.bits},
        "source": "live" if params.live else "zoo",
        "epochs": {str(b): {m: len(c["epoch"]) for m, c in curves[b].items()} for b in params.bits},
        "bits": list(params.bits),
        "curves": {str(b): curves[b] for b in params.bits},
        "threat": threat.to_dict(),
        "reading": {str(b): t for b, t in read.items()},
        # ODG-Q against natural training (the claim of METHODS section 5), per precision
        "odgq_gain": {str(b): {"gain": r["robust_gain"], "ci95": r["robust_gain_ci95"], "n": n_eval,
                               "time_ratio": (r["cost_ratios"] or {}).get("odgq"),
                               "time_range": cost[b]["ratio_range"]["odgq"] if cost[b] else None,
                               "time_source": cost[b]["source"] if cost[b] else None, "cheap": r["cheap"]}
                      for b, r in full.items() if r["robust_gain"] is not None},
    }
    results["machine"] = common.machine(inputs.device) if params.live else zoo_machines(curves)
    return Results(results, models=models)


# ---- figures and reading ------------------------------------------------------------------

def plot_curves(results: dict):
    """The main figure: clean accuracy, robust accuracy and cumulative wall time per epoch,
    one row per precision."""
    plt = require("matplotlib.pyplot", "notebooks")

    bits, eps = results["bits"], results["threat"]["eps"]
    fig, axes = plt.subplots(len(bits), 3, figsize=(13, 3.3 * len(bits)), squeeze=False)
    for row, b in zip(axes, bits):
        curves = results["curves"][str(b)]
        attack_name = next(iter(curves.values()))["attack"]
        for i, (m, c) in enumerate(curves.items()):
            kw = dict(color=f"C{i}", marker="o", label=METHOD_LABELS[m])
            row[0].plot(c["epoch"], [100 * v for v in c["clean_accuracy"]], **kw)
            row[1].plot(c["epoch"], [100 * v for v in c["robust_accuracy"]], **kw)
            row[2].plot(c["epoch"], c["cumulative_time_s"], **kw)
        row[0].set(ylabel="accuracy (%)", title=f"{b}-bit: clean accuracy", ylim=(0, 100))
        row[1].set(ylabel="accuracy (%)", title=f"{b}-bit: robust accuracy ({attack_name}, eps={eps:g})",
                   ylim=(0, 100))
        row[2].set(ylabel="seconds", title=f"{b}-bit: cumulative training time")
        for ax in row:
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
        row[0].legend(fontsize=8)
    return common.finish(fig, results)


def plot_time_ratios(results: dict):
    """Epoch time of each method over natural training's, per precision: the controlled
    measurement (`measure_cost`, median with the range over repetitions) where the results
    have it, else the curves' own mean epoch times."""
    plt = require("matplotlib.pyplot", "notebooks")
    import numpy as np

    bits = results["bits"]
    methods = list(results["curves"][str(bits[0])])
    costs = results.get("training_cost") or {}
    controlled = all(costs.get(str(b)) for b in bits)
    fig, ax = plt.subplots(figsize=(6, 3))
    w = 0.8 / len(bits)
    for i, b in enumerate(bits):
        if controlled:
            c = costs[str(b)]
            mid = np.array([c["ratio"][m] for m in methods])
            lo, hi = (np.array([c["ratio_range"][m][k] for m in methods]) for k in (0, 1))
            ax.bar(np.arange(len(methods)) + i * w, mid, w, yerr=[mid - lo, hi - mid], capsize=3, label=f"{b}-bit")
        elif results["epoch_time_ratio"][str(b)]:
            ratio = results["epoch_time_ratio"][str(b)]
            ax.bar(np.arange(len(methods)) + i * w, [ratio[m] for m in methods], w, label=f"{b}-bit")
    ax.set_xticks(np.arange(len(methods)) + w * (len(bits) - 1) / 2, [METHOD_LABELS[m] for m in methods])
    ax.axhline(1, color="gray", lw=1, ls=":")
    what = (f"controlled: {costs[str(bits[0])]['n']} images, {costs[str(bits[0])]['reps']} interleaved reps"
            if controlled else "the curves' mean epoch times")
    ax.set(ylabel="epoch time / natural", title=f"epoch-time ratio to natural training\n({what})")
    ax.legend(fontsize=8)
    return common.finish(fig, results)


def reading(results: dict) -> str:
    """`readings.curves_reading`'s text per precision."""
    return "\n\n".join(f"{b}-bit: {t}" for b, t in results["reading"].items())


def explorer(params: Params, inputs: common.Inputs, results: Results):
    """With params.interactive: pick one of the trained (or zoo) models, the precision it is
    evaluated at (post-training quantization where it differs from the training one) and
    an eps; clean and white-box robust accuracy on 64 test images (None otherwise)."""
    return common.explorer(params, results.models, inputs.x, inputs.y, bits=sorted({*params.bits, 2, 4, 8, 32}),
                           start_bits=params.bits[0])


__all__ = ["Params", "METHODS", "METHOD_LABELS", "ZOO_CURVES", "SMALL_CURVES", "zoo_curve_models", "zoo_eval_n",
           "check_methods", "history_of", "zoo_curves",
           "train_curves", "live_specs", "cost_specs", "measure_cost", "load_inputs", "run", "plot_curves", "plot_time_ratios", "reading", "explorer",
           "write_results"]
