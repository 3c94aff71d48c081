"""Notebook 06: robustness where the model is deployed: the int8 ONNX Runtime engine beside
its fake-quant twin (METHODS section 9; `rqlab.deploy`).

For each model: export to ONNX, static int8 quantization with ONNX Runtime (QDQ, per-channel
int8 weights, calibrated activations), then `deploy.evaluate_engine`: clean accuracy and
prediction flips of the engine against the fake-quant twin (Fixed(8)) and FP; white-box PGD
on the twin and on FP; those examples transferred to the engine; Square on the engine.

    >>> params = Params(model=["fmnist-fp-pgd7-small"], n_examples=32, steps=3, square_queries=20)
    >>> results = run(params)              # {"models": {label: {...}}, "reading": ..., ...}
    >>> fig = plot_robust(results); print(reading(results))
"""
from __future__ import annotations

from dataclasses import dataclass

from ..extras import require
from ..validate import RqlabError, check_choice, check_int
from . import common
from . import params as P
from .common import Results, write_results

# The bars of the robustness figure: (key in results, label)
ROBUST = (("fp_white_box", "FP, white-box"), ("fake_quant_white_box", "fake-quant 8 bit, white-box"),
          ("transfer_fake_quant", "engine: transfer from fake-quant"), ("transfer_fp", "engine: transfer from FP"),
          ("square", "engine: Square"), ("engine_worst", "engine: worst case (upper bound)"))


@dataclass(frozen=True)
class Params(common.StudyParams):
    """The parameters of notebook 06 (its parameters cell), validated at construction.

    model: zoo names or checkpoints (one, a list or {label: spec}), each run at 8 bits.
    bits: the engine's precision, [8] (its fake-quant twin is Fixed(8)); the only value.
    attack, eps, steps: the white-box attack crafted on the twin and on FP.
    square_queries: Square's queries per example on the engine. activations: "uint8" |
    "int8". quantize_edges: also quantize the first and last layer (the twin keeps them
    FP). calib_n: calibration images (training set, drawn with `seed`).
    """

    dataset: str = "fashion-mnist"
    model: object = ("fmnist-fp-natural", "fmnist-fp-pgd7", "fmnist-q8-pgd7")
    bits: tuple = (8,)
    attack: str = "pgd"
    eps: float = 0.1
    steps: int = 20
    square_queries: int = 1000
    activations: str = "uint8"
    quantize_edges: bool = False
    calib_n: int = 1024
    n_examples: int = 200
    seed: int = 0
    device: str = "auto"
    output_dir: str = "../runs/notebooks/06_deployed_int8"
    interactive: bool = True

    def __post_init__(self):
        from ..deploy import ACTIVATIONS, TWIN_BITS

        self._check_common()
        self._set("specs", P.check_model_specs(self.model, "model"))
        if isinstance(self.model, list):
            self._set("model", tuple(self.model))  # the notebook's list equals the default tuple
        bits = P.check_bits_list(self.bits, "bits")
        if bits != (TWIN_BITS,):
            raise RqlabError(f"bits={list(bits)}: the engine is int8 and its fake-quant twin runs at {TWIN_BITS} bits: "
                             f"use bits = [{TWIN_BITS}]")
        self._set("bits", bits)
        self._set("square_queries", check_int(self.square_queries, "square_queries", 1))
        check_choice(self.activations, "activations", ACTIVATIONS)
        common.check_bool(self.quantize_edges, "quantize_edges")
        self._set("calib_n", P.check_n_examples(self.calib_n, self.dataset, "train", "calib_n"))

    def config(self):
        """The deploy.Int8Config of these parameters (calibration drawn with `seed`)."""
        from ..deploy import Int8Config

        return Int8Config(activations=self.activations, quantize_edges=self.quantize_edges, calib_n=self.calib_n,
                          calib_seed=self.seed)


def load_inputs(params: Params) -> common.Inputs:
    """The models (each checked to run at 8 bits) and the test images."""
    inputs = common.load_inputs(params, params.specs)
    for label, net in inputs.models.items():
        P.check_bits_supported(net, params.bits, "bits", label)
    return inputs


