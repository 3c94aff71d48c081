"""Uniform fake quantization with straight-through estimators (METHODS section 1).

One function family: every quantizer maps a float tensor to the float values of a
b-bit grid (forward) and passes the gradient straight through (backward).

Grid (b >= 2, asymmetric): for a range [lo, hi] widened to contain 0,
    scale = (hi - lo) / (2^b - 1),   zero_point = round(-lo / scale) in [0, 2^b - 1]
    Q(x)  = (clamp(round(x / scale) + zero_point, 0, 2^b - 1) - zero_point) * scale
so 0 is exactly representable (ReLU zeros and zero padding stay exact). This is the
affine scheme of torch's native fake-quant ops (torch.fake_quantize_per_{tensor,channel}
_affine), used as they are on GPUs. On the CPU their kernels are scalar loops, about
twice as slow as the same formula in vectorised tensor ops, so there `fake_quantize`
computes that formula instead: the same values, mask and gradient, bit for bit
(tests/test_fast_paths.py; docs/performance.md).

Symmetric per-tensor (option): scale = max|x| / (2^(b-1) - 1), grid -(2^(b-1)-1)..(2^(b-1)-1).

Binary (b = 1, XNOR-style): weights sign(w) * mean|w| per output channel,
activations sign(x). Both use the STE masked to |x| <= 1.

STE variants (`ste`):
    "clipped": gradient 1 where the value was inside the grid, 0 where it was clamped
               (the native ops' backward);
    "plain":   gradient 1 everywhere.

Surrogate backward (BPDA, Athalye et al. 2018; METHODS sections 6 and 8): inside
`surrogate_backward(kind, k)` every quantizer's forward is unchanged, bit for bit, and
its backward is the derivative of a smooth stand-in instead of the STE:
    sign (b = 1, weights and activations):
        "tanh":     d/dx tanh(k x) = k (1 - tanh(k x)^2)   (nonzero for every finite x)
        "identity": 1 everywhere
    round on a b >= 2 grid, clamp included: 1 everywhere for both kinds (the plain STE,
        without the clamp mask).
The setting is read when a quantizer runs its forward pass (one module-level check).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..validate import check_choice, check_float

STE_MODES = ("clipped", "plain")
WEIGHT_SCHEMES = ("per_channel", "per_tensor_symmetric")
_EPS = 1e-8
# The vectorised CPU path of `fake_quantize`; False uses torch's native kernels there too.
CPU_VECTORISED = True
# Fused CPU path (`fused()`): the vectorised formula compiled by torch.compile into one
# pass over the tensor. Off by default (docs/performance.md has what it measured).
FUSED = False
_fused_kernel = None  # the compiled formula, built on first use; False once it has failed
SURROGATE_KINDS = ("tanh", "identity")
SURROGATE_K_DEFAULT = 1.0  # tanh(x) matches sign's range [-1, 1] and the STE's slope 1 at 0
# (kind, k) inside `surrogate_backward`, else None: the STE backward.
_SURROGATE: tuple[str, float] | None = None


@contextlib.contextmanager
def surrogate_backward(kind: str = "tanh", k: float = SURROGATE_K_DEFAULT) -> Iterator[tuple[str, float]]:
    """Inside the block, quantizers keep their forward and take a smooth surrogate's
    derivative as their backward (module docstring): the BPDA attacker's view. Yields
    (kind, k); the previous setting comes back on exit, also after an exception.

        >>> with surrogate_backward("tanh", k=1.0):
        ...     g = torch.autograd.grad(loss_fn(model(x)), x)[0]   # model(x) itself unchanged

    kind: "tanh" | "identity". k: slope of tanh(k x) at 0 (> 0; unused by "identity").
    Not thread-safe (one process-wide setting), like torch's own grad mode is per thread."""
    global _SURROGATE
    kind = check_choice(str(kind).lower(), "surrogate", SURROGATE_KINDS)
    k = check_float(k, "k", 0.0, None, lo_open=True)  # the slope of tanh(k x) at 0
    previous, _SURROGATE = _SURROGATE, (kind, k)
    try:
        yield _SURROGATE
    finally:
        _SURROGATE = previous


def surrogate() -> tuple[str, float] | None:
    """The surrogate in force, (kind, k), or None outside `surrogate_backward`."""
    return _SURROGATE


