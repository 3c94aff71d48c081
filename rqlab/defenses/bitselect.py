"""Layer-wise, Lipschitz-guided bit selection (after Song, Ranjan, Li, arXiv 2110.12308;
METHODS section 4).

    >>> quant.calibrate(model, batches, bits=[2, 3, 4, 5, 6, 8])   # ranges for every option
    >>> sens = sensitivities(model, bits_options=(2, 3, 4, 5, 6, 8))
    >>> alloc = select_bits(model, 4.0, kind="avg_bits", sensitivity=sens)
    >>> quant.apply(model, quant.PerLayer(alloc.bits))              # mixed precision
    >>> rows = compare_allocations(model, test_set, ThreatModel("pgd", eps=0.1, steps=20),
    ...                            budgets=[3.0, 4.0], n=1000)

Provenance. The paper's body was not available; its abstract says only that a
Lipschitz-based metric picks each layer's quantization. The sensitivity below is
rqlab's own construction (METHODS section 4), not the paper's formula.

What is computed, for each quantizable layer l (`quant.quant_layers(model)`: layers
flagged keep_fp stay at full precision and are not chosen) and each bit option b:

    S_l(b) = e_l(b) * D_l,            e_l(b) = e_w,l(b) + e_a,l(b)

    e_w,l(b) = || Q_b(W_l) - W_l ||_op, the largest singular value of the linear map of
               the weight quantization error (the layer's own weight quantizer,
               `functional.quantize_weight` with its weight_scheme, at b bits). For a conv
               it is the real operator (stride, padding, dilation, groups, and the layer's
               input size, recorded by a forward hook), by power iteration
               (`analysis.lipschitz.spectral_norm`, float64); for a linear layer, the
               matrix's spectral norm.
    e_a,l(b) = the step of the b-bit grid of layer l's input range for b bits:
               (hi - lo) / (2^b - 1) with [lo, hi] widened to contain 0
               (`functional.grid_step`). The range is the layer's calibrated (or trained)
               range *for b bits* (`layer.act.ranges[b - 1]`), so the model must have a
               range for every option: pass calibration batches or call
               `quant.calibrate` first.
    D_l      = prod_{j > l} L_j, the product of the Lipschitz estimates of every layer
               after l in module order up to the logits, from
               `analysis.lipschitz.network_bound` at full precision: conv/linear operator
               norms and eval-mode batch-norm scales max|gamma| / sqrt(var + eps) (ReLU and
               max-pooling count as 1). Layer l's own batch norm comes after it and is
               included; layers kept at FP (e.g. the last linear) are included too.

So S_l(b) reads as "the error made at layer l, amplified to the logits". It is a
heuristic score, not a bound: the weight term is an error per unit input norm (the
output error is ||dW_l x|| <= e_w ||x||) while the step is an absolute error size, the
activation error also passes through W_l itself (not counted in D_l), and for residual
networks the module-order product is not a Lipschitz bound (skips add). D_l uses FP
weights, so the objective sum_l S_l(b_l) is separable and the allocator is exact.

Cost tables (`cost_table`), summed over the quantizable layers:
    kind="avg_bits": cost_l(b) = n_l * b / sum_k n_k with n_l the number of *weights*
                     of layer l (biases are not quantized), so the sum is the
                     parameter-weighted average weight bits and the budget reads as
                     bits, e.g. 4.0.
    kind="bitops":   cost_l(b) = MACs_l * b * b (weights and inputs both at b; MACs of
                     one example, `quant.layer_macs`). Layers kept at FP add a constant
                     (MACs x 32 x 32) that the budget does not include.

Bits 32 is allowed as an option (e = 0: the layer stays FP); b = 1 is not (a binary
layer's input is sign(x), which has no range). Run time: every (layer, option) pair costs
up to `iters` power-iteration steps of two float64 convs; SmallCNN takes seconds on a CPU,
ResNets want a GPU or fewer `iters` (the estimate converges from below).

Selection methods (`select_bits`, all at the same budget): "lipschitz" minimises
sum_l S_l(b_l) exactly (multiple-choice knapsack, `allocate.allocate`, greedy fallback);
"uniform" takes the highest single b that fits (it may spend less than the budget);
"random" draws a feasible allocation (seeded); "reverse" solves the knapsack for the
reversed sensitivity ranking, a deliberately bad baseline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import quant
from ..analysis.lipschitz import network_bound, spectral_norm
from ..models.state import eval_mode
from ..quant.functional import grid_step, quantize_weight
from ..quant.layers import SwitchableBatchNorm2d
from ..validate import FP_BITS, RqlabError, check_bits_set, check_choice, check_float, check_int
from . import allocate as A

KINDS = ("avg_bits", "bitops")
METHODS = ("lipschitz", "uniform", "random", "reverse")
DEFAULT_BITS = (2, 3, 4, 5, 6, 8)


# ----------------------------------------------------------------------------- checks

def check_bits_options(bits_options, field: str = "bits_options") -> tuple[int, ...]:
    """A sorted tuple of bit options in 2..16 or 32. b = 1 is refused: a binary layer's
    input quantizer is sign(x), which has no range and so no step."""
    options = check_bits_set(bits_options, field)
    if 1 in options:
        raise RqlabError(f"{field}={list(options)} contains 1: binary layers have no activation range, so no "
                         "Lipschitz sensitivity; use bit-widths in 2..16, or 32 for full precision")
    return options


def _check_model(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if any(isinstance(m, SwitchableBatchNorm2d) for m in model.modules()):
        raise RqlabError("model has switchable batch norms (sbn_bits): per-layer bit selection needs one "
                         "plain BatchNorm per layer; use a model built without sbn_bits")
    layers = quant.quant_layers(model)
    if not layers:
        raise RqlabError("model has no quantizable layer (every QuantConv2d/QuantLinear is keep_fp, or none "
                         "exists): nothing to select bits for")
    return layers


def missing_ranges(model: nn.Module, bits_options) -> dict[str, list[int]]:
    """{layer: [bits without an activation range]} for the quantizable layers (empty: all set)."""
    options = [b for b in check_bits_options(bits_options) if b != FP_BITS]
    out = {}
    for name, layer in quant.quant_layers(model):
        have = set(layer.act.calibrated_bits())
        lacking = [b for b in options if b not in have]
        if lacking:
            out[name] = lacking
    return out


def ensure_calibrated(model: nn.Module, bits_options, batches=None, recalibrate: bool = False) -> list[int]:
    """Make sure every quantizable layer has an activation range for every bit option.

    batches: calibration images (a list of (B, C, H, W) tensors in [0, 1], or
    (images, labels) pairs), passed to `quant.calibrate`. Without batches, a missing
    range raises (naming the layers and bits). With batches, the missing bits are
    calibrated (all options when `recalibrate`, replacing trained ranges).
    Returns the bits that were calibrated.
    """
    options = [b for b in check_bits_options(bits_options) if b != FP_BITS]
    missing = missing_ranges(model, options)
    todo = options if recalibrate else sorted({b for bs in missing.values() for b in bs})
    if batches is None:
        if missing:
            raise RqlabError(
                f"activation ranges are missing for bits {sorted({b for bs in missing.values() for b in bs})} "
                f"(layers {sorted(missing)}): the sensitivity needs each option's input range; pass calibration "
                f"batches (batches=...) or call rqlab.quant.calibrate(model, batches, bits={options}) first")
        return []
    if todo:
        quant.calibrate(model, batches, todo)
    return todo


# ------------------------------------------------------------------------ sensitivity

@dataclass(frozen=True)
class Sensitivity:
    """Per-layer sensitivities and their pieces.

    table:   {layer: {b: S_l(b)}}, layers in module order.
    details: {layer: {"e_w": {b: float}, "e_a": {b: float}, "act_range": {b: [lo, hi]},
              "downstream": D_l, "input_shape": [C, H, W] or [features], "weights": n_l,
              "kind": "QuantConv2d" | "QuantLinear"}}.
    bits_options: the options, sorted.
    """

    table: dict
    details: dict
    bits_options: tuple
    settings: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.table)

    def to_dict(self) -> dict:
        """JSON-ready (bit keys as strings)."""
        keyed = lambda d: {str(b): v for b, v in d.items()}  # noqa: E731
        details = {}
        for name, d in self.details.items():
            details[name] = {k: (keyed(v) if k in ("e_w", "e_a", "act_range") else v) for k, v in d.items()}
        return {"construction": "rqlab (METHODS section 4): S_l(b) = (e_w,l(b) + e_a,l(b)) * prod_{j>l} L_j",
                "bits_options": list(self.bits_options), "settings": dict(self.settings),
                "table": {name: keyed(row) for name, row in self.table.items()}, "details": details}


@torch.no_grad()
def layer_input_shapes(model: nn.Module, input_shape=None) -> dict[str, tuple]:
    """Input shape (without batch) of every conv/linear layer, from one FP forward pass
    with hooks. The model's precision, policy and mode are left as they were."""
    shape = tuple(input_shape or model.input_shape)
    shapes, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: shapes.__setitem__(name, tuple(inp[0].shape[1:]))))
    saved = [(m, m.w_bits, m.a_bits) for _, m in quant.quant_layers(model, include_fp=True)]
    try:
        for m, _, _ in saved:
            m.w_bits = m.a_bits = FP_BITS
        with eval_mode(model):
            p = next(model.parameters())
            model.forward(torch.full((1,) + shape, 0.5, device=p.device, dtype=p.dtype))  # no policy hooks
    finally:
        for h in hooks:
            h.remove()
        for m, w, a in saved:
            m.w_bits, m.a_bits = w, a
    return shapes