def run(params: Params, inputs: common.Inputs | None = None, log=print) -> Results:
    """Build each model's int8 engine and evaluate it (`deploy.evaluate_engine`).

    Returns {"models": {label: {"spec", "clean" ({"fp", "fake_quant", "engine"}), "agreement"
    ({"fake_quant", "fp", "twin_vs_fp", and "all_int8": the engine that quantizes every
    layer against the twin, unless quantize_edges}: flip rate, max / mean logit difference), "robust"
    and "robust_ci95" ({key of ROBUST: value}), "strongest", "verdict", "engine_queries"}},
    "engine" (the settings of the first engine), "threat", "square_queries", "n_examples",
    "bits", "bound", "reading"}; `.objects["engines"]` holds the engines (for the explorer).
    """
    import torch

    from .. import deploy

    inputs = inputs or load_inputs(params)
    log = log or (lambda *a: None)
    threat = params.threat()
    calib_x, source = deploy.calibration_set(params.dataset, params.calib_n, params.seed)
    torch.manual_seed(params.seed)
    out, engines, settings = {}, {}, None
    for label, net in inputs.models.items():
        engines[label] = deploy.int8_engine(net, calib_x.to(inputs.device), params.config(), calibration_source=source)
        rec = deploy.evaluate_engine(net, engines[label], (inputs.x, inputs.y), threat,
                                     square_queries=params.square_queries, seed=params.seed, model_id=label,
                                     progress=False)
        out[label] = _summary(rec, inputs.specs[label])
        if not params.quantize_edges:  # for scale: a plain deployment also quantizes the first and last layer
            out[label]["agreement"]["all_int8"] = _all_int8_agreement(net, calib_x, params, source, inputs)
        settings = settings or rec["engine"]
        log(f"{label}: engine clean {100 * rec.clean_accuracy:.1f}%, flips vs fake-quant "
            f"{100 * rec['agreement']['fake_quant']['flip_rate']:.1f}%; robust: fake-quant white-box "
            f"{100 * out[label]['robust']['fake_quant_white_box']:.1f}%, engine worst case "
            f"{100 * rec.robust_accuracy:.1f}% ({rec['wall_time_s']:.0f}s)")
    results = {"models": out, "engine": settings, "threat": threat.to_dict(), "square_queries": params.square_queries,
               "n_examples": params.n_examples, "bits": list(params.bits), "bound": deploy.evaluate.BOUND}
    results["reading"] = _reading(results)
    results["machine"] = common.machine(inputs.device)
    return Results(results, models=inputs.models, objects={"engines": engines})


def _all_int8_agreement(net, calib_x, params: Params, source: dict, inputs: common.Inputs) -> dict:
    """Agreement with the fake-quant twin of the engine that quantizes every layer."""
    import dataclasses

    import torch

    from .. import deploy, quant

    engine = deploy.int8_engine(net, calib_x, dataclasses.replace(params.config(), quantize_edges=True),
                                calibration_source=source)
    with torch.no_grad(), quant.using(net, quant.Fixed(deploy.TWIN_BITS)):
        twin = net(inputs.x)
    with torch.no_grad():
        return deploy.agreement(engine(inputs.x).to(twin.device), twin)


