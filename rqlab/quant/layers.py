"""Quantized layers: conv and linear with fake-quantized weights and inputs, the
activation quantizer with per-precision ranges, and switchable batch norm.

A quantized layer holds its current precision as two plain attributes, `w_bits` and
`a_bits` (32 = full precision); `rqlab.quant.policy` sets them. `a_bits` quantizes the
layer's *input* (METHODS section 1). Layers flagged `keep_fp` (by default the first conv
and the last linear layer) ignore whole-model precision settings.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..validate import ALLOWED_BITS, FP_BITS, RqlabError, check_bits, check_bits_set, check_choice, check_float
from .functional import STE_MODES, WEIGHT_SCHEMES, quantize_range, quantize_weight

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

    def forward(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if bits >= FP_BITS:
            return x
        if bits == 1:  # sign(x): no range involved
            return quantize_range(x, x.new_zeros(()), x.new_zeros(()), 1, self.ste)
        i = bits - 1
        if self.training or self.calibrating:
            self._observe(x, i)
        elif self.seen[i] == 0:
            raise RqlabError(
                f"activation range for {bits} bits was never trained or calibrated: call "
                f"rqlab.quant.calibrate(model, batches, bits=[{bits}]) before evaluating at {bits} bits")
        lo, hi = self.ranges[i, 0], self.ranges[i, 1]
        return quantize_range(x, lo, hi, bits, self.ste)

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

    def set_bits(self, w_bits: int, a_bits: int | None = None) -> None:
        """Set weight and input-activation bits (a_bits defaults to w_bits)."""
        self.w_bits = check_bits(w_bits, "w_bits")
        self.a_bits = check_bits(w_bits if a_bits is None else a_bits, "a_bits")

    def quantized_weight(self) -> torch.Tensor:
        return quantize_weight(self.weight, self.w_bits, self.weight_scheme, self.ste)

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
           "batch_norm", "ALLOWED_BITS"]
