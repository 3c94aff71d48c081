"""Hessian-trace sensitivity, a bit-selection baseline after HAWQ-v2 (Dong et al.,
"HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks", NeurIPS 2020).

For each quantizable layer l (`quant.quant_layers(model)`, weights W_l with n_l entries)
and bit option b:

    Omega_l(b) = max(Tr(H_l), 0) / n_l * || Q_b(W_l) - W_l ||_F^2

H_l is the diagonal block, for W_l, of the Hessian of the mean cross-entropy loss over
the given (training) examples, at full precision (every layer FP, eval-mode batch norm).
Q_b is the layer's own weight quantizer (`functional.quantize_weight`, its weight
scheme). Omega is HAWQ-v2's second-order estimate of the loss increase of quantizing W_l
alone, with the Hessian replaced by its average eigenvalue Tr(H_l) / n_l. Activation
quantization is not part of it (as in HAWQ-v2). A negative trace estimate (the Hessian
is not positive semi-definite away from a minimum, or the estimate is noisy) counts as
0: the layer is then insensitive and the allocator gives it the cheapest option.

Estimator (Hutchinson): Tr(A) = E[v^T A v] for v with independent Rademacher (+-1)
entries. Each probe draws one v over every quantizable layer's weights at once and
takes one Hessian-vector product H v by double backward (`torch.autograd.grad` with
create_graph), summed over the data in batches with the same v, so the probe's value is
exact for the whole data set's Hessian. Then

    t_l = v_l^T (H v)_l = v_l^T H_ll v_l + v_l^T H_l,rest v_rest

whose expectation is Tr(H_ll) (the cross term has mean 0: v_l and v_rest are
independent), with variance 2 (||H_ll||_F^2 - sum_i (H_ll)_ii^2) + ||H_l,rest||_F^2. The
estimate is the mean of `n_probes` such values and its standard error the sample
standard deviation / sqrt(n_probes) (`details[l]["trace_se"]`). Cost: n_probes x
(batches) double-backward passes; one probe serves every layer.

    >>> sens = hessian_sensitivities(model, train_set, (2, 3, 4, 8), n=512, n_probes=32)
    >>> alloc = bitselect.select_bits(model, 4.0, (2, 3, 4, 8), method="hessian", sensitivity=sens)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import quant
from ..evaluation import as_tensors
from ..models.state import eval_mode
from ..quant.functional import quantize_weight
from ..validate import FP_BITS, check_int
from .sensitivity import DEFAULT_BITS, Sensitivity, _check_model, check_bits_options

CONSTRUCTION = ("HAWQ-v2: Omega_l(b) = max(Tr(H_l), 0) / n_l * ||Q_b(W_l) - W_l||_F^2, Tr(H_l) of the mean "
                "cross-entropy loss at FP by Hutchinson's estimator (Rademacher probes)")


def weight_error_sq(layer: nn.Module, bits: int) -> float:
    """||Q_b(W) - W||_F^2 of a quantized conv/linear layer (its own weight scheme); 0 at 32."""
    if bits >= FP_BITS:
        return 0.0
    with torch.no_grad():
        w = layer.weight.detach()
        err = quantize_weight(w, bits, getattr(layer, "weight_scheme", "per_channel")) - w
        return float(err.double().pow(2).sum())


def hessian_traces(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers, n_probes: int = 32,
                   batch_size: int = 256, seed: int = 0) -> dict:
    """{name: (trace estimate, standard error, per-probe values)} for the weights of
    `layers` ([(name, module)]), Hessian of mean cross-entropy of model(x) against y, as
    the model is now (precision and mode are the caller's). x: (N, ...) in [0, 1]."""
    weights = [m.weight for _, m in layers]
    saved = [w.requires_grad for w in weights]
    gen = torch.Generator().manual_seed(seed)
    samples = torch.zeros(n_probes, len(weights), dtype=torch.float64)
    try:
        for w in weights:
            w.requires_grad_(True)
        for k in range(n_probes):
            v = [(torch.randint(0, 2, w.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(w) for w in weights]
            for i in range(0, len(x), batch_size):
                xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                loss = F.cross_entropy(model(xb), yb, reduction="sum") / len(x)  # the mean over all of x
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                gv = sum((g * vi).sum() for g, vi in zip(grads, v))
                hv = torch.autograd.grad(gv, weights)
                samples[k] += torch.stack([(vi * h).sum().double() for vi, h in zip(v, hv)]).cpu()
    finally:
        for w, flag in zip(weights, saved):
            w.requires_grad_(flag)
    out = {}
    for j, (name, _) in enumerate(layers):
        s = samples[:, j]
        out[name] = (float(s.mean()), float(s.std(unbiased=True)) / math.sqrt(n_probes), s.tolist())
    return out


def hessian_sensitivities(model: nn.Module, data, bits_options=DEFAULT_BITS, n: int | None = None,
                          n_probes: int = 32, batch_size: int = 256, seed: int = 0) -> Sensitivity:
    """Omega_l(b) for every quantizable layer and bit option (module docstring).

    model: an rqlab model with plain batch norms; its precision, policy and mode are
        left as they were (the traces are taken at FP, in eval mode).
    data: training examples, a Dataset or (x, y) pair; the first `n` are used (None: all).
    bits_options: 2..16 or 32. n_probes: Rademacher probes (>= 2, for the standard
        error). batch_size: examples per double-backward pass. seed: the probes' seed.
    Returns a `Sensitivity` with method "hessian"; details[l] = {"trace", "trace_se",
    "trace_per_weight" (Tr / n_l), "weights" (n_l), "err_sq" {b: ||Q_b(W)-W||_F^2},
    "kind"}.
    """
    options = check_bits_options(bits_options)
    check_int(n_probes, "n_probes", 2)
    check_int(batch_size, "batch_size", 1)
    check_int(seed, "seed", 0)
    layers = _check_model(model)
    x, y = as_tensors(data, n)
    p = next(model.parameters())
    x, y = x.to(device=p.device, dtype=p.dtype), y.to(p.device)
    with eval_mode(model), quant.using(model, quant.Fixed(FP_BITS)):
        traces = hessian_traces(model, x, y, layers, n_probes, batch_size, seed)
    table, details = {}, {}
    for name, layer in layers:
        trace, se, _ = traces[name]
        n_l = layer.weight.numel()
        err = {b: weight_error_sq(layer, b) for b in options}
        table[name] = {b: max(trace, 0.0) / n_l * err[b] for b in options}
        details[name] = {"kind": type(layer).__name__, "weights": n_l, "trace": trace, "trace_se": se,
                         "trace_per_weight": trace / n_l, "err_sq": err}
    settings = {"n": len(x), "n_probes": n_probes, "batch_size": batch_size, "seed": seed}
    return Sensitivity(table, details, options, settings, method="hessian", construction=CONSTRUCTION)


__all__ = ["CONSTRUCTION", "hessian_sensitivities", "hessian_traces", "weight_error_sq"]
