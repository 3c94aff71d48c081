"""Lipschitz estimates of a model and its layers (Defensive Quantization, Lin, Gan, Han,
ICLR 2019; METHODS section 3): primitives that analyses (`rqlab.analysis`) and bit
selection (`rqlab.bitselect`) both build on.

    >>> spectral_norm(model.conv2, input_shape=(32, 14, 14))   # the real conv operator
    >>> reshaped_bound(model.conv2)                             # ||W reshaped to (c_out, c_in k k)||_2
    >>> network_bound(model)["bound"]                           # product over the layers
    >>> local_lipschitz(model, x, x_adv)                         # (B,) empirical ratios

The operator norm of a conv is computed on the operator itself (its stride, padding,
dilation and groups), by power iteration on A^T A with A = F.conv2d and A^T =
F.conv_transpose2d. The reshaped-kernel norm, which DQ's regulariser controls, is
neither equal to it nor an upper bound in general (for a stride-1 conv the operator norm
can reach sqrt(k_h k_w) times it). `quantized=True` uses the layer's current quantized
weight (`layer.quantized_weight()`, at the layer's w_bits).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..validate import RqlabError, check_int
from .base import Normalize
from .state import eval_mode


def _weight(layer: nn.Module, quantized: bool) -> torch.Tensor:
    if quantized:
        if not hasattr(layer, "quantized_weight"):
            raise RqlabError(f"quantized=True needs a quantized layer (QuantConv2d/QuantLinear), "
                             f"got {type(layer).__name__}")
        return layer.quantized_weight().detach()
    return layer.weight.detach()


def _operator(layer: nn.Module, input_shape, w: torch.Tensor):
    """(A, A^T, shape of A's input without batch) for a conv or linear layer, in float64."""
    w = w.double()
    if isinstance(layer, nn.Linear):
        return (lambda v: v @ w.T), (lambda u: u @ w), (layer.in_features,)
    if not isinstance(layer, nn.Conv2d):
        raise RqlabError(f"spectral norms are defined here for nn.Conv2d and nn.Linear, got {type(layer).__name__}")
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise RqlabError(f"conv with padding_mode={layer.padding_mode!r} / padding={layer.padding!r}: "
                         "only explicit zero padding is supported")
    if input_shape is None or len(tuple(input_shape)) != 3:
        raise RqlabError(f"input_shape={input_shape!r}: a conv's operator norm depends on its input size, "
                         "give (C, H, W)")
    c, h, wd = (int(s) for s in input_shape)
    kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    out = F.conv2d(torch.zeros(1, c, h, wd, dtype=w.dtype, device=w.device), w, **kw).shape[2:]
    # output_padding recovers the input rows/cols that the stride drops
    op = tuple(n - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
               for n, o, s, p, d, k in zip((h, wd), out, layer.stride, layer.padding, layer.dilation, w.shape[2:]))
    return ((lambda v: F.conv2d(v, w, **kw)),
            (lambda u: F.conv_transpose2d(u, w, output_padding=op, **kw)), (c, h, wd))


def spectral_norm(layer: nn.Module, input_shape=None, iters: int = 200, quantized: bool = False,
                  seed: int = 0, tol: float = 1e-10) -> float:
    """Largest singular value of the layer's linear map (bias excluded).

    layer: nn.Conv2d (needs input_shape (C, H, W)), by power iteration; or nn.Linear, whose
    map is its weight matrix: its 2-norm is computed exactly (SVD), since power iteration
    stopped by a small change per step can sit well below it when the top two singular
    values are close. iters: at most this many iterations (default 200; stops early when
    the estimate changes by < tol relative). Runs in float64. Converges from below: more
    iterations never lower the estimate.
    """
    check_int(iters, "iters", 1)
    if isinstance(layer, nn.Linear):
        return torch.linalg.matrix_norm(_weight(layer, quantized).double(), ord=2).item()
    fwd, adj, shape = _operator(layer, input_shape, _weight(layer, quantized))
    w = layer.weight
    v = torch.randn((1,) + tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = v.to(w.device)
    v /= v.norm()
    sigma = 0.0
    for _ in range(iters):
        u = fwd(v)
        new = u.norm().item()
        v = adj(u)
        norm = v.norm()
        if norm == 0:
            return 0.0
        v = v / norm
        if abs(new - sigma) <= tol * max(new, 1e-30):
            return new
        sigma = new
    return fwd(v).norm().item()


def reshaped_bound(layer: nn.Module, quantized: bool = False) -> float:
    """Spectral norm of the weight reshaped to (c_out, c_in k_h k_w) (linear: the weight)."""
    w = _weight(layer, quantized).double()
    return torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item()


@torch.no_grad()
def network_bound(model: nn.Module, input_shape=None, quantized: bool = False, iters: int = 200) -> dict:
    """Product of per-layer Lipschitz constants in module order: conv/linear operator
    norms, eval-mode batch norms (max |gamma| / sqrt(var + eps)) and the input
    normalisation (1 / min std). ReLU and non-overlapping max-pooling are 1-Lipschitz.

    An upper bound on the l2 Lipschitz constant of a plain feed-forward chain such as
    SmallCNN; *not* a bound for residual networks (a skip connection adds, not multiplies).
    Returns {"layers": [{"name", "kind", "lipschitz"}], "bound": float}.
    """
    shape = tuple(input_shape or model.input_shape)
    shapes, hooks = {}, []

    def record(mod, inputs, output, name):  # a forward hook must return None
        shapes[name] = tuple(inputs[0].shape[1:])

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: record(mod, i, o, name)))
    try:
        with eval_mode(model):
            p = next(model.parameters())
            model(torch.full((1,) + shape, 0.5, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name in shapes:
            q = quantized and hasattr(m, "quantized_weight")
            rows.append({"name": name, "kind": type(m).__name__,
                         "lipschitz": spectral_norm(m, shapes[name], iters=iters, quantized=q)})
        elif isinstance(m, nn.BatchNorm2d):
            scale = m.weight.abs() if m.weight is not None else torch.ones_like(m.running_var)
            rows.append({"name": name, "kind": "BatchNorm2d",
                         "lipschitz": (scale / torch.sqrt(m.running_var + m.eps)).max().item()})
        elif isinstance(m, Normalize):
            rows.append({"name": name, "kind": "Normalize", "lipschitz": (1 / m.std.min()).item()})
    bound = 1.0
    for r in rows:
        bound *= r["lipschitz"]
    return {"layers": rows, "bound": bound}


@torch.no_grad()
def local_lipschitz(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Empirical local Lipschitz ratio ||f(x_adv) - f(x)||_2 / ||x_adv - x||_2 of the
    logits, per example. (B,); 0 where x_adv == x. Run the model at a fixed precision."""
    if x.shape != x_adv.shape:
        raise RqlabError(f"x {tuple(x.shape)} and x_adv {tuple(x_adv.shape)} must have the same shape")
    with eval_mode(model):
        num = (model(x_adv) - model(x)).flatten(1).norm(dim=1)
    den = (x_adv - x).flatten(1).norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