class _StraightThrough(torch.autograd.Function):
    """Forward q exactly (x + (q - x).detach() can be one rounding off); gradient 1 to x."""

    @staticmethod
    def forward(ctx, x, q):
        return q.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _grid_ste(x: torch.Tensor, q: torch.Tensor, ste: str) -> torch.Tensor:
    """q (computed from x on a b >= 2 grid) with the backward of `ste`, or, inside
    `surrogate_backward`, the identity (forward bit for bit q)."""
    if _SURROGATE is not None:
        return _StraightThrough.apply(x, q.detach())
    return _plain(x, q.detach()) if ste == "plain" else q


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero point int32) of the b-bit asymmetric grid over [lo, hi], widened
    to contain 0 (module docstring), elementwise: lo, hi of shape (K,) give one grid per
    channel (per-channel weights), (1,) one for the tensor. scale is at least 1e-8."""
    qmax = 2 ** bits - 1
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / qmax, min=_EPS)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
    return scale.float(), zero_point


def _plain(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward value q, gradient 1 with respect to x (plain straight-through)."""
    return x + (q - x).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                   axis: int | None = None) -> torch.Tensor:
    """torch.fake_quantize_per_tensor_affine (axis None; scale, zero_point of shape (1,))
    or ..._per_channel_affine (one scale and zero point per slice along `axis`): values,
    and the clipped-STE gradient (0 where the value was clamped). x: float32, any shape;
    the result has x's shape. qmin, qmax: the integer grid, e.g. 0, 2^b - 1. On the CPU
    the vectorised formula (same values and gradient, bit for bit), else torch's kernels.

        >>> scale, zp = affine_qparams(torch.tensor([0.0]), torch.tensor([1.0]), 2)
        >>> fake_quantize(torch.tensor([0.2, 0.5, 2.0]), scale, zp, 0, 3)  # grid 0, 1/3, 2/3, 1
        tensor([0.3333, 0.6667, 1.0000])"""
    if x.device.type != "cpu" or not CPU_VECTORISED:
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)
    if x.requires_grad and torch.is_grad_enabled():
        return _FakeQuantizeCPU.apply(x, scale, zero_point, qmin, qmax, axis)
    return _fake_quantize_cpu(x, scale, zero_point, qmin, qmax, axis, with_mask=False)[0]


@contextlib.contextmanager
def fused(on: bool = True) -> Iterator[bool]:
    """Inside the block, CPU fake quantization (values and clipped-STE mask) runs as one
    `torch.compile`d kernel instead of a chain of vectorised passes: the same formula, the
    same values up to float rounding of the compiler's code. Where compilation is not
    available (no C++ compiler, a platform torch.compile does not support) the first call
    warns once and the vectorised path runs, as without the block.

        >>> with quant.fused():
        ...     history = train.fit(model, ...)
    """
    global FUSED
    old, FUSED = FUSED, bool(on)
    try:
        yield FUSED
    finally:
        FUSED = old


def _fq_formula(x, s, z, qmin: int, qmax: int):
    t = torch.mul(x, torch.reciprocal(s)).round().add(z)
    mask = t.ge(qmin).logical_and(t.le(qmax))
    return t.clamp(qmin, qmax).nan_to_num(nan=float(qmin)).sub(z).mul(s), mask


def _fused_fq(x, s, z, qmin: int, qmax: int):
    """(q, mask) from the compiled formula, or None where compilation is unavailable."""
    global _fused_kernel
    if _fused_kernel is None:
        try:
            _fused_kernel = torch.compile(_fq_formula, dynamic=True)
        except Exception as e:  # noqa: BLE001 - any failure means: not available here
            _fused_failed(e)
    if not _fused_kernel:
        return None
    try:
        return _fused_kernel(x, s, z, qmin, qmax)
    except Exception as e:  # noqa: BLE001 - the compiler fails on the first call (no cc, ...)
        _fused_failed(e)
        return None


def _fused_failed(err: Exception) -> None:
    global _fused_kernel
    import warnings

    _fused_kernel = False
    warnings.warn(f"quant.fused: torch.compile is not available here ({type(err).__name__}: "
                  f"{str(err).splitlines()[0] if str(err) else ''}); using the vectorised path", stacklevel=3)


def _fake_quantize_cpu(x, scale, zero_point, qmin: int, qmax: int, axis, with_mask: bool):
    """The native kernels' formula, step by step (each step one vectorised pass):
        t = zero_point + nearbyint(x * (1 / scale))       (float; round half to even)
        mask = qmin <= t <= qmax
        q = (clamp(t, qmin, qmax) - zero_point) * scale,  NaN -> qmin as fmax/fmin give
    Every intermediate is a small integer held exactly in float32, so each result is
    rounded once, where the native kernel rounds it: equal bit for bit for every finite
    x, and for inf/NaN per tensor. (Per channel, the native kernel casts t to int64
    first, undefined in C++ for inf; weights are finite inside their own range.)"""
    shape = (-1,) + (1,) * (x.dim() - axis - 1) if axis is not None else (1,)
    s = scale.view(shape)
    z = zero_point.view(shape).to(x.dtype)
    if FUSED:
        out = _fused_fq(x.detach(), s, z, qmin, qmax)
        if out is not None:
            return out[0], (out[1] if with_mask else None)
    t = torch.mul(x.detach(), torch.reciprocal(s)).round_().add_(z)
    mask = t.ge(qmin).logical_and_(t.le(qmax)) if with_mask else None
    q = t.clamp_(qmin, qmax).nan_to_num_(nan=float(qmin)).sub_(z).mul_(s)
    return q, mask