def _error_operator(layer: nn.Module, error: torch.Tensor) -> nn.Module:
    """A plain conv/linear with the same geometry as `layer` and weight `error`."""
    if isinstance(layer, nn.Conv2d):
        op = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                       layer.dilation, layer.groups, bias=False, padding_mode=layer.padding_mode)
    elif isinstance(layer, nn.Linear):
        op = nn.Linear(layer.in_features, layer.out_features, bias=False)
    else:
        raise RqlabError(f"weight error norms are defined for conv and linear layers, got {type(layer).__name__}")
    op.weight = nn.Parameter(error.detach().clone(), requires_grad=False)
    return op.to(error.device)


@torch.no_grad()
def weight_error_norm(layer: nn.Module, bits: int, input_shape=None, iters: int = 300,
                      tol: float = 1e-7) -> float:
    """e_w = ||Q_b(W) - W||_op of a quantized conv/linear layer (its own weight scheme).

    input_shape: (C, H, W) of the layer's input (convs only). b = 32 gives 0.
    iters, tol: power-iteration budget and relative stopping change (converges from below).
    """
    if bits >= FP_BITS:
        return 0.0
    w = layer.weight.detach()
    error = quantize_weight(w, bits, getattr(layer, "weight_scheme", "per_channel")) - w
    return spectral_norm(_error_operator(layer, error), input_shape, iters=iters, tol=tol)


