"""Post-training quantization: calibrate activation ranges, convert float models.

    >>> calibrate(model, batches, bits=[2, 4, 8])   # set activation ranges per precision
    >>> ptq(model, 4, batches)                      # calibrate, then run at 4 bits
    >>> convert(my_float_model)                     # swap nn.Conv2d/nn.Linear for quantized ones
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ..validate import FP_BITS, RqlabError, check_bits_set
from .layers import ActQuant, QuantConv2d, QuantLinear
from .policy import Fixed, apply, quant_layers, using


def _images(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, bits, max_batches: int | None = None) -> nn.Module:
    """Set each precision's activation ranges from `batches` (images (B, C, H, W) in
    [0, 1], or (images, labels) pairs). Each range becomes the mean of the batch
    min/max of the layer's input, as seen with the earlier layers already quantized.
    The model runs in eval mode (BN statistics untouched); its mode is restored.
    """
    bits = [b for b in check_bits_set(bits, "bits") if b != FP_BITS]
    batches = list(batches) if not isinstance(batches, list) else batches
    if max_batches is not None:
        batches = batches[:max_batches]
    if not batches:
        raise RqlabError("calibrate got no batches: pass at least one batch of images")
    acts = [m for m in model.modules() if isinstance(m, ActQuant)]
    was_training = model.training
    model.eval()
    try:
        for b in bits:
            for a in acts:
                a.start_calibration(b)
            with using(model, Fixed(b)):
                for batch in batches:
                    model(_images(batch))
            for a in acts:
                a.stop_calibration()
    finally:
        for a in acts:
            a.stop_calibration()
        model.train(was_training)
    return model


def ptq(model: nn.Module, bits: int, batches: Iterable, max_batches: int | None = 8) -> nn.Module:
    """Post-training quantization of a trained model to `bits`: calibrate, then apply Fixed(bits)."""
    calibrate(model, batches, [bits], max_batches=max_batches)
    return apply(model, Fixed(bits))


def convert(model: nn.Module, quantize_first_last: bool = False, ste: str = "clipped",
            weight_scheme: str = "per_channel") -> nn.Module:
    """Replace every nn.Conv2d / nn.Linear of a float model by its quantized twin, in place.

    Weights are copied; the model behaves exactly as before until a precision is
    applied. Unless `quantize_first_last`, the first conv/linear and the last linear
    (in module order) are flagged keep_fp, as in Double-Win Quant.
    """
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) in (nn.Conv2d, nn.Linear)]
    if not targets:
        raise RqlabError("convert found no nn.Conv2d or nn.Linear layer in the model")
    first = targets[0][0]
    last = [n for n, m in targets if isinstance(m, nn.Linear)][-1:] or [targets[-1][0]]
    for name, m in targets:
        keep = not quantize_first_last and name in (first, last[0])
        kw = dict(keep_fp=keep, ste=ste, weight_scheme=weight_scheme, bias=m.bias is not None,
                  device=m.weight.device, dtype=m.weight.dtype)
        if isinstance(m, nn.Conv2d):
            q = QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                            m.dilation, m.groups, padding_mode=m.padding_mode, **kw)
        else:
            q = QuantLinear(m.in_features, m.out_features, **kw)
        q.load_state_dict(m.state_dict(), strict=False)
        q.train(m.training)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], q)
    return model


def quantizable_names(model: nn.Module) -> list[str]:
    """Names accepted by PerLayer for this model."""
    return [n for n, _ in quant_layers(model)]
