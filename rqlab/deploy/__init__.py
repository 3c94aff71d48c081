"""Deployment: the model as an integer engine runs it, not as fake quantization computes it.

rqlab's quantized models are fake-quantized: float arithmetic on a rounded grid. A
deployed int8 model runs integer kernels (ONNX Runtime's QDQ / QLinear operators) whose
rounding, saturation and requantization differ. This package exports a model to ONNX,
quantizes it statically with ONNX Runtime and evaluates the engine itself (METHODS
section 9):

    >>> from rqlab import deploy
    >>> engine = deploy.int8_engine(model, calib_x, deploy.Int8Config())   # needs rqlab[deploy]
    >>> rec = deploy.evaluate_engine(model, engine, test_set, eps=0.1)      # a Record, protocol "engine"
    >>> rec.robust_accuracy                 # worst case over transfer (twin, FP) and Square: an upper bound
    >>> rec["agreement"]["fake_quant"]      # flip rate and logit differences against Fixed(8)

    export     to_onnx (FP graph, legacy exporter), the layers kept FP
    engine     Int8Config, int8_engine, fp_engine, Engine (an InferenceSession as a model)
    evaluate   evaluate_engine, agreement, format_engine_record

onnx and onnxruntime are the optional extra `deploy` (`pip install 'rqlab[deploy]'`).
"""
from .engine import ACTIVATIONS, CALIBRATIONS, Engine, Int8Config, fp_engine, int8_engine, quantize_int8
from .evaluate import TWIN_BITS, agreement, calibration_set, evaluate_engine, format_engine_record
from .export import fp_node_prefixes, to_onnx

__all__ = ["Engine", "Int8Config", "int8_engine", "fp_engine", "quantize_int8", "to_onnx", "fp_node_prefixes",
           "evaluate_engine", "agreement", "calibration_set", "format_engine_record", "TWIN_BITS",
           "ACTIVATIONS", "CALIBRATIONS"]