def activation_step(layer: nn.Module, bits: int, name: str = "layer") -> tuple[float, float, float]:
    """(step, lo, hi) of the layer's input grid at `bits`, from its range for `bits`."""
    if bits >= FP_BITS:
        return 0.0, 0.0, 0.0
    if int(layer.act.seen[bits - 1]) == 0:
        raise RqlabError(f"layer {name!r} has no activation range for {bits} bits: call "
                         f"rqlab.quant.calibrate(model, batches, bits=[{bits}]) first")
    lo, hi = (float(v) for v in layer.act.ranges[bits - 1])
    return grid_step(lo, hi, bits), lo, hi


def sensitivities(model: nn.Module, bits_options=DEFAULT_BITS, input_shape=None, batches=None,
                  recalibrate: bool = False, iters: int = 300, tol: float = 1e-7) -> Sensitivity:
    """S_l(b) for every quantizable layer and bit option (see the module docstring).

    model: an rqlab model with plain batch norms, in [0, 1] pixel space; its precision,
        policy and mode are left as they were (activation ranges may be calibrated).
    bits_options: bit-widths in 2..16 or 32. input_shape: (C, H, W), default
        `model.input_shape`. batches: calibration images used when ranges are missing
        (or for all options with `recalibrate`); without them a missing range raises.
    iters, tol: power-iteration budget of each operator norm, and the relative change at
        which a weight-error norm stops early (the downstream norms run the full `iters`).
    Returns a `Sensitivity` (`.table`, `.details`, `.to_dict()`).
    """
    options = check_bits_options(bits_options)
    check_int(iters, "iters", 1)
    layers = _check_model(model)
    ensure_calibrated(model, options, batches, recalibrate)
    shapes = layer_input_shapes(model, input_shape)
    with quant.using(model, quant.Fixed(FP_BITS)):  # FP downstream norms, no random draws
        rows = network_bound(model, input_shape, iters=iters)["layers"]
    names = [r["name"] for r in rows]
    table, details = {}, {}
    for name, layer in layers:
        if name not in shapes:
            raise RqlabError(f"layer {name!r} is not used in the forward pass: it has no input shape")
        after = rows[names.index(name) + 1:]
        downstream = 1.0
        for r in after:
            downstream *= r["lipschitz"]
        e_w, e_a, ranges = {}, {}, {}
        for b in options:
            e_w[b] = weight_error_norm(layer, b, shapes[name], iters, tol)
            e_a[b], lo, hi = activation_step(layer, b, name)
            ranges[b] = [lo, hi]
        table[name] = {b: (e_w[b] + e_a[b]) * downstream for b in options}
        details[name] = {"kind": type(layer).__name__, "input_shape": list(shapes[name]),
                         "weights": layer.weight.numel(), "downstream": downstream,
                         "downstream_layers": [r["name"] for r in after],
                         "e_w": e_w, "e_a": e_a, "act_range": ranges}
    return Sensitivity(table, details, options, {"iters": iters, "tol": tol})