def _summary(rec, spec: str) -> dict:
    """The numbers of one engine record that the figures and the reading use."""
    from ..stats import diff_half_width

    by = {a["name"]: a for a in rec.attacks}
    fq, fp = rec["fake_quant"], rec.get("fp")
    robust = {"fp_white_box": fp["robust_accuracy"] if fp else None,
              "fake_quant_white_box": fq["robust_accuracy"],
              "transfer_fake_quant": by["transfer_fake_quant"]["robust_accuracy"],
              "transfer_fp": by["transfer_fp"]["robust_accuracy"] if "transfer_fp" in by else None,
              "square": by["square"]["robust_accuracy"], "engine_worst": rec.robust_accuracy}
    ci = {"fp_white_box": fp["robust_ci95"] if fp else None, "fake_quant_white_box": fq["robust_ci95"],
          **{k: by[k]["robust_ci95"] for k in by}, "engine_worst": list(rec.robust_ci95)}
    gap = rec.robust_accuracy - fq["robust_accuracy"]
    noise = diff_half_width(rec.robust_accuracy, fq["robust_accuracy"], rec.n)
    verdict = "within noise" if abs(gap) <= noise else ("engine higher" if gap > 0 else "engine lower")
    return {"spec": spec, "clean": {"fp": fp["clean_accuracy"] if fp else None, "fake_quant": fq["clean_accuracy"],
                                    "engine": rec.clean_accuracy},
            "agreement": {"fake_quant": rec["agreement"]["fake_quant"], "fp": rec["agreement"]["fp"],
                          "twin_vs_fp": rec["twin_vs_fp"]},
            "robust": robust, "robust_ci95": {k: ci.get(k) for k in robust}, "strongest": rec["strongest"],
            "gap": gap, "noise": noise, "verdict": verdict, "engine_queries": rec["engine_queries"], "n": rec.n}


