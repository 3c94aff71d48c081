"""Quantization: fake-quant functions with STE, quantized layers, switchable BN,
precision policies, post-training quantization and BitOPs (METHODS section 1).

    >>> from rqlab import quant
    >>> quant.apply(model, quant.Fixed(4))
    >>> with quant.using(model, quant.RandomPrecision((4, 5, 6, 7, 8), seed=0)):
    ...     logits = model(x)
    >>> with quant.frozen_weights(model):      # weights fixed here: quantize them once
    ...     x_adv = attacks.pgd(model, x, y, threat)
    >>> with quant.surrogate_backward("tanh", k=1.0):   # same forward, smooth backward (BPDA)
    ...     g = torch.autograd.grad(loss, x)[0]
"""
from .bitops import bitops, format_summary, layer_macs, macs, summary
from .functional import (STE_MODES, SURROGATE_K_DEFAULT, SURROGATE_KINDS, WEIGHT_SCHEMES, affine_qparams,
                         binarize_activation, binarize_weight, fake_quantize, fused, grid_step, quantize_per_channel,
                         quantize_range, quantize_symmetric, quantize_weight, quantize_with_qparams, range_qparams,
                         surrogate, surrogate_backward)
from .layers import ActQuant, QuantConv2d, QuantLinear, SwitchableBatchNorm2d, batch_norm, frozen_weights
from .policy import (POLICY_KINDS, Fixed, PerLayer, Policy, RandomPrecision, apply, current, parse_policy,
                     policy_from_dict, quant_layers, switching, using)
from .ptq import calibrate, convert, ptq, quantizable_names
