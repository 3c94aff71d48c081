"""Quantized layers: conv and linear with fake-quantized weights and inputs, the
activation quantizer with per-precision ranges, and switchable batch norm.

A quantized layer holds its current precision as two plain attributes, `w_bits` and
`a_bits` (32 = full precision); `rqlab.quant.policy` sets them. `a_bits` quantizes the
layer's *input* (METHODS section 1). Layers flagged `keep_fp` (by default the first conv
and the last linear layer) ignore whole-model precision settings.

`frozen_weights(model)` marks a stretch where the weights do not change (an attack, an
evaluation): quantized weights and frozen activation grids are then computed once per
precision and reused, with the same values bit for bit.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..validate import ALLOWED_BITS, FP_BITS, RqlabError, check_bits, check_bits_set, check_choice, check_float
from .functional import (STE_MODES, WEIGHT_SCHEMES, quantize_range, quantize_weight, quantize_with_qparams,
                         range_qparams)

# One range slot per bit-width 1..16 (index b - 1); FP needs none.
_N_SLOTS = 16


class ActQuant(nn.Module):
    """Activation quantizer with one tracked range per precision.

    Training: the range of precision b is a moving min/max of batch ranges
    (momentum `momentum`, initialised by the first batch). Eval: ranges are frozen; a
    precision never trained or calibrated raises a clear error (call `calibrate`).
    Calibration mode sets each range to the mean of the batch ranges it sees.

    Buffers: `ranges` (16, 2) [lo, hi] per bit-width, `seen` (16,) batches observed.
    """

    def __init__(self, momentum: float = 0.1, ste: str = "clipped"):
        super().__init__()
        self.momentum = check_float(momentum, "momentum", 0.0, 1.0, lo_open=True)
        self.ste = check_choice(ste, "ste", STE_MODES)
        self.register_buffer("ranges", torch.zeros(_N_SLOTS, 2))
        self.register_buffer("seen", torch.zeros(_N_SLOTS, dtype=torch.long))
        self.calibrating = False
        self._calib_sum: dict[int, torch.Tensor] = {}
        self._frozen = 0  # > 0 inside frozen_weights(): eval grids are cached in _grids
        self._grids: dict[int, tuple] = {}

    def forward(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if bits >= FP_BITS:
            return x
        if bits == 1:  # sign(x): no range involved
            return quantize_range(x, x.new_zeros(()), x.new_zeros(()), 1, self.ste)
        i = bits - 1
        if self.training or self.calibrating:
            self._observe(x, i)
        elif _caching(self):
            return quantize_with_qparams(x, *self._frozen_grid(bits), bits, self.ste)
        else:
            self._check_seen(bits)
        lo, hi = self.ranges[i, 0], self.ranges[i, 1]
        return quantize_range(x, lo, hi, bits, self.ste)

    def _check_seen(self, bits: int) -> None:
        if self.seen[bits - 1] == 0:
            raise RqlabError(
                f"activation range for {bits} bits was never trained or calibrated: call "
                f"rqlab.quant.calibrate(model, batches, bits=[{bits}]) before evaluating at {bits} bits")

    def _frozen_grid(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) of the frozen range of `bits`, computed once while the
        buffers keep their identity and version (no per-forward small ops, no host sync)."""
        key = (self.ranges, self.ranges._version, self.seen, self.seen._version)
        hit = self._grids.get(bits)
        if hit is not None and all(a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(hit[0], key)):
            return hit[1]
        self._check_seen(bits)
        grid = range_qparams(self.ranges[bits - 1, 0], self.ranges[bits - 1, 1], bits)
        self._grids[bits] = (key, grid)
        return grid

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, i: int) -> None:
        batch = torch.stack(torch.aminmax(x.detach().float()))  # (2,) [lo, hi]
        if self.calibrating:
            total = self._calib_sum.get(i)
            self._calib_sum[i] = batch if total is None else total + batch
            self.seen[i] += 1
            self.ranges[i] = self._calib_sum[i] / self.seen[i]
        elif self.seen[i] == 0:
            self.ranges[i] = batch
            self.seen[i] = 1
        else:
            self.ranges[i].lerp_(batch, self.momentum)
            self.seen[i] += 1

    def start_calibration(self, bits: int) -> None:
        """Forget the range of `bits`; the next forwards (in any mode) set it anew."""
        i = bits - 1
        self.seen[i] = 0
        self._calib_sum.pop(i, None)
        self.calibrating = True

    def stop_calibration(self) -> None:
        self.calibrating = False
        self._calib_sum.clear()

    def calibrated_bits(self) -> list[int]:
        return [i + 1 for i in range(_N_SLOTS) if self.seen[i] > 0]


