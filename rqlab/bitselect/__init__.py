"""Bit selection: a per-layer precision policy under a budget, guided by each layer's
Lipschitz-amplified quantization error (after Song, Ranjan, Li, arXiv 2110.12308;
METHODS section 4). It configures a trained model; it is not a training defense.

    >>> from rqlab import bitselect, quant
    >>> quant.calibrate(model, batches, bits=[2, 3, 4, 5, 6, 8])   # ranges for every option
    >>> sens = bitselect.sensitivities(model, bits_options=(2, 3, 4, 5, 6, 8))
    >>> alloc = bitselect.select_bits(model, 4.0, kind="avg_bits", sensitivity=sens)
    >>> quant.apply(model, quant.PerLayer(alloc.bits))              # mixed precision
    >>> rows = bitselect.compare_allocations(model, test_set, ThreatModel("pgd", eps=0.1, steps=20),
    ...                                      budgets=[3.0, 4.0], n=1000)

Modules:
    sensitivity  S_l(b) per layer and bit option, cost tables (average bits, BitOPs),
                 calibration checks
    allocate     the solvers on {layer: {bits: value}} tables: exact multiple-choice
                 knapsack, greedy, uniform, reverse, random (`bitselect.allocate.greedy`)
    compare      select_bits (one method at one budget), compare_allocations (all
                 methods under attack), format_comparison
    hessian      baseline table: HAWQ-v2 Hessian trace (Hutchinson) x weight error
    margin       baseline table: logit-margin drop at adversarial inputs, one layer
                 quantized at a time
"""
from . import allocate
from .allocate import Allocation
from .compare import DEFAULT_METHODS, METHODS, compare_allocations, format_comparison, select_bits
from .hessian import hessian_sensitivities
from .margin import margin_sensitivities
from .sensitivity import (DEFAULT_BITS, KINDS, Sensitivity, activation_step, average_bits, check_bits_options,
                          cost_table, ensure_calibrated, layer_input_shapes, missing_ranges, sensitivities,
                          uniform_cost, weight_error_norm)

__all__ = ["KINDS", "METHODS", "DEFAULT_METHODS", "DEFAULT_BITS", "Sensitivity", "Allocation", "sensitivities",
           "hessian_sensitivities", "margin_sensitivities", "weight_error_norm", "activation_step",
           "layer_input_shapes", "cost_table", "average_bits", "uniform_cost", "select_bits",
           "compare_allocations", "format_comparison", "ensure_calibrated", "missing_ranges",
           "check_bits_options", "allocate"]