def _reading(results: dict) -> str:
    """One paragraph per model, from the numbers."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = []
    for label, m in results["models"].items():
        ag = m["agreement"]
        twin = f", fake-quant vs FP {pct(ag['twin_vs_fp']['flip_rate'])}" if ag["twin_vs_fp"] else ""
        if ag.get("all_int8"):
            twin += (f"; an engine that also quantizes the first and last layer flips "
                     f"{pct(ag['all_int8']['flip_rate'])} against the twin")
        lines.append(
            f"{label}: the int8 engine classifies {pct(m['clean']['engine'])} of the clean images (fake-quant 8 bit "
            f"{pct(m['clean']['fake_quant'])}, FP {pct(m['clean']['fp'])}); it changes the prediction of "
            f"{pct(ag['fake_quant']['flip_rate'])} of them against its fake-quant twin (max logit difference "
            f"{ag['fake_quant']['max_logit_diff']:.3g}){twin}. Robust accuracy: fake-quant white-box "
            f"{pct(m['robust']['fake_quant_white_box'])}; on the engine, worst case over transfer and Square "
            f"{pct(m['robust']['engine_worst'])} (strongest: {m['strongest']}), {m['verdict']} "
            f"(gap {100 * m['gap']:+.1f} points, noise +-{100 * m['noise']:.1f}).")
    lines.append("The engine's figure is an upper bound: it has no gradient, so no white-box attack on it exists.")
    return "\n\n".join(lines)


# ---- figures and reading ------------------------------------------------------------------

def plot_robust(results: dict):
    """The main figure: per model, robust accuracy of FP and the fake-quant twin (white-box)
    and of the engine (transfer from each, Square, worst case), with 95% intervals."""
    plt = require("matplotlib.pyplot", "notebooks")
    import numpy as np

    models = list(results["models"])
    fig, ax = plt.subplots(figsize=(max(6.0, 3.2 * len(models)), 4))
    w = 0.8 / len(ROBUST)
    for i, (key, label) in enumerate(ROBUST):
        xs = np.arange(len(models)) + i * w
        vals = [results["models"][m]["robust"][key] for m in models]
        cis = [results["models"][m]["robust_ci95"][key] for m in models]
        ok = [j for j, v in enumerate(vals) if v is not None]
        ax.bar(xs[ok], [100 * vals[j] for j in ok], w, label=label, color=f"C{i}",
               yerr=100 * np.abs(np.array([cis[j] for j in ok]).T - np.array([vals[j] for j in ok])), capsize=2,
               hatch="//" if key == "engine_worst" else None)
    t = results["threat"]
    ax.set_xticks(np.arange(len(models)) + w * (len(ROBUST) - 1) / 2, models)
    ax.set(ylabel="robust accuracy (%)", ylim=(0, 100),
           title=f"{t['attack']}-{t['steps']} eps={t['eps']:g}, Square {results['square_queries']} queries, "
                 f"n={results['n_examples']}")
    ax.legend(fontsize=7, ncol=2)
    return common.finish(fig, results)


def plot_flips(results: dict):
    """Prediction flip rate on the clean images: engine vs fake-quant twin, engine vs FP,
    the engine that quantizes every layer (first and last too) vs the twin, and the twin
    vs FP (rqlab's own 8-bit fake quantization, for scale)."""
    plt = require("matplotlib.pyplot", "notebooks")
    import numpy as np

    models = list(results["models"])
    keys = [("fake_quant", "engine vs fake-quant 8 bit"), ("fp", "engine vs FP"),
            ("all_int8", "engine, every layer int8, vs fake-quant 8 bit"), ("twin_vs_fp", "fake-quant 8 bit vs FP")]
    keys = [k for k in keys if any(results["models"][m]["agreement"].get(k[0]) for m in models)]
    fig, ax = plt.subplots(figsize=(max(6.0, 2.6 * len(models)), 3.4))
    w = 0.8 / len(keys)
    top = 0.0
    for i, (key, label) in enumerate(keys):
        vals = [100 * (results["models"][m]["agreement"].get(key) or {}).get("flip_rate", 0.0) for m in models]
        bars = ax.bar(np.arange(len(models)) + i * w, vals, w, label=label, color=f"C{i}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        top = max(top, *vals)
    ax.set_xticks(np.arange(len(models)) + w * (len(keys) - 1) / 2, models)
    ax.set(ylabel="predictions changed (%)", ylim=(0, max(1.0, 1.3 * top)),
           title=f"prediction flips on {results['n_examples']} clean test images")
    ax.legend(fontsize=8)
    return common.finish(fig, results)


def reading(results: dict) -> str:
    """The generated reading, one paragraph per model."""
    return results["reading"]


def explorer(params: Params, inputs: common.Inputs, results: Results):
    """With params.interactive: pick a model, "8" (white-box on the fake-quant twin) or
    "int8" (those examples transferred to the engine), and an eps; recomputed on 64 test
    images (None otherwise)."""
    if not params.interactive:
        return None
    from ..explore import Explorer

    k = min(common.EXPLORER_N, len(inputs.x))
    probe = engine_probe(inputs.models, results.objects["engines"], inputs.x[:k], inputs.y[:k], params.threat())
    return Explorer(probe, models=list(inputs.models), bits=[8, "int8"], eps=(0.0, min(1.0, 3 * params.eps), params.eps),
                    title=f"{params.attack}-{params.steps} on the fake-quant twin (8) and transferred to the int8 "
                          f"engine (int8), {k} examples", start_bits="int8")


def engine_probe(models: dict, engines: dict, x, y, threat):
    """An explorer probe (name, bits, eps): the attack crafted on models[name] at 8 bits,
    scored on the twin (bits 8) or on engines[name] (bits "int8")."""
    import torch

    from .. import attacks, quant

    def probe(name, bits, eps):
        model, engine = models[name], engines[name]
        target = engine if bits == "int8" else model
        with quant.using(model, quant.Fixed(8)), torch.no_grad():
            ok = target(x).argmax(1) == y
        robust = ok
        if eps > 0:
            t = threat.replace(attack="transfer", eps=float(eps), policy=quant.Fixed(8), surrogate=model,
                               options={"base": threat.attack})
            x_adv = attacks.transfer(engine, x, y, t)
            with quant.using(model, quant.Fixed(8)), torch.no_grad():
                robust = ok & (target(x_adv).argmax(1) == y)
        return {"clean_accuracy": ok.float().mean().item(), "robust_accuracy": robust.float().mean().item(),
                "n": len(x), "attack": f"{threat.attack}-{threat.steps}" + (" transferred" if bits == "int8" else "")}

    return probe


__all__ = ["Params", "load_inputs", "run", "plot_robust", "plot_flips", "reading", "explorer", "engine_probe",
           "write_results", "ROBUST"]