# ------------------------------------------------------------------------------ costs

def cost_table(model: nn.Module, bits_options=DEFAULT_BITS, kind: str = "avg_bits", input_shape=None) -> dict:
    """{layer: {b: cost}} for the quantizable layers (see the module docstring).

    avg_bits: n_l * b / sum_k n_k (weights only), so a total reads as average bits.
    bitops:   MACs_l * b * b of one example.
    """
    options = check_bits_options(bits_options)
    check_choice(kind, "kind", KINDS)
    layers = _check_model(model)
    if kind == "avg_bits":
        n = {name: layer.weight.numel() for name, layer in layers}
        total = sum(n.values())
        return {name: {b: n[name] * b / total for b in options} for name, _ in layers}
    macs = quant.layer_macs(model, input_shape)
    return {name: {b: float(macs[name] * b * b) for b in options} for name, _ in layers}


def average_bits(model: nn.Module, bits: dict) -> float:
    """Weight-count-weighted average bits of {layer: b} over the quantizable layers."""
    layers = dict(_check_model(model))
    n = {name: layer.weight.numel() for name, layer in layers.items()}
    return sum(n[k] * bits.get(k, FP_BITS) for k in n) / sum(n.values())


def uniform_cost(model: nn.Module, bits: int, kind: str = "avg_bits", input_shape=None) -> float:
    """The cost of every quantizable layer at `bits` (e.g. the BitOPs budget of uniform 4)."""
    table = cost_table(model, (bits,), kind, input_shape)
    return float(sum(row[bits] for row in table.values()))


# -------------------------------------------------------------------------- selection