class _QuantMixin:
    """Shared precision state of QuantConv2d and QuantLinear."""

    def _init_quant(self, keep_fp: bool, ste: str, weight_scheme: str, act_momentum: float) -> None:
        self.keep_fp = bool(keep_fp)
        self.ste = check_choice(ste, "ste", STE_MODES)
        self.weight_scheme = check_choice(weight_scheme, "weight_scheme", WEIGHT_SCHEMES)
        self.w_bits = FP_BITS
        self.a_bits = FP_BITS
        self.act = ActQuant(act_momentum, ste)
        self._frozen = 0  # > 0 inside frozen_weights(): quantized weights are cached in _weights
        self._weights: dict[tuple, tuple] = {}

    def set_bits(self, w_bits: int, a_bits: int | None = None) -> None:
        """Set weight and input-activation bits (a_bits defaults to w_bits)."""
        self.w_bits = check_bits(w_bits, "w_bits")
        self.a_bits = check_bits(w_bits if a_bits is None else a_bits, "a_bits")

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight
        if self.w_bits >= FP_BITS or not _caching(self) or (w.requires_grad and torch.is_grad_enabled()):
            return quantize_weight(w, self.w_bits, self.weight_scheme, self.ste)
        # Frozen weights (an attack, an evaluation): quantize once per precision. The entry
        # is valid while the weight is the same tensor, at the same version (in-place
        # updates bump it) and on the same storage (`.data = ...` replaces it; the alias
        # held in the entry keeps the old storage alive, so its address cannot be reused).
        key = (self.w_bits, self.weight_scheme, self.ste)
        hit = self._weights.get(key)
        if hit is not None and hit[0] is w and hit[1] == w._version and hit[2].data_ptr() == w.data_ptr():
            return hit[3]
        q = quantize_weight(w, self.w_bits, self.weight_scheme, self.ste)
        self._weights[key] = (w, w._version, w.detach(), q)
        return q

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}" + (
            ", keep_fp=True" if self.keep_fp else "")


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """nn.Conv2d whose weight (per output channel) and input are fake-quantized.

    Shapes as nn.Conv2d: (B, C_in, H, W) -> (B, C_out, H', W').
    """

    def __init__(self, *args, keep_fp: bool = False, ste: str = "clipped",
                 weight_scheme: str = "per_channel", act_momentum: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(keep_fp, ste, weight_scheme, act_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act(x, self.a_bits), self.quantized_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """nn.Linear whose weight (per output row) and input are fake-quantized. (B, in) -> (B, out)."""

    def __init__(self, *args, keep_fp: bool = False, ste: str = "clipped",
                 weight_scheme: str = "per_channel", act_momentum: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(keep_fp, ste, weight_scheme, act_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(x, self.a_bits), self.quantized_weight(), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


# The frozen-weights cache; False makes `frozen_weights` cache nothing (the slow path, for
# benchmarks and tests that compare the two).
WEIGHT_CACHE = True


def _caching(module: nn.Module) -> bool:
    # Never from inside inference_mode: its tensors could not meet autograd later.
    return WEIGHT_CACHE and getattr(module, "_frozen", 0) > 0 and not torch.is_inference_mode_enabled()


@contextlib.contextmanager
def frozen_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model's weights and activation ranges are taken as fixed:
    each quantized layer quantizes its weight once per (bits, scheme, STE) and reuses it,
    and each activation quantizer in eval mode computes the grid of a frozen range once.
    Results are the same bit for bit; only repeated work goes. `models.state.prepared`,
    `evaluate`, `train.accuracy` and `analysis.transfer_matrix` enter it.

    Safe when weights do change: a cached weight is used only when the weight needs no
    gradient (requires_grad False or grad mode off, so training steps never see it), and
    only while the weight tensor keeps its identity, its version (optimizer steps,
    load_state_dict and other in-place updates bump it) and its storage. Writes through
    `.data` escape the version counter: do not make them inside the block.
    Nestable; the cache is dropped when the outermost block exits. Memory: one quantized
    copy of the quantized layers' weights per precision used inside the block.
    """
    mods = [m for m in model.modules() if isinstance(m, QUANT_LAYERS + (ActQuant,))]
    for m in mods:
        m._frozen = getattr(m, "_frozen", 0) + 1
    try:
        yield model
    finally:
        for m in mods:
            m._frozen -= 1
            if m._frozen == 0:
                getattr(m, "_weights", {}).clear()
                getattr(m, "_grids", {}).clear()


class SwitchableBatchNorm2d(nn.Module):
    """Switchable batch norm (Double-Win Quant): one BatchNorm2d per precision of a set.

    The branch used is the one of the current precision `bits`, set by the precision
    policy; a precision outside the set raises. (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, num_features: int, bits_set, **bn_kwargs):
        super().__init__()
        self.bits_set = check_bits_set(bits_set, "sbn_bits")
        self.bns = nn.ModuleDict({str(b): nn.BatchNorm2d(num_features, **bn_kwargs) for b in self.bits_set})
        self.bits = self.bits_set[-1]

    def set_bits(self, bits: int) -> None:
        bits = check_bits(bits, "bits")
        if bits not in self.bits_set:
            raise RqlabError(
                f"bits={bits} has no switchable batch-norm branch: this model was built with "
                f"sbn_bits={list(self.bits_set)}")
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bns[str(self.bits)](x)

    def extra_repr(self) -> str:
        return f"bits_set={list(self.bits_set)}, bits={self.bits}"


def batch_norm(num_features: int, sbn_bits=None) -> nn.Module:
    """BatchNorm2d, or SwitchableBatchNorm2d when a precision set is given."""
    return nn.BatchNorm2d(num_features) if not sbn_bits else SwitchableBatchNorm2d(num_features, sbn_bits)


__all__ = ["ActQuant", "QuantConv2d", "QuantLinear", "QUANT_LAYERS", "SwitchableBatchNorm2d",
           "batch_norm", "frozen_weights", "ALLOWED_BITS", "WEIGHT_CACHE"]
