"""Per-layer sensitivities and cost tables of Lipschitz-guided bit selection (after Song,
Ranjan, Li, arXiv 2110.12308; METHODS section 4), and the calibration checks they need.

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
               (`models.lipschitz.spectral_norm`, float64); for a linear layer, the
               matrix's spectral norm.
    e_a,l(b) = the step of the b-bit grid of layer l's input range for b bits:
               (hi - lo) / (2^b - 1) with [lo, hi] widened to contain 0
               (`functional.grid_step`). The range is the layer's calibrated (or trained)
               range *for b bits* (`layer.act.ranges[b - 1]`), so the model must have a
               range for every option: pass calibration batches or call
               `quant.calibrate` first.
    D_l      = prod_{j > l} L_j, the product of the Lipschitz estimates of every layer
               after l in module order up to the logits, from
               `models.lipschitz.network_bound` at full precision: conv/linear operator
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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import quant
from ..models.lipschitz import network_bound, spectral_norm
from ..models.state import eval_mode
from ..quant.functional import grid_step, quantize_weight
from ..quant.layers import SwitchableBatchNorm2d
from ..validate import FP_BITS, RqlabError, check_bits_set, check_choice, check_int

KINDS = ("avg_bits", "bitops")
DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
LIPSCHITZ = "rqlab (METHODS section 4): S_l(b) = (e_w,l(b) + e_a,l(b)) * prod_{j>l} L_j"


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
    method: the construction that filled the table: "lipschitz" (here), "hessian"
    (`bitselect.hessian`) or "margin" (`bitselect.margin`); construction: its formula.
    """

    table: dict
    details: dict
    bits_options: tuple
    settings: dict = field(default_factory=dict)
    method: str = "lipschitz"
    construction: str = LIPSCHITZ

    @property
    def layers(self) -> list[str]:
        return list(self.table)

    def to_dict(self) -> dict:
        """JSON-ready (bit keys as strings)."""
        keyed = lambda d: {str(b): v for b, v in d.items()}  # noqa: E731
        by_bits = lambda v: isinstance(v, dict) and all(isinstance(b, int) for b in v)  # noqa: E731
        details = {}
        for name, d in self.details.items():
            details[name] = {k: (keyed(v) if by_bits(v) else v) for k, v in d.items()}
        return {"method": self.method, "construction": self.construction,
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


__all__ = ["KINDS", "DEFAULT_BITS", "Sensitivity", "sensitivities", "weight_error_norm", "activation_step",
           "layer_input_shapes", "cost_table", "average_bits", "uniform_cost", "ensure_calibrated", "missing_ranges",
           "check_bits_options"]