def select_bits(model: nn.Module, budget: float, bits_options=DEFAULT_BITS, kind: str = "avg_bits",
                method: str = "lipschitz", seed: int = 0, sensitivity: Sensitivity | None = None,
                batches=None, input_shape=None) -> A.Allocation:
    """Choose bits per quantizable layer with total cost <= `budget`.

    budget: average weight bits (kind="avg_bits", e.g. 4.0) or BitOPs of the quantizable
        layers (kind="bitops"; `uniform_cost(model, 4, "bitops")` is uniform 4's).
    method: "lipschitz" | "uniform" | "random" | "reverse" (module docstring).
    seed: for "random". sensitivity: precomputed `sensitivities(...)` for the same options
        (computed here otherwise, calibrating with `batches` where ranges are missing).
    Returns an `allocate.Allocation`: `.bits` {layer: b} (use quant.PerLayer(alloc.bits)),
    `.cost`, `.objective` = sum_l S_l(b_l), `.method` = the solver ("exact" | "greedy" for
    lipschitz, else the baseline's name).
    """
    options = check_bits_options(bits_options)
    check_choice(kind, "kind", KINDS)
    check_choice(method, "method", METHODS)
    budget = check_float(budget, "budget", 0.0, lo_open=True)
    check_int(seed, "seed", 0)
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
    if method == "lipschitz":
        return A.allocate(sens, cost, budget)
    if method == "uniform":
        return A.uniform(sens, cost, budget)
    if method == "random":
        return A.random_allocation(sens, cost, budget, seed=seed)
    return A.reverse(sens, cost, budget)


def compare_allocations(model: nn.Module, data, threat, budgets, bits_options=DEFAULT_BITS,
                        kind: str = "avg_bits", methods=METHODS, n: int | None = 1000, random_seeds: int = 3,
                        batches=None, sensitivity: Sensitivity | None = None, batch_size: int = 256,
                        seed: int = 0, progress: bool = False) -> list[dict]:
    """Evaluate each method's allocation at each budget: one row per (budget, method[, seed]).

    data: test Dataset or (x, y); the first `n` examples are used. threat: a ThreatModel
    (e.g. PGD-20). batches: calibration images for the options the model lacks ranges for
    (else a missing range raises). random_seeds: allocations drawn for "random" (seeds
    0..k-1). Each allocation is evaluated with `rqlab.evaluation.evaluate` at
    quant.PerLayer(bits) (keep_fp layers at FP); identical allocations are evaluated once.

    Row: budget, kind, method, seed (random only, else None), solver, bits, cost (actual,
    may be below budget: uniform), avg_bits, objective, bitops (whole model, FP layers at
    32), clean_accuracy, robust_accuracy and their 95% intervals, n, threat. JSON-ready.
    """
    from ..evaluation import evaluate

    options = check_bits_options(bits_options)
    check_choice(kind, "kind", KINDS)
    methods = tuple(methods)
    if not methods:
        raise RqlabError("methods is empty: choose from " + ", ".join(METHODS))
    for m in methods:
        check_choice(m, "method", METHODS)
    check_int(random_seeds, "random_seeds", 1)
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
                alloc = select_bits(model, budget, options, kind, method, seed=s or 0, sensitivity=sensitivity)
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
                    "objective": alloc.objective, "bitops": total_bitops,
                    "clean_accuracy": rec["clean_accuracy"], "clean_ci95": rec["clean_ci95"],
                    "robust_accuracy": rec["robust_accuracy"], "robust_ci95": rec["robust_ci95"],
                    "n": rec["n"], "threat": rec["threat"],
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


__all__ = ["KINDS", "METHODS", "DEFAULT_BITS", "Sensitivity", "sensitivities", "weight_error_norm",
           "activation_step", "layer_input_shapes", "cost_table", "average_bits", "uniform_cost", "select_bits",
           "compare_allocations", "format_comparison", "ensure_calibrated", "missing_ranges",
           "check_bits_options"]