class _FakeQuantizeCPU(torch.autograd.Function):
    """Forward `_fake_quantize_cpu`; backward the native ops' own: grad * mask."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        q, mask = _fake_quantize_cpu(x, scale, zero_point, qmin, qmax, axis, with_mask=True)
        ctx.save_for_backward(mask)
        return q

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.ops.aten.fake_quantize_per_tensor_affine_cachemask_backward(grad, mask), \
            None, None, None, None, None


def quantize_per_channel(w: torch.Tensor, bits: int, ste: str = "clipped", axis: int = 0) -> torch.Tensor:
    """Fake-quantize `w` with one min..max range per slice along `axis` (2^b - 1 steps).

    w: any shape, e.g. conv weight (C_out, C_in, kH, kW); ranges recomputed from `w` on
    every call and treated as constants in the backward pass.
    """
    if bits == 1:
        return binarize_weight(w, axis)
    wd = w.detach().float().transpose(0, axis).reshape(w.shape[axis], -1)  # (C, rest)
    lo, hi = wd.amin(dim=1), wd.amax(dim=1)  # = torch.aminmax(wd, dim=1), ~20x faster on CPU
    scale, zp = affine_qparams(lo, hi, bits)
    q = fake_quantize(w.float(), scale, zp, 0, 2 ** bits - 1, axis).to(w.dtype)
    return _grid_ste(w, q, ste)


def quantize_symmetric(w: torch.Tensor, bits: int, ste: str = "clipped") -> torch.Tensor:
    """Fake-quantize `w` with one symmetric range max|w| for the whole tensor."""
    if bits == 1:
        alpha = w.detach().abs().mean()
        return _binary_ste(w, alpha)
    qmax = 2 ** (bits - 1) - 1
    scale = torch.clamp(w.detach().abs().max().float() / qmax, min=_EPS).reshape(1)
    zp = torch.zeros(1, dtype=torch.int32, device=w.device)
    q = fake_quantize(w.float(), scale, zp, -qmax, qmax).to(w.dtype)
    return _grid_ste(w, q, ste)


def quantize_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
                   ste: str = "clipped") -> torch.Tensor:
    """Fake-quantize `x` on the b-bit grid of the range [lo, hi] (scalar tensors).

    Used for activations, whose range is tracked or calibrated (see layers.ActQuant).
    Values beyond the range are clamped; with ste="clipped" their gradient is 0.
    """
    if bits == 1:
        return binarize_activation(x)
    return quantize_with_qparams(x, *range_qparams(lo, hi, bits), bits, ste)


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale (1,) float32, zero point (1,) int32) of the b-bit grid over [lo, hi] (scalars).

    Computed once and reused by `quantize_with_qparams` when the range is frozen (eval):
    the result is the same as `quantize_range`'s, bit for bit.
    """
    return affine_qparams(lo.reshape(1), hi.reshape(1), bits)


def quantize_with_qparams(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                          ste: str = "clipped") -> torch.Tensor:
    """Fake-quantize `x` on the grid (scale, zero_point) of `range_qparams` (b >= 2)."""
    q = fake_quantize(x.float(), scale, zero_point, 0, 2 ** bits - 1).to(x.dtype)
    return _grid_ste(x, q, ste)


class _SignSTE(torch.autograd.Function):
    """sign(x) * alpha forward; gradient alpha-free, masked to |x| <= 1 backward (or,
    inside `surrogate_backward`, the surrogate's derivative, unmasked)."""

    @staticmethod
    def forward(ctx, x, alpha, zero_to_one: bool):
        ctx.save_for_backward(x)
        ctx.surrogate = _SURROGATE
        s = torch.sign(x)
        if zero_to_one:  # weights: sign(0) := +1 so every weight takes one of two values
            s = torch.where(x == 0, torch.ones_like(s), s)
        return s * alpha

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if ctx.surrogate is None:
            return grad * (x.abs() <= 1).to(grad.dtype), None, None
        kind, k = ctx.surrogate
        if kind == "identity":
            return grad, None, None
        # k (1 - tanh(kx)^2) as k / cosh(kx)^2: no cancellation where tanh saturates
        return grad * (k * torch.cosh(k * x).pow(-2)).to(grad.dtype), None, None


def _binary_ste(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return _SignSTE.apply(w, alpha, True)


def binarize_weight(w: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """XNOR-Net weights: sign(w) * mean|w| of each slice along `axis`. Shape kept."""
    dims = [d for d in range(w.dim()) if d != axis]
    alpha = w.detach().abs().mean(dim=dims, keepdim=True) if dims else w.detach().abs()
    return _binary_ste(w, alpha)


def binarize_activation(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with the |x| <= 1 STE. After a ReLU (x >= 0) this is the {0, 1} step."""
    return _SignSTE.apply(x, torch.ones((), dtype=x.dtype, device=x.device), False)


def quantize_weight(w: torch.Tensor, bits: int, scheme: str = "per_channel", ste: str = "clipped") -> torch.Tensor:
    """Weight quantizer by scheme name; bits = 32 returns `w` unchanged."""
    if bits >= 32:
        return w
    if scheme == "per_channel":
        return quantize_per_channel(w, bits, ste)
    return quantize_symmetric(w, bits, ste)


def grid_step(lo: float, hi: float, bits: int) -> float:
    """Step size of the b-bit affine grid over [lo, hi] (widened to contain 0)."""
    return (max(hi, 0.0) - min(lo, 0.0)) / (2 ** bits - 1)
